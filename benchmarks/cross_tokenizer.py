"""Cross-tokenizer distillation quality, and TRL's GOLD side by side (issue 15).

    .venv/bin/python benchmarks/cross_tokenizer.py [--quick | --size medium|full] [--tokenizers gpt2,bpe:8192]
        [--init random|pruned] [--arms exact_kl,gold_trl,ce,seqkd] [--speed-rounds N] [--set SECTION.KEY=VALUE]

Teacher SmolLM2-135M-Instruct (49,152 tokens). Students: the demo shape (4 layers, d=256, FFN 768, 4 heads / 2 KV,
tied) with (1) GPT-2's 50,257-token vocabulary and (2) a byte-level BPE of 8,192 tokens trained on the training
text; one saved random init per tokenizer, so every arm of a tokenizer starts from the same weights. ``--init pruned``:
each tokenizer's saved init is instead the teacher pruned once to ``distillery demo``'s student (8 layers, d=384,
FFN 1,024, 6 query / 3 KV heads, tied; calibrated as the demo does, on 4 x 4 blocks of 256 teacher tokens of the
training text) and then given that tokenizer's vocabulary by embedding transplant (``distillery.xtok.transplant``;
``--student tiny``: 1 layer, d=32, for tests; ``xtok_inits.py``). Arms, at equal
training text (the same ``steps x batch`` blocks of ``seq_len`` student tokens, one pass, same lr / AdamW / warm-up +
cosine schedule, precision from ``distillery.hardware.cpu_bf16_fast``):

* ``ce``: cross-entropy on the text;
* ``seqkd``: sequence-level KD (Kim & Rush 2016): for each training block, the teacher continues a prompt of the
  first ``SEQKD_PROMPT`` teacher tokens of an evenly spaced training-text position by sampling ``seq_len`` new
  tokens at temperature 1 (``model.generate``, no top-k/top-p: an unbiased sample of the teacher), generated once
  and cached in the work folder; each document = prompt + continuation; the student trains with CE on those
  documents, packed into the same number of ``seq_len`` blocks;
* ``exact_kl`` / ``uld`` / ``gold``: cross-tokenizer KD through the loop (``loss.xtok_method``, span term weight 1),
  ``kd_weight`` 1 plus CE at ``--ce-weight``;
* ``gold_trl``: TRL's GOLDTrainer (off-policy, lmbda 0; ULD hybrid: JSD beta 0.5 on matched tokens + ULD on the
  rest, extended byte-offset alignment; CE at ``--ce-weight``) on the same blocks, as prompt (first token) /
  completion (rest) pairs (``xtok_systems.gold_records``).

Metrics: bits per byte (held-out Shakespeare chunks never trained on, and Milton's *Paradise Lost*), each model on
its own tokenization of the same documents (``xtok_eval.bits_per_byte``; special-token labels excluded); the aligned KL and
top-1 from the loop's final validation; BLiMP accuracy on ``--blimp-per-paradigm`` pairs per paradigm; tok/s
(student tokens, steady state) and peak RSS of every training process; with ``--speed-rounds N``, our first KD arm
and GOLD alternated N times for the tok/s ratio (:func:`speed_rounds`). Writes
``benchmarks/results/cross_tokenizer.json`` (``cross_tokenizer_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import xtok_inits  # noqa: E402
from xtok_eval import evaluate_model  # noqa: E402
import xtok_report  # noqa: E402

ARMS = ["exact_kl", "gold_trl", "gold", "uld", "ce", "seqkd"]  # run order: the peer between ours
XTOK = ("exact_kl", "uld", "gold")
SIZES = {  # steps, micro batch, seq_len, held-out chars, Milton chars, BLiMP pairs per paradigm
    "full": (100, 8, 128, 24_000, 24_000, 10),
    "medium": (24, 4, 128, 8_000, 8_000, 2),
    "quick": (3, 2, 64, 2_000, 2_000, 1),
}
DEMO_STUDENT = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "tie_word_embeddings": True}
TINY_STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                "tie_word_embeddings": True}
CHUNK, HELDOUT_EVERY, SEQKD_PROMPT = 4000, 40, 16


# ----------------------------------------------------------------------------- data
def split_text(text: str, heldout_chars: int) -> tuple[list[str], list[str]]:
    """``CHUNK``-character pieces cut at line ends; every ``HELDOUT_EVERY``-th piece (from the 20th on) is held out
    (the first ones until ``heldout_chars`` are used, the rest dropped), all others are training text."""
    pieces, at = [], 0
    while at < len(text):
        end = text.find("\n", at + CHUNK)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[at:end])
        at = end
    train, held, used = [], [], 0
    for i, p in enumerate(pieces):
        if i % HELDOUT_EVERY == HELDOUT_EVERY // 2:
            if used < heldout_chars:
                held.append(p[:heldout_chars - used])
                used += len(held[-1])
        else:
            train.append(p)
    return train, held


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prepare_text(args, work: Path, size) -> dict:
    text = common.corpus("shakespeare8")
    if args.corpus_chars:
        text = text[:args.corpus_chars]
    train, held = split_text(text, size[3])
    milton = common.corpus("paradise_lost")
    start = min(20_000, len(milton) // 4)  # past the front matter
    return {"train": str(write_jsonl(work / "train.jsonl", train)), "heldout": str(write_jsonl(work / "heldout.jsonl", held)),
            "milton": str(write_jsonl(work / "milton.jsonl", [milton[start:start + size[4]]])),
            "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held))}


def seqkd_data(teacher, files: dict, n: int, new_tokens: int, work: Path, seed: int = 0) -> dict:
    """The teacher's continuations (module docstring), cached in ``work`` by (n, new_tokens, seed, teacher)."""
    import torch

    key = f"seqkd_{n}x{new_tokens}_s{seed}_{teacher.name.replace('/', '_')}"
    path, meta = work / f"{key}.jsonl", work / f"{key}.json"
    if path.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    tok, model = teacher.tokenizer, teacher.model
    text = "".join(json.loads(ln)["text"] for ln in Path(files["train"]).read_text().splitlines())
    step = max(1, (len(text) - 2000) // n)
    prompts = []
    for i in range(n):  # prompts start at a line start: the text's own rhythm, not a cut word
        at = text.find("\n", i * step) + 1
        ids = tok(text[at:at + 400], add_special_tokens=False)["input_ids"][:SEQKD_PROMPT]
        prompts.append(ids)
    torch.manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    docs, t0, made = [], time.perf_counter(), 0
    for lo in range(0, n, 64):  # large groups: decoding a 30-layer model is per-step overhead on a CPU
        group = prompts[lo:lo + 64]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])  # left padding for generate
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        for p, row in zip(group, out[:, width:].tolist()):
            made += len(row)
            docs.append(tok.decode(p) + tok.decode(row, skip_special_tokens=True))
    write_jsonl(path, docs)
    info = {"file": str(path), "documents": n, "prompt_tokens": SEQKD_PROMPT, "new_tokens": new_tokens,
            "sampling": "temperature 1.0, top_k 0, top_p 1.0 (min_new_tokens = max_new_tokens)", "seed": seed,
            "generated_tokens": made, "seconds": time.perf_counter() - t0,
            "generate_tok_s": made / max(time.perf_counter() - t0, 1e-9)}
    meta.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- students and recipes
