"""The deviation measurement of ``benchmarks/cache.py``: forward KL (and its gradient w.r.t. the student's
logits) from sparse teacher targets against the dense live teacher, per k, log-prob encoding and
sampled-tail scheme (the method is described in ``benchmarks/cache.py``'s docstring).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from distillery.cache.codec import Encoding, to_sparse
from distillery.cache.sampling import tail_uniforms
from distillery.losses import forward_kl
from distillery.targets import TeacherTargets

KS = (8, 16, 32, 64, 128)
SCHEMES = ((8, 8), (16, 16), (24, 8), (8, 24), (32, 32))  # sampled tail: (k_top, m)
TAIL_SEED = 0
ENCODINGS = ("float32", "float16", "sqrt_u16", "sqrt_u8")  # float32 = truncation only, nothing stored
T = 256
CHUNK = 512  # rows per KL chunk: bounds memory at a few (512, 49152) tensors


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


def scheme_name(k_top: int, m: int) -> str:
    return f"{k_top}+{m}"


def sampled_targets(t_logits, k_top: int, m: int, uniforms) -> tuple:
    """The writer's sparse form with a sampled tail for ``(n, V)`` logits, decoded through the sqrt_u8 codec."""
    ids, lp, tail, s_ids, s_lp = to_sparse(t_logits[None], k_top, 1.0, 49_152, tail_samples=m, uniforms=uniforms[None])
    enc = Encoding.choose(49_152)
    dlp, dtail = codec_round_trip("sqrt_u8", lp[0], tail[0])
    ds_lp = torch.from_numpy(enc.decode_logprobs(enc.encode_logprobs(s_lp[0].numpy())))
    raw = (ids[0].to(torch.int32), lp[0], tail[0], s_ids[0].to(torch.int32), s_lp[0])  # float32, to write the caches from
    return TeacherTargets(topk_ids=ids, topk_logprobs=dlp[None], tail_logprob=dtail[None], sample_ids=s_ids,
                          sample_logprobs=ds_lp[None], loss_temperature=1.0), raw


def sampled_grad_sq(t: TeacherTargets, q, p) -> torch.Tensor:
    """``||g_sampled - (q - p)||^2`` summed over rows: g = q (Σp_k + p_tail) − p_k at the top-k − p_tail/m per draw."""
    ids, lp, s_ids = t.topk_ids[0], t.topk_logprobs[0], t.sample_ids[0]
    p_hat, p_t = lp.exp(), t.tail_logprob[0].exp()
    g = q * (p_hat.sum(-1) + p_t)[:, None]
    g.scatter_add_(-1, ids, -p_hat)
    g.scatter_add_(-1, s_ids, (-p_t / s_ids.shape[-1])[:, None].expand(-1, s_ids.shape[-1]).contiguous())
    return ((g - q + p) ** 2).sum(dtype=torch.float64)


@torch.no_grad()
def measure_deviation(teacher, studs, ds, batch_size: int) -> tuple[dict, dict]:
    """One pass: teacher and student logits per batch, live vs cached KL for every k and encoding."""
    sums: dict = {}
    stash = {"ids": [], "lp": []}  # top-128 float32 per position, to write the caches afterwards
    sampled_stash = {sch: [] for sch in SCHEMES}  # the sampled-tail schemes' float32 targets
    per_batch: dict = {}  # (student, scheme) -> [(cache sum, live sum)] per batch
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
        uniforms = {m: tail_uniforms(TAIL_SEED, batch["index"], T, m).reshape(-1, m) for m in {m for _, m in SCHEMES}}
        batch_sums: dict = {}
        for r0 in range(0, t_logits.shape[0], CHUNK):
            tlp = torch.log_softmax(t_logits[r0:r0 + CHUNK].float(), -1)
            p = tlp.exp()
            top_lp, top_ids = tlp.topk(max(KS), -1)
            stash["ids"].append(top_ids.to(torch.int32))
            stash["lp"].append(top_lp)
            sparse = {k: topk_slice(top_ids, top_lp, k) for k in KS}
            sampled = {}
            for k_top, m in SCHEMES:
                tt, raw = sampled_targets(t_logits[r0:r0 + CHUNK], k_top, m, uniforms[m][r0:r0 + CHUNK])
                sampled[(k_top, m)] = tt
                sampled_stash[(k_top, m)].append(raw)
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
                batch_sums[(name, "live")] = batch_sums.get((name, "live"), 0.0) + float(live_kl.sum())
                for sch, tt in sampled.items():
                    kl = forward_kl(sl[r0:r0 + CHUNK].float()[None], tt)[0]  # distillery.losses on the decoded targets
                    add((name, sch), kl.sum())
                    add((name, sch, "abs"), (kl - live_kl).abs().sum())
                    add((name, sch, "grad_sq"), sampled_grad_sq(tt, q, p))
                    batch_sums[(name, sch)] = batch_sums.get((name, sch), 0.0) + float(kl.sum())
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
        for name in studs:
            for sch in SCHEMES:
                per_batch.setdefault((name, sch), []).append((batch_sums[(name, sch)], batch_sums[(name, "live")]))
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
        sch_rows = {}
        for sch in SCHEMES:
            k_top, m = sch
            devs = np.array([100 * (c - lv) / lv for c, lv in per_batch[(name, sch)]])
            sch_rows[scheme_name(*sch)] = {
                "bytes_per_position": Encoding.choose(49_152).bytes_per_position(k_top, m),
                "deviation_percent": round(100 * (sums[(name, sch)] - live) / live, 3),
                "per_batch_deviation_percent": {"batches": len(devs), "blocks_per_batch": batch_size,
                                                "min": round(float(devs.min()), 3), "max": round(float(devs.max()), 3),
                                                "std": round(float(devs.std(ddof=1)), 3) if len(devs) > 1 else None,
                                                "values": [round(float(d), 3) for d in devs]},
                "mean_abs_position_err_percent": round(100 * sums[(name, sch, "abs")] / live, 2),
                "grad_rel_err_per_position": round(float(np.sqrt(sums[(name, sch, "grad_sq")] / sums[(name, "live_grad_sq")])), 4),
            }
        result[name] = {"live_mean_kl_nats": round(live / sums[(name, "n")], 4), "deviation_percent": rows,
                        "sampled_tail": sch_rows}
    result["teacher"] = {"mean_entropy_nats": round(sums["teacher_entropy"] / sums["positions"], 4),
                         "mean_tail_mass": {f"k={k}": round(sums[("tail_mass", k)] / sums["positions"], 4) for k in KS}}
    times["teacher_forward_tok_per_s"] = round(times["tokens"] / times["teacher_s"], 1)
    stash = {"ids": torch.cat(stash["ids"]).view(len(ds), T, -1), "lp": torch.cat(stash["lp"]).view(len(ds), T, -1)}
    for sch, parts in sampled_stash.items():
        stash[sch] = tuple(torch.cat([pt[i] for pt in parts]).view(len(ds), T, -1) for i in range(5))
    return result, {"stash": stash, **times}
