"""Chat data as OpenAI's format has it: content parts, the developer role, assistant tool calls with null content and
tool messages; data.chat_template; the default system prompt a template adds is reported."""

from __future__ import annotations

import json
import warnings

import pytest

from distillery.config import DataConfig
from distillery.data import build_datasets
from distillery.data.chat import CHATML, default_system_prompt, render_chat, use_chat_template
from distillery.data.readers import Record, _check_messages
from distillery.errors import DistilleryError
from tiny import tiny_tokenizer

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's template, as shipped (it adds a system prompt when there is none)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TOOL_CHAT = [
    {"role": "developer", "content": "Answer with tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny."},
]


def rec(messages, line=1) -> Record:
    return Record("chats.jsonl", line, messages=_check_messages(messages, f"chats.jsonl:{line}"))


def assistant_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_openai_messages_are_normalised():
    msgs = rec(TOOL_CHAT).messages
    assert msgs[1] == {"role": "user", "content": "Weather in\nParis?"}  # text parts joined as vLLM does
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Paris"}}
    assert msgs[3] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "c1"}
    assert msgs[0]["role"] == "developer"


@pytest.mark.parametrize("bad, message", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "chats.jsonl:1: messages[0].content[0] is a 'image_url' part: only text parts"),
    ({"role": "assistant", "content": None}, "chats.jsonl:1: messages[0].content must be a string or a list of text parts, got NoneType"),
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}, "messages[0].tool_calls must be a list on an assistant message"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "messages[0].tool_calls[0].function.arguments is not JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}, "messages[0].tool_calls[0] must be"),
])
def test_malformed_openai_messages_name_the_line(bad, message):
    with pytest.raises(DistilleryError) as err:
        rec([bad, {"role": "assistant", "content": "ok"}])
    assert message in str(err.value)


def test_developer_becomes_system_where_the_template_lacks_it():
    tok = tiny_tokenizer()  # its template prints any role by name and never mentions 'developer'
    as_dev, _ = render_chat(rec([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]), tok)
    as_sys, _ = render_chat(rec([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]), tok)
    assert as_dev == as_sys
    tok.chat_template = tok.chat_template.replace("{% for message in messages %}",
                                                  "{% for message in messages %}{# developer kept #}")
    kept, _ = render_chat(rec([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."}]), tok)
    assert tok.decode(kept).startswith("<|im_start|>developer\n")


def test_tool_calls_refused_by_a_template_that_drops_them():
    with pytest.raises(DistilleryError, match=r"chats.jsonl:7: messages\[2\] makes tool calls, which this chat template "
                                              r"does not render .* set data.chat_template"):
        render_chat(rec(TOOL_CHAT, line=7), tiny_tokenizer())


def test_chatml_renders_tool_calls_as_the_assistants_tokens():
    tok = tiny_tokenizer()
    use_chat_template(tok, "chatml")
    assert tok.chat_template == CHATML
    ids, mask = render_chat(rec(TOOL_CHAT), tok)
    text = tok.decode(ids)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert text == ("<|im_start|>system\nAnswer with tools.<|im_end|>\n<|im_start|>user\nWeather in\nParis?<|im_end|>\n"
                    f"<|im_start|>assistant\n\n{call}<|im_end|>\n<|im_start|>tool\n18 C, sunny<|im_end|>\n"
                    "<|im_start|>assistant\nIt is 18 C and sunny.<|im_end|>\n")
    # the loss covers what the assistant writes: its tool call and its answer, never the tool's output
    assert assistant_text(tok, ids, mask) == f"\n{call}<|im_end|>It is 18 C and sunny.<|im_end|>"


def test_chat_template_file_and_errors(tmp_path):
    tok = tiny_tokenizer()
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    use_chat_template(tok, str(f))
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "[user]a"
    with pytest.raises(DistilleryError, match="data.chat_template 'nope' is neither a file nor a named template \\(chatml\\)"):
        use_chat_template(tok, "nope")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(DistilleryError, match="needs the tokens <\\|im_start\\|> and <\\|im_end\\|>"):
        use_chat_template(plain, "chatml")


def test_default_system_prompt_is_found():
    tok = tiny_tokenizer()
    assert default_system_prompt(tok) is None
    tok.chat_template = SMOLLM2_TEMPLATE
    assert default_system_prompt(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok.chat_template = CHATML
    assert default_system_prompt(tok) is None


def test_build_datasets_says_so_and_chatml_renders_without(tmp_path):
    path = tmp_path / "chats.jsonl"
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(5)] + [[{"role": "system", "content": "Terse."}, *TOOL_CHAT[1:2], TOOL_CHAT[4]]]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    with pytest.warns(UserWarning, match=r"data.train: 5 of 6 conversations have no system message, and the chat "
                                         r"template adds its own to them \('You are a helpful AI assistant named SmolLM"):
        build_datasets(DataConfig(train=[str(path)], seq_len=128, val_fraction=0.0), tok, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = build_datasets(DataConfig(train=[str(path)], seq_len=128, val_fraction=0.0, chat_template="chatml"),
                                tok, progress=False)
    assert tok.chat_template == CHATML  # the student is saved with the template it was trained on
    text = tok.decode(splits.train.tokens.tolist())
    assert "SmolLM" not in text and text.count("<|im_start|>system") == 1  # only the record's own "Terse."
