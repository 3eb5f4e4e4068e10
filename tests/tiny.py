"""Tiny offline building blocks for tests: a real BPE tokenizer trained in seconds, tiny Llama/Qwen2 models.

Everything here is built from scratch (no hub): the tokenizer is a byte-level BPE trained on the
bundled Shakespeare corpus, with ChatML special tokens and a chat template that marks assistant
tokens with ``{% generation %}`` so ``return_assistant_tokens_mask`` works.
"""

from __future__ import annotations

import gzip
import functools
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_text(max_chars: int = 400_000) -> str:
    path = resources.files("distillery") / "assets" / "shakespeare8.txt.gz"
    with path.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")[:max_chars]


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int, seed_text_chars: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text(seed_text_chars)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, seed_text_chars: int = 200_000) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (``vocab_size`` entries incl. 4 special tokens) with a chat template."""
    tok = Tokenizer.from_str(_trained(vocab_size, seed_text_chars))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               ffn: int = 128, max_pos: int = 512, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=0, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    return model.eval()


def tiny_qwen2(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               ffn: int = 128, max_pos: int = 512, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=3)
    return Qwen2ForCausalLM(cfg).eval()


def sharp_student_folder(root):
    """A tied tiny Llama whose attention is far from uniform (q/k scaled by 5, so positions and a KV cache matter),
    saved with its tokenizer under the folder ``root``; returns ``(model, root)``. The exporters' parity tests use it."""
    model = tiny_llama(tie=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    model.save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return model, root
