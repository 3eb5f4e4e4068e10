"""lm-eval adapter: one child run of lm-eval-harness on tiny local tasks, checked against log-likelihoods,
bits per byte and greedy generations computed here by hand, and the shipped BLiMP task against the BLiMP
scorer. One run serves every test (lm-eval's import alone takes seconds)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama, tiny_tokenizer

pytest.importorskip("lm_eval")

from distillery.errors import DistilleryError  # noqa: E402
from distillery.tasks.blimp import load_pairs, sentence_logprobs  # noqa: E402
from distillery.tasks.lm_eval_adapter import resolve_specs, run_lm_eval  # noqa: E402

MC = [{"question": "To be, or not to", "choices": [" be", " king", " the"], "label": 0},
      {"question": "My lord, the", "choices": [" king", " be"], "label": 1}]
TEXTS = [{"text": "What a piece of work is a man!"}, {"text": "The rest is silence.\nO, I die, Horatio."}]
GEN_PROMPTS = ["Speak, I am bound to", "Good night, sweet"]
GEN_TOKENS = 5


def _sum_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """sum_j log p(cont_j | ctx, cont_<j): one plain forward, log_softmax, gather."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def _greedy(model, tok, prompt: str) -> str:
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(GEN_TOKENS):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0]


def _write_tasks(folder, targets: list[str]) -> None:
    folder.mkdir()
    for name, rows in (("mc", MC), ("bpb", TEXTS), ("gen", [{"question": p, "answer": a}
                                                            for p, a in zip(GEN_PROMPTS, targets)])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(path=folder / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    (folder / "bpb.yaml").write_text(
        "task: tiny_bpb\n" + common.format(path=folder / "bpb.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(path=folder / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: {GEN_TOKENS}\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = tiny_tokenizer()
    models = {"teacher": tiny_llama(seed=0), "student": tiny_llama(seed=1)}
    for role, model in models.items():
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    # The teacher's greedy answer is the target of prompt 0 only: teacher exact_match must be 1/2.
    targets = [_greedy(models["teacher"], tok, GEN_PROMPTS[0]), "no model says this"]
    _write_tasks(root / "tasks", targets)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLERY_HOME", str(root / "home"))
        mp.delenv("DISTILLERY_HF_HOME", raising=False)
        result = run_lm_eval(str(root / "teacher"), str(root / "student"),
                             [str(root / "tasks" / f"{n}.yaml") for n in ("mc", "bpb", "gen")] + ["distillery_blimp"],
                             blimp_per_paradigm=1, batch_size=4, keep_samples=True)
    return {"result": result, "tok": tok, "models": models, "root": root, "targets": targets}


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_multiple_choice_loglikelihoods_and_accuracy(run, role):
    tok, model = run["tok"], run["models"][role]
    task = run["result"]["tasks"]["tiny_mc"]
    right = 0
    for doc, sample in zip(MC, task["samples"][role]):
        ctx = tok(doc["question"])["input_ids"]
        hand = [_sum_logprob(model, ctx, tok(c)["input_ids"]) for c in doc["choices"]]
        got = [r[0] for r in sample["resps"]]
        assert got == pytest.approx(hand, abs=1e-4)
        right += int(max(range(len(hand)), key=hand.__getitem__) == doc["label"])
    assert task[role]["acc"] == pytest.approx(right / len(MC))


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_rolling_bits_per_byte(run, role):
    """bits/byte = -(sum over docs of log p(doc | EOS)) / (sum of UTF-8 bytes) / ln 2."""
    tok, model = run["tok"], run["models"][role]
    ll = sum(_sum_logprob(model, [tok.eos_token_id], tok(d["text"])["input_ids"]) for d in TEXTS)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in TEXTS)
    assert run["result"]["tasks"]["tiny_bpb"][role]["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2),
                                                                                       rel=1e-5)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_generate_until_matches_hand_greedy(run, role):
    tok, model = run["tok"], run["models"][role]
    task = run["result"]["tasks"]["tiny_gen"]
    hand = [_greedy(model, tok, p) for p in GEN_PROMPTS]
    assert [s["resps"][0] for s in task["samples"][role]] == hand
    expected = sum(h == t for h, t in zip(hand, run["targets"])) / len(hand)
    assert task[role]["exact_match"] == pytest.approx(expected)
    if role == "teacher":
        assert expected == 0.5


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_shipped_blimp_task_equals_blimp_scorer(run, role):
    """The shipped lm-eval BLiMP task and distillery's own scorer give the same log-probs and accuracy."""
    pairs = load_pairs(per_paradigm=1)
    task = run["result"]["tasks"]["distillery_blimp"]
    assert task["n_docs"] == len(pairs) == 67
    lp = sentence_logprobs(run["models"][role], run["tok"], [p["good"] for p in pairs] + [p["bad"] for p in pairs])
    got = [(s["resps"][0][0], s["resps"][1][0]) for s in sorted(task["samples"][role], key=lambda s: s["doc_id"])]
    assert [g for g, _ in got] == pytest.approx(lp[:67], abs=1e-3)
    assert [b for _, b in got] == pytest.approx(lp[67:], abs=1e-3)
    assert task[role]["acc"] == pytest.approx(sum(lp[i] > lp[67 + i] for i in range(67)) / 67)


def test_caches_land_in_distillerys_own_hf_home(run):
    res = run["result"]
    home = run["root"] / "home" / "hf"
    assert res["hf_home"] == str(home) and res["offline"] is True
    assert (home / "datasets").is_dir()  # lm-eval's datasets cache went here, not to ~/.cache/huggingface


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(DistilleryError, match="does not exist"):
        resolve_specs([str(tmp_path / "missing.yaml")], tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(DistilleryError, match="needs a 'task:'"):
        resolve_specs([str(bad)], tmp_path)
    assert resolve_specs(["hellaswag"], tmp_path) == {"tasks": ["hellaswag"], "include_paths": [], "registry": True}
