"""Does the demo student's BLiMP follow the English it distils on? The teacher's own prose against Shakespeare.

The demo's KD student reaches 52-58 % on BLiMP (the teacher 75.7 %), whatever was varied so far (steps, width, the
embedding table, temperature, hidden states: ``blimp_levers.py``, ``hidden_state_kd.py``). One thing never varied
is the text: the plays (Early Modern English verse) and answers about them, while BLiMP's sentences are plain modern
English. This trains the demo's KD run on two texts of about the same number of tokens, from the same pruned init:

* ``teacher_text``: what the teacher writes when it is given nothing: ``--gen-docs`` samples of up to ``--gen-len``
  tokens after ``<|endoftext|>`` (its pretraining's document separator, the BLiMP prefix too), temperature 1, no
  top-p, seeded per batch (``distillery.generate.sample``), kept in ``<work>/teacher_text.jsonl`` (resumable);
* ``shakespeare``: the bundled plays, cut to the teacher text's token count.

Each arm is the demo's KD recipe (``kd/config.yaml`` of ``--demo-dir``: rate, schedule, ``--steps`` of its blocks)
with ``data.train`` set to the arm's file; the teacher's targets are written first by ``distillery cache`` over it.
Scored: BLiMP on the demo's sample (10 pairs per paradigm, after ``<|endoftext|>``), and the KL to the teacher on the
demo's held-out answers (its validation file, the same for both arms).

    flock /tmp/distillery-bench.lock .venv/bin/python benchmarks/blimp_text.py --demo-dir runs/bench/demo_more_cold \\
        --out benchmarks/results/blimp_text.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


@torch.no_grad()
def teacher_text(teacher, path: Path, docs: int, length: int, batch: int, seed: int = 0) -> list[str]:
    """``docs`` samples of the teacher after ``<|endoftext|>``, ``batch`` at a time; batch ``k`` draws with seed
    ``seed + k`` and is appended to ``path`` (JSONL) as soon as it is done, so a rerun generates only what is missing."""
    from distillery.generate import sample

    tok, model = teacher.tokenizer, teacher.model
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[rec["batch"]] = rec["texts"]
    stops = sorted({sep, tok.eos_token_id})
    t0, new = time.perf_counter(), 0
    with open(path, "a") as fh:
        for k in range((docs + batch - 1) // batch):
            if k in done:
                continue
            n = min(batch, docs - k * batch)
            ids = torch.full((n, 1), sep, dtype=torch.long)
            out, completion = sample(model, ids, torch.ones_like(ids), max_new_tokens=length, sample_temperature=1.0,
                                     eos_token_id=stops, pad_token_id=sep, generator=torch.Generator().manual_seed(seed + k))
            texts = [tok.decode(row[1:][completion[i, 1:].bool()].tolist(), skip_special_tokens=True).strip()
                     for i, row in enumerate(out)]
            fh.write(json.dumps({"batch": k, "texts": texts}) + "\n")
            fh.flush()
            done[k] = texts
            new += int(completion.sum())
            print(f"  teacher text: batch {k + 1}/{(docs + batch - 1) // batch}, {new / (time.perf_counter() - t0):.0f} "
                  "tok/s", flush=True)
    return [t for k in sorted(done) for t in done[k] if t]


def train_arm(recipe: Path, init: Path, run: Path, text: Path, steps: int, cache: Path) -> None:
    """The demo's KD run (its recipe) from ``init`` on ``text`` alone for ``steps`` steps; the teacher's targets over
    ``text`` are written to ``cache`` first (``distillery cache``, the same recipe run live), unless already there."""
    from distillery import train
    from distillery.cache import run_cache
    from distillery.config import load_config

    cfg = load_config(str(recipe), [f'data.train=["{text}"]', f"train.max_steps={steps}", f"student.pretrained={init}",
                                    f"train.output_dir={run}", "train.save_every=0", "train.progress=false"])
    if not (cache / "manifest.json").is_file():
        live = cfg.model_copy(deep=True)
        live.teacher.kind = "hf"
        run_cache(live, str(cache), progress=False)
    cfg.teacher.cache_path = str(cache)
    train.distill(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.demo_folder_args(ap, "blimp_text")
    ap.add_argument("--arms", default="teacher_text,shakespeare")
    ap.add_argument("--gen-docs", type=int, default=640)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=480, help="steps of the demo recipe's blocks (2 a step)")
    args = ap.parse_args()
    demo, work, machine = common.open_demo_folder(args)
    from transformers import AutoModelForCausalLM

    from distillery.demo_chat import write_plain
    from distillery.tasks.blimp import load_pairs, retained_above_chance, score_blimp
    from distillery.teachers import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher("smollm2", device="cpu", dtype="float32")
    tok = teacher.tokenizer
    pairs = load_pairs(per_paradigm=10, seed=0)
    t0 = time.perf_counter()
    texts = teacher_text(teacher, work / "teacher_text.jsonl", args.gen_docs, args.gen_len, args.gen_batch)
    gen_s = time.perf_counter() - t0
    files = {"teacher_text": work / "teacher_text.txt", "shakespeare": work / "shakespeare.txt"}
    files["teacher_text"].write_text("\n\n".join(texts))
    n_tokens = len(tok(files["teacher_text"].read_text())["input_ids"])
    write_plain(files["shakespeare"], 10**9)  # all of the plays, to count
    plays = files["shakespeare"].read_text()
    write_plain(files["shakespeare"], int(len(plays) * min(1.0, n_tokens / len(tok(plays)["input_ids"]))))
    sizes = {k: {"chars": len(f.read_text()), "tokens": len(tok(f.read_text())["input_ids"])} for k, f in files.items()}
    print(f"texts: {sizes}; teacher text generated in {gen_s:.0f} s", flush=True)

    def score(name: str, m) -> dict:
        b = score_blimp(m.eval(), tok, pairs, prefix="<|endoftext|>", progress=False, name=name)
        return {"model": name, "blimp": b["overall"], "per_field": b["per_field"]}

    rows = [score("teacher", teacher.model)]
    del teacher
    for arm in args.arms.split(","):
        run = work / f"{arm}-kd"
        t0 = time.perf_counter()
        if not (run / "student" / "config.json").is_file():
            train_arm(demo / "kd" / "config.yaml", demo / "pruned_init", run, files[arm], args.steps,
                      work / f"targets-{arm}")
        row = score(arm, AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32))
        summary = json.loads((run / "summary.json").read_text())
        row |= {"seconds": time.perf_counter() - t0, "steps": summary["steps"], "text": sizes[arm],
                "heldout_kl": summary["validation"]["kl_teacher_student"],
                "heldout_perplexity": summary["validation"]["student_perplexity"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r in rows:
        r["kept_above_chance"] = retained_above_chance(r["blimp"], rows[0]["blimp"])
    common.write_demo_result("blimp_text", machine, demo, Path(args.out), pairs=len(pairs), prefix="<|endoftext|>",
                             teacher_text={"docs": len(texts), "max_tokens": args.gen_len, "temperature": 1.0,
                                           "seconds": gen_s, "sample": texts[:3]},
                             rows=rows, limits="one BLiMP sample (670 pairs: about ±1.9 points); one seed per arm")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