def recipe(args, size, arm: str, init: str, files: dict, seqkd: dict | None, out_dir: Path, precision: str) -> dict:
    steps, batch, seq = size[:3]
    xt = arm in XTOK or arm == "gold_trl"
    loss = {"kd_weight": 1.0 if xt else 0.0, "ce_weight": args.ce_weight if xt else 1.0,
            "xtok_method": arm if arm in XTOK else "exact_kl", "xtok_span_weight": 1.0}
    train_file = seqkd["file"] if arm == "seqkd" else files["train"]
    return {"teacher": {"source": args.teacher, "dtype": "bfloat16" if precision == "bf16" else "float32"},
            "student": {"init": "pretrained", "pretrained": init, "tokenizer": init},
            "data": {"train": [train_file], "validation": [files["heldout"]], "seq_len": seq,
                     "max_train_blocks": steps * batch, "max_val_blocks": batch, "seed": args.seed},
            "loss": loss,
            "train": {"output_dir": str(out_dir), "max_steps": steps, "micro_batch_size": batch, "lr": args.lr,
                      "warmup_steps": max(1, steps // 10), "eval_every": 0, "eval_batches": 1, "save_every": 0,
                      "log_every": 1, "progress": False, "seed": args.seed, "mixed_precision": precision}}


def with_overrides(r: dict, sets: list[str]) -> dict:
    """``--set section.key=value`` (YAML value) on our arms' recipes, e.g. ``loss.loss_temperature=2``."""
    import yaml

    for item in sets:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section in r):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {sorted(r)}")
        r[section][name] = yaml.safe_load(value)
    return r


