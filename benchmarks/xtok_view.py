"""What the teacher view of a student batch costs in the loop (``CrossTokenizer.view``: spell the student's bytes,
re-tokenize them with the teacher, align), on the real pair: the SmolLM2 teacher's tokenizer and a GPT-2 / BPE
student tokenizer, batches of the bundled Shakespeare text.

    python benchmarks/xtok_view.py [--tokenizers gpt2 bpe:8192] [--batch 4] [--seq-len 128] [--reps 20]

Writes ``benchmarks/results/xtok_view.json``: median seconds per batch and microseconds per student token, per
student tokenizer, with the machine described; and ``span_shares``: of the student tokens of the first
``--span-chars`` characters, the share in each kind of span (1↔1, 1↔n: one teacher token over several student tokens,
n↔1, n↔m), which says how much of the text the cross-tokenizer loss reads as next-token rows. Tokenizers only: no
model is loaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, corpus, machine_info, train_bpe_tokenizer, write_json  # noqa: E402


def student_tokenizer(spec: str):
    if spec == "gpt2":
        from distillery.student_tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()
    if spec.startswith("bpe:"):
        return train_bpe_tokenizer(int(spec.split(":", 1)[1]))
    raise SystemExit(f"--tokenizers: '{spec}' is neither gpt2 nor bpe:N")


def main(argv: list[str] | None = None) -> int:
    import torch

    from distillery.config import TeacherConfig
    from distillery.teachers.hf import source_tokenizer
    from distillery.xtok import align_text
    from distillery.xtok.batch import CrossTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", nargs="+", default=["gpt2", "bpe:8192"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--span-chars", type=int, default=60_000)
    ap.add_argument("--out", type=Path, default=RESULTS / "xtok_view.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher_tok = source_tokenizer(TeacherConfig(source="smollm2"))
    text = corpus(max_chars=400_000)
    out = {"benchmark": "xtok_view", "machine": machine_info(sys.argv, threads=1), "teacher": "smollm2",
           "batch": args.batch, "seq_len": args.seq_len, "reps": args.reps, "runs": {}}
    for spec in args.tokenizers:
        s_tok = student_tokenizer(spec)
        x = CrossTokenizer(teacher_tok, s_tok)
        ids = s_tok.encode(text, add_special_tokens=False)
        width = args.seq_len + 1
        times, aligned = [], []
        for r in range(args.reps + 1):  # the first batch pays the one-off tokenizer set-up: not counted
            at = r * args.batch * width
            block = torch.tensor(ids[at:at + args.batch * width]).view(args.batch, width)
            batch = {"input_ids": block[:, :-1], "labels": block[:, 1:],
                     "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long)}
            t0 = time.perf_counter()
            view = x.view(batch)
            if r:
                times.append(time.perf_counter() - t0)
                aligned.append(float((view.alignment.kind != 0).float().mean()))
        med = statistics.median(times)
        kinds = {"1-1": 0, "1-n": 0, "n-1": 0, "n-m": 0}
        for t_lo, t_hi, s_lo, s_hi in align_text(text[:args.span_chars], teacher_tok, s_tok).spans:
            nt, ns = t_hi - t_lo, s_hi - s_lo
            kinds["1-1" if nt == ns == 1 else "1-n" if nt == 1 else "n-1" if ns == 1 else "n-m"] += ns
        out["runs"][spec] = {"seconds_per_batch": med, "us_per_student_token": 1e6 * med / (args.batch * args.seq_len),
                             "aligned_share": statistics.mean(aligned), "student_vocab": len(s_tok),
                             "span_shares": {k: v / max(1, sum(kinds.values())) for k, v in kinds.items()}}
        print(f"{spec}: {med * 1e3:.1f} ms per {args.batch}x{args.seq_len} batch "
              f"({out['runs'][spec]['us_per_student_token']:.1f} us/token), aligned {statistics.mean(aligned):.1%}, "
              f"span shares {', '.join(f'{k} {v:.1%}' for k, v in out['runs'][spec]['span_shares'].items())}")
    write_json(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
