"""Tokens/s of ``distillery.generate.sample`` against transformers' ``model.generate`` on the same batch.

Both run greedy on the same left-padded batch (8 prompts of 16..32 tokens), 64 new tokens, no EOS
(so both produce exactly 64 tokens per row), KV cache on, fp32. The outputs are checked to be equal
token for token. Each timing is the median of ``--repeats`` runs, the two methods interleaved, after one warm-up run.
Then both sample (temperature 1, no top-k / top-p: on-policy training's draws) on the same batch: speed only.
Models: ``tiny`` and ``small`` (vocabulary 512: the decode loop's overhead shows) and the demo student
(vocabulary 49,152: its LM head and the draw dominate a step).

    .venv/bin/python benchmarks/generate_speed.py [--threads 1] [--repeats 5] [--out benchmarks/results/generate_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillery.generate import sample

MODELS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "demo_student": dict(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,  # configs/demo.yaml
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
PAD = 3


def build(fields: dict, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=PAD, **fields)
    model = LlamaForCausalLM(cfg).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def prompts(batch: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths 16..32: ids (B, 32), mask (B, 32)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(16, 32, batch).round().long().tolist()
    ids = torch.full((batch, 32), PAD)
    mask = torch.zeros(batch, 32, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 32 - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[b, 32 - n:] = 1
    return ids.to(device), mask.to(device)


def _time(fn, device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def timed_pair(fn_a, fn_b, repeats: int, device: str):
    """Median seconds of ``fn_a`` and ``fn_b``, runs interleaved (a, b, a, b, ...) so that a busy shared
    machine slows both alike; one warm-up run each. Returns (t_a, out_a, t_b, out_b)."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        t, out_a = _time(fn_a, device)
        ta.append(t)
        t, out_b = _time(fn_b, device)
        tb.append(t)
    return statistics.median(ta), out_a, statistics.median(tb), out_b


@torch.no_grad()
def bench(name: str, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    fields = MODELS[name]
    model = build(fields, device)
    ids, mask = prompts(batch, fields["vocab_size"], device)
    t_ours, ours, t_hf, ref = timed_pair(
        lambda: sample(model, ids, mask, max_new_tokens=new_tokens, sample_temperature=0.0, eos_token_id=None,
                       pad_token_id=PAD)[0],
        lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=PAD),
        repeats, device)
    # Sampled (temperature 1, no top-k/top-p), as on-policy training draws: speed only, the draws differ by method.
    gen = torch.Generator(device=device)
    t_ours_s, _, t_hf_s, _ = timed_pair(
        lambda: sample(model, ids, mask, max_new_tokens=new_tokens, sample_temperature=1.0, eos_token_id=None,
                       pad_token_id=PAD, generator=gen.manual_seed(0))[0],
        lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD),
        repeats, device)
    generated = batch * new_tokens
    return {"model": name, **{k: fields[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            "parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "new_tokens": new_tokens,
            "sample_s": round(t_ours, 4), "generate_s": round(t_hf, 4),
            "sample_tok_s": round(generated / t_ours, 1), "generate_tok_s": round(generated / t_hf, 1),
            "speedup": round(t_hf / t_ours, 3), "identical_tokens": bool(torch.equal(ours, ref)),
            "sampled_tok_s": round(generated / t_ours_s, 1), "generate_sampled_tok_s": round(generated / t_hf_s, 1),
            "sampled_speedup": round(t_hf_s / t_ours_s, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.batch, args.new_tokens, args.repeats, args.device) for name in MODELS]
    import transformers

    result = {"benchmark": "generate_speed", "device": args.device,
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "load_average_1m": os.getloadavg()[0], "torch": torch.__version__,
              "transformers": transformers.__version__, "greedy": True, "dtype": "float32",
              "timing": f"median of {args.repeats} interleaved runs each, after 1 warm-up", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['model']:>6}: greedy: sample {r['sample_tok_s']:>8.1f} tok/s   generate {r['generate_tok_s']:>8.1f} tok/s   "
              f"x{r['speedup']:.2f}   identical={r['identical_tokens']};   sampled: x{r['sampled_speedup']:.2f}")
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