def arms_for(args, tname: str) -> list[str]:
    """The arms of one student tokenizer, in ``ARMS`` order: ``--tokenizer-arms NAME=a,b;…`` or ``--arms``."""
    chosen = args.arms.split(",")
    for part in filter(None, (args.tokenizer_arms or "").split(";")):
        name, _, arms = part.partition("=")
        if name.strip().replace(":", "") == tname:
            chosen = arms.split(",")
    return [a for a in ARMS if a in chosen and (a != "gold_trl" or tname in args.gold_tokenizers.split(","))]


def train_arm(args, size, tname: str, arm: str, init: str, files: dict, seqkd, work: Path, precision: str,
              teacher_dir: str, fused: bool = True, steps: int | None = None, tag: str = "") -> dict:
    """One arm in its own process (``xtok_systems.py``): its result with tok/s, load before/after and the recipe."""
    out_dir = work / "runs" / f"{tname}_{arm}{'' if fused else '_reference'}{tag}"
    shutil.rmtree(out_dir, ignore_errors=True)  # an arm always starts afresh (an earlier, stopped run's folder)
    r = recipe(args, size, arm, init, files, seqkd, out_dir, precision)
    if arm in XTOK:
        r = with_overrides(r, args.set)
    if steps:
        r["train"]["max_steps"] = steps
    spec = {"system": "gold_trl" if arm == "gold_trl" else "ours", "recipe": r, "threads": args.threads,
            "out_dir": str(out_dir), "student_init": init, "teacher_dir": teacher_dir, "ce_weight": args.ce_weight,
            "xtok_fused": fused}
    load0 = common.loadavg()
    print(f"[xtok] {tname} {arm}{'' if fused else ' (reference loss path)'} ...", flush=True)
    res = common.run_child(Path(__file__).with_name("xtok_systems.py"), spec, threads=args.threads,
                           log=work / "children.log", timeout=args.timeout)
    res.update(load_before=load0, load_after=common.loadavg(), recipe=r)
    if "step_seconds" in res:
        res["tok_s"] = common.steady_tok_s(res["step_seconds"], res["tokens_per_step"], skip=args.warmup_skip)
    print(f"[xtok] {tname} {arm}: {res.get('error') or round(res.get('tok_s') or 0, 1)} tok/s", flush=True)
    return res


def train_all(args, size, inits: dict, files: dict, seqkd, work: Path, precision: str, teacher_dir: str) -> dict:
    runs: dict = {}
    for tname, init in inits.items():
        for arm in arms_for(args, tname):
            runs[f"{tname}/{arm}"] = train_arm(args, size, tname, arm, init, files, seqkd, work, precision, teacher_dir)
    return runs


def speed_fix(args, size, inits: dict, files: dict, work: Path, precision: str, teacher_dir: str) -> dict:
    """``--speed-steps N``: the first tokenizer's ``--speed-methods`` arms for N steps through the loss's reference
    path (autograd per chunk under checkpointing: the loss before xtok.fused) and through the fused path, alternated
    in this run: seconds per step of each (after ``--warmup-skip``) and their ratio."""
    tname, init = next(iter(inits.items()))
    out = {"steps": args.speed_steps, "tokenizer": tname, "methods": {}}
    for method in args.speed_methods.split(","):
        row = {}
        for fused in (False, True):
            res = train_arm(args, size, tname, method, init, files, None, work, precision, teacher_dir, fused=fused,
                            steps=args.speed_steps)
            secs = res.get("step_seconds") or []
            row["fused" if fused else "reference"] = {
                "step_seconds": secs, "s_per_step": (sum(secs[args.warmup_skip:]) / max(len(secs) - args.warmup_skip, 1)
                                                     if secs else None),
                "losses": res.get("losses"), "load_before": res.get("load_before"), "error": res.get("error")}
            shutil.rmtree(work / "runs" / f"{tname}_{method}{'' if fused else '_reference'}", ignore_errors=True)
        ref, new = row["reference"]["s_per_step"], row["fused"]["s_per_step"]
        row["speedup"] = ref / new if ref and new else None
        out["methods"][method] = row
    return out


