"""Tokens/s of ``distillery.generate.sample`` against transformers' ``model.generate`` on the same batch.

Both run greedy on the same left-padded batch (8 prompts of 16..32 tokens), 64 new tokens, no EOS
(so both produce exactly 64 tokens per row), KV cache on, fp32 weights. The outputs are checked to be equal
token for token against ``generate`` in fp32. Ours runs twice: with the head ``auto`` picks (on a CPU with fast
bf16: the bf16 screen with fp32 rescoring and a certificate, ``distillery.screened_head``, whose tokens are the
fp32 head's) and with the plain fp32 head (``head="plain"``). Each timing is the median of ``--repeats`` runs,
the methods interleaved, after one warm-up run. Then both sample (temperature 1, no top-k / top-p: on-policy
training's draws) on the same batch: speed only. Models: ``tiny`` and ``small`` (vocabulary 512: the decode
loop's overhead shows), ``smollm2_student`` (configs/smollm2_student.yaml: 4 layers, d = 256) and
``demo_student`` (the demo's pruned student: 8 layers, d = 384, 31.9M; the trained weights of
``--demo-student`` when that folder exists, else random init); vocabulary 49,152 for both: the LM head
dominates a step.

    .venv/bin/python benchmarks/generate_speed.py [--threads 1] [--repeats 7] [--out benchmarks/results/generate_speed.json]
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
from distillery.static_decode import StaticDecoder

MODELS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "smollm2_student": dict(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "demo_student": dict(vocab_size=49152, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,  # pruned demo
                         num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True),
}
DEMO_STUDENT = Path(__file__).resolve().parents[1] / "runs" / "bench" / "demo" / "kd" / "student"
DECODERS: list = []  # every StaticDecoder sample() builds (for the screen's certificate counts)
PAD = 3


def build(fields: dict, device: str, weights: Path | None = None) -> LlamaForCausalLM:
    """The model of ``fields``, random init (seed 0), or with the weights of the HF folder ``weights``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=PAD, **fields)
    model = LlamaForCausalLM(cfg)
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights / "model.safetensors")), strict=False)  # tied head: no lm_head key
        model.tie_weights()
    model = model.to(device).eval()
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


def timed(fns: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Median seconds of each function, runs interleaved (a, b, c, a, b, c, ...) so that a busy shared machine
    slows all alike; one warm-up run each. Returns ({name: seconds}, {name: last output})."""
    for fn in fns.values():
        fn()
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, outs[k] = _time(fn, device)
            times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


@torch.no_grad()
def bench(name: str, batch: int, new_tokens: int, repeats: int, device: str, weights: Path | None) -> dict:
    fields = MODELS[name]
    model = build(fields, device, weights)
    ids, mask = prompts(batch, fields["vocab_size"], device)
    ours = lambda head, T, gen=None: sample(model, ids, mask, max_new_tokens=new_tokens, sample_temperature=T,
                                            eos_token_id=None, pad_token_id=PAD, head=head, generator=gen)[0]
    DECODERS.clear()
    t, out = timed({"ours": lambda: ours("auto", 0.0), "ours_plain_head": lambda: ours("plain", 0.0),
                    "generate": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                       do_sample=False, pad_token_id=PAD)}, repeats, device)
    screens = list({id(d.screen): d.screen for d in DECODERS if d.screen is not None}.values())  # reused between calls
    # Sampled (temperature 1, no top-k/top-p), as on-policy training draws: speed only, the draws differ by method.
    gen = torch.Generator(device=device)
    ts, _ = timed({"ours": lambda: ours("auto", 1.0, gen.manual_seed(0)),
                   "generate": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                      pad_token_id=PAD)}, repeats, device)
    generated = batch * new_tokens
    return {"model": name, **{k: fields[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            "weights": str(weights) if weights else "random init (seed 0)",
            "parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "new_tokens": new_tokens,
            "head": "bf16 screen + fp32 rescoring (certified)" if screens else "fp32 (packed)",
            "sample_s": round(t["ours"], 4), "sample_plain_head_s": round(t["ours_plain_head"], 4),
            "generate_s": round(t["generate"], 4),
            "sample_tok_s": round(generated / t["ours"], 1), "sample_plain_head_tok_s": round(generated / t["ours_plain_head"], 1),
            "generate_tok_s": round(generated / t["generate"], 1),
            "speedup": round(t["generate"] / t["ours"], 3), "speedup_plain_head": round(t["generate"] / t["ours_plain_head"], 3),
            "identical_tokens": bool(torch.equal(out["ours"], out["generate"])),
            "identical_tokens_plain_head": bool(torch.equal(out["ours_plain_head"], out["generate"])),
            "screen_rows_certified": sum(x.rows_screened for x in screens),
            "screen_rows_fallback": sum(x.rows_fallback for x in screens),
            "sampled_tok_s": round(generated / ts["ours"], 1), "generate_sampled_tok_s": round(generated / ts["generate"], 1),
            "sampled_speedup": round(ts["generate"] / ts["ours"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--demo-student", default=str(DEMO_STUDENT), help="HF folder with the demo student's trained weights")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    real_init = StaticDecoder.__init__

    def collect(self, *a, **k):  # record each decoder (its screen counts certified and fallback rows)
        real_init(self, *a, **k)
        DECODERS.append(self)

    StaticDecoder.__init__ = collect
    demo = Path(args.demo_student)
    rows = [bench(name, args.batch, args.new_tokens, args.repeats, args.device,
                  demo if name == "demo_student" and (demo / "model.safetensors").is_file() else None)
            for name in (args.models.split(",") if args.models else MODELS)]
    import transformers

    from distillery.hardware import cpu_bf16_report

    result = {"benchmark": "generate_speed", "device": args.device,
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "load_average_1m": os.getloadavg()[0], "torch": torch.__version__,
              "transformers": transformers.__version__, "greedy": True, "dtype": "float32 weights; generate in fp32",
              "cpu_bf16_probe": cpu_bf16_report(), "load_average_end": os.getloadavg(),
              "command": "python " + " ".join(sys.argv),
              "timing": f"median of {args.repeats} interleaved runs each, after 1 warm-up", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['model']:>15}: greedy: sample {r['sample_tok_s']:>8.1f} tok/s (plain head {r['sample_plain_head_tok_s']:.1f})"
              f"   generate {r['generate_tok_s']:>8.1f} tok/s   x{r['speedup']:.2f} (plain head x{r['speedup_plain_head']:.2f})"
              f"   identical={r['identical_tokens']}/{r['identical_tokens_plain_head']}"
              f" (screen: {r['screen_rows_certified']} certified, {r['screen_rows_fallback']} fallback);"
              f"   sampled: x{r['sampled_speedup']:.2f}")
    return 0 if all(r["identical_tokens"] and r["identical_tokens_plain_head"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