def speed_rounds(args, size, inits: dict, files: dict, work: Path, precision: str, teacher_dir: str) -> dict | None:
    """``--speed-rounds N``: the first tokenizer's first cross-tokenizer KD arm and TRL's GOLD, ``--speed-round-steps``
    steps each, alternated N times (ours, GOLD, ours, GOLD, ...), each in its own process: tok/s of every run and the
    ratio of each round. Why: on this shared machine the speed of a whole arm moves by up to a quarter from one run
    to the next (the same arm measured 308 and 387 tok/s in two runs of this benchmark), so one arm after the other
    is a noisy ratio; alternating short runs and taking the median ratio is the fair one (BENCHMARKS.md)."""
    tname, init = next(iter(inits.items()))
    ours = next((a for a in arms_for(args, tname) if a in XTOK), None)
    if not args.speed_rounds or ours is None or "gold_trl" not in arms_for(args, tname):
        return None
    out = {"tokenizer": tname, "arm": ours, "steps": args.speed_round_steps, "ours_tok_s": [], "gold_tok_s": [],
           "ratios": []}
    for i in range(args.speed_rounds):
        got = {}
        for arm in (ours, "gold_trl"):
            res = train_arm(args, size, tname, arm, init, files, None, work, precision, teacher_dir,
                            steps=args.speed_round_steps, tag=f"_speed{i}")
            got[arm] = res.get("tok_s")
            shutil.rmtree(work / "runs" / f"{tname}_{arm}_speed{i}", ignore_errors=True)
        out["ours_tok_s"].append(got[ours])
        out["gold_tok_s"].append(got["gold_trl"])
        out["ratios"].append(got[ours] / got["gold_trl"] if got[ours] and got["gold_trl"] else None)
    ratios = [r for r in out["ratios"] if r]
    out["median_ratio"] = statistics.median(ratios) if ratios else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 steps of 2 x 64 tokens: a smoke run, not a result")
    ap.add_argument("--size", choices=("full", "medium"), default="medium")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tokenizers", default="gpt2,bpe:8192", help="student tokenizers (student.tokenizer values)")
    ap.add_argument("--gold-tokenizers", default="gpt2,bpe8192", help="which students also train with TRL GOLD")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tokenizer-arms", default=None,
                    help="per-tokenizer arms, e.g. 'bpe:8192=ce,seqkd,exact_kl' (';' between tokenizers); else --arms")
    ap.add_argument("--seqkd-docs", type=int, default=None,
                    help="teacher continuations for seq-KD (default steps x batch, one per block; fewer = reuse a "
                         "cached set, the seqkd arm then sees each one more than once)")
    ap.add_argument("--speed-steps", type=int, default=0,
                    help="first run --speed-methods for N steps through the reference and the fused loss path")
    ap.add_argument("--speed-methods", default="exact_kl")
    ap.add_argument("--speed-rounds", type=int, default=0,
                    help="after training: our first KD arm and GOLD alternated N times, --speed-round-steps each "
                         "(the tok/s ratio that one-after-the-other arms on a shared machine cannot give)")
    ap.add_argument("--speed-round-steps", type=int, default=24)
    ap.add_argument("--teacher", default="smollm2", help="teacher.source (tests: a tiny model folder)")
    ap.add_argument("--student", choices=("demo", "tiny"), default="demo")
    ap.add_argument("--init", choices=("random", "pruned"), default="random",
                    help="every arm's start: a random init of --student's shape, or the teacher pruned to the demo "
                         "student's shape and transplanted to each tokenizer's vocabulary")
    ap.add_argument("--corpus-chars", type=int, default=None, help="use only the first N characters of Shakespeare")
    ap.add_argument("--lr", type=float, default=2e-3, help="the same for every arm and for GOLD")
    ap.add_argument("--ce-weight", type=float, default=1.0, help="CE weight beside KD (ours and GOLD's)")
    ap.add_argument("--blimp-per-paradigm", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe field of our cross-tokenizer KD arms (not CE, seq-KD or GOLD), "
                         "e.g. loss.xtok_span_weight=0; repeatable; recorded in the JSON's config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-skip", type=int, default=1, help="steps left out of tok/s")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work-dir", default=str(common.ROOT / "runs" / "bench" / "cross_tokenizer"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        ap.error(f"--arms: unknown arm(s) {', '.join(unknown)} (choose from {', '.join(ARMS)})")
    import torch

    from distillery.hardware import cpu_bf16_fast
    from distillery.teachers import load_teacher
    from distillery.teachers.hf import resolve_source

    torch.set_num_threads(args.threads)
    size = list(SIZES["quick" if args.quick else args.size])
    size[0] = args.steps or size[0]
    blimp_n = args.blimp_per_paradigm or size[5]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    machine = common.machine_info(threads=args.threads)
    t_start = time.perf_counter()
    precision = "bf16" if cpu_bf16_fast() else "no"
    files = prepare_text(args, work, size)
    teacher = load_teacher(args.teacher, dtype="bfloat16" if precision == "bf16" else "float32")
    teacher_dir = resolve_source(args.teacher)[0]
    inits, init_info = xtok_inits.make_inits(args, teacher, files, work,
                                             TINY_STUDENT if args.student == "tiny" else DEMO_STUDENT)
    want_seqkd = any("seqkd" in arms_for(args, t) for t in inits)
    seqkd = (seqkd_data(teacher, files, args.seqkd_docs or size[0] * size[1], size[2], work, args.seed)
             if want_seqkd else None)
    t_eval = evaluate_model(teacher.model, teacher.tokenizer, files, size[2], blimp_n, "teacher")
    del teacher
    speed = speed_fix(args, size, inits, files, work, precision, teacher_dir) if args.speed_steps else None
    runs = train_all(args, size, inits, files, seqkd, work, precision, teacher_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for key, res in runs.items():
        if res.get("student_dir") and Path(res["student_dir"], "config.json").is_file():
            m = AutoModelForCausalLM.from_pretrained(res["student_dir"], dtype=torch.float32)
            res["eval"] = evaluate_model(m, AutoTokenizer.from_pretrained(res["student_dir"]), files, size[2], blimp_n, key)
            res["parameters"] = sum(p.numel() for p in m.parameters())
    rounds = speed_rounds(args, size, inits, files, work, precision, teacher_dir)
    machine["load_average_end"] = common.loadavg()
    result = {"benchmark": "cross_tokenizer", "quick": args.quick, "size": "quick" if args.quick else args.size,
              "machine": machine, "precision": precision, "cpu_bf16_fast": precision == "bf16",
              "config": {"steps": size[0], "micro_batch": size[1], "seq_len": size[2], "lr": args.lr,
                         "ce_weight_with_kd": args.ce_weight, "kd_arm_overrides": args.set,
                         "blimp_per_paradigm": blimp_n, "teacher": args.teacher,
                         "init": args.init, "student": args.student,
                         "student_shape": ((TINY_STUDENT if args.student == "tiny" else DEMO_STUDENT)
                                           if args.init == "random" else
                                           {k: v for k, v in next(iter(init_info.values()))["shape"].items()
                                            if k != "vocab_size"}),
                         "inits": init_info,
                         "tokenizers": args.tokenizers.split(","),
                         "arms": {t.replace(":", ""): arms_for(args, t.replace(":", "")) for t in args.tokenizers.split(",")}},
              "data": files, "seqkd": seqkd, "teacher": t_eval, "speed_fix": speed, "speed_rounds": rounds,
              "runs": {k: xtok_report.slim(v) for k, v in runs.items()},
              "seconds": time.perf_counter() - t_start}
    result["summary"] = xtok_report.summary(result)
    result["verdicts"] = xtok_report.verdicts(result)
    result["limits"] = xtok_report.limits(result)
    out = Path(args.out or common.RESULTS / ("cross_tokenizer_quick.json" if args.quick else "cross_tokenizer.json"))
    common.write_json(result, out)
    print(json.dumps({"summary": result["summary"], "verdicts": result["verdicts"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
