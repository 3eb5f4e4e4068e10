"""The distillation loss alone: naive full-vocabulary loss vs distillery's fused chunked loss.

For each vocabulary V, each loss (JSD β=0.5 and forward KL, τ = 1) and each method, one fresh
subprocess builds the same seeded inputs — student hidden states ``(N, H)`` and LM head ``(V, H)``
(both requiring grad), teacher logits ``(N, V)``, labels with no masked position — then runs
forward + backward once and reports:

* **peak memory**: the rise of the process's peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` after the inputs exist; a 2 ms RSS sampler if that is not allowed)
  above its RSS before the call, so inputs and imports are not counted;
* **time**: wall time of forward + backward (first call in the process: page faults included, as in
  a training step);
* **difference**: max |Δ| of the loss and of the gradients w.r.t. hidden and LM head, chunked vs naive.

Methods: ``naive`` = :func:`distillery.losses.distill_loss_full` (materialised ``(N, V)`` logits,
autograd); ``chunked`` = :func:`distillery.losses.chunked_distill_loss`; ``trl`` = materialised
logits + TRL's ``GKDTrainer.generalized_jsd_loss`` (only when trl is installed; β = 0 for forward KL).
Runs are alternated (naive, chunked, trl, naive, …) ``--repeats`` times; the median time is reported.
A method whose estimated peak would not fit in the available memory is skipped, with the reason.

    .venv/bin/python benchmarks/loss_memory.py [--quick] [--repeats 2] [--chunk-size 256] [--threads 2]

writes ``benchmarks/results/loss_memory.json`` (``loss_memory_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

FULL = {"vocabs": [49_152, 128_256], "rows": 2_048, "hidden": 576}
QUICK = {"vocabs": [8_192, 32_768], "rows": 1_024, "hidden": 128}
LOSSES = {"jsd_b0.5": ("jsd", 0.5), "forward_kl": ("forward_kl", 0.0)}


# ----------------------------------------------------------------------------- one measurement (child)
def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _inputs(vocab: int, rows: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1, rows, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)  # (1, N, H)
    w = (torch.randn(vocab, hidden, generator=g) * 2.0).requires_grad_(True)  # (V, H): logits of O(2)
    teacher = torch.randn(1, rows, vocab, generator=g) * 2.0  # (1, N, V)
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    return h, w, teacher, labels


def _run(method: str, kd: str, beta: float, h, w, teacher, labels, chunk_size: int):
    from distillery.losses import chunked_distill_loss, distill_loss_full

    n = float(labels.numel())
    if method == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        logits = torch.nn.functional.linear(h, w)  # (1, N, V)
        loss = GKDTrainer.generalized_jsd_loss(logits, teacher, labels, beta=beta if kd == "jsd" else 0.0,
                                               reduction="sum") / n
    else:
        fn = chunked_distill_loss if method == "chunked" else distill_loss_full
        loss, _ = fn(h, w, teacher, labels, kd=kd, beta=beta, loss_temperature=1.0, kd_weight=1.0,
                     ce_weight=0.0, n_tokens=n, chunk_size=chunk_size)
    loss.backward()
    return loss


def child(args) -> None:
    torch.set_num_threads(args.threads)
    import distillery.losses  # noqa: F401  (imports before the baseline)
    if args.method == "trl":
        import trl.experimental.gkd.gkd_trainer  # noqa: F401
    kd, beta = LOSSES[args.loss]
    h, w, teacher, labels = _inputs(args.vocab, args.rows, args.hidden)
    peak = {"sampled": 0}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        sampler = None
    except OSError:
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["sampled"] = max(peak["sampled"], _status_kib("VmRSS"))
                time.sleep(0.002)
        sampler = threading.Thread(target=sample, daemon=True)
    base = _status_kib("VmRSS")
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    loss = _run(args.method, kd, beta, h, w, teacher, labels, args.chunk_size)
    seconds = time.perf_counter() - t0
    if sampler is not None:
        stop.set()
        sampler.join()
        high = peak["sampled"]
    else:
        high = _status_kib("VmHWM")
    if args.save:
        torch.save({"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}, args.save)
    print(json.dumps({"seconds": seconds, "peak_rss_increase_bytes": (high - base) * 1024,
                      "loss": float(loss), "peak_method": "sampled" if sampler is not None else "VmHWM"}))


# ----------------------------------------------------------------------------- driver (parent)
def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def available_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def estimate_peak(method: str, kd: str, vocab: int, rows: int, hidden: int, chunk: int) -> int:
    """Rough upper bound of the extra bytes a run needs (to skip runs this machine cannot hold)."""
    if method == "chunked":
        return 4 * (6 * min(chunk, rows) * vocab + 2 * vocab * hidden)
    # measured at V = 49,152: naive 10x / 6x and TRL 16x / 8x the (N, V) fp32 size (JSD / forward KL)
    factor = {"naive": {"jsd": 11, "forward_kl": 7}, "trl": {"jsd": 17, "forward_kl": 9}}[method][kd]
    return 4 * rows * vocab * factor + 4 * 2 * vocab * hidden


def measure(method, loss, vocab, size, args, save) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--loss", loss, "--vocab", str(vocab),
           "--rows", str(size["rows"]), "--hidden", str(size["hidden"]), "--chunk-size", str(args.chunk_size),
           "--threads", str(args.threads)] + (["--save", save] if save else [])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diff(a: dict, b: dict) -> dict:
    return {f"max_abs_diff_{k}": float((a[k].double() - b[k].double()).abs().max()) for k in a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (V 8,192 / 32,768, N 1,024, H 128)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    size = QUICK if args.quick else FULL
    methods = ["naive", "chunked"]
    try:
        import trl.experimental.gkd.gkd_trainer  # noqa: F401
        methods.append("trl")
    except Exception as exc:  # noqa: BLE001 - any import failure means: no TRL row
        print(f"trl not importable ({type(exc).__name__}); TRL rows skipped", file=sys.stderr)
    results = []
    load_start = os.getloadavg()  # the machine is shared: record how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="loss_memory_"))
    for vocab in size["vocabs"]:
        for loss in LOSSES:
            kd = LOSSES[loss][0]
            runs: dict[str, list] = {m: [] for m in methods}
            skipped: dict[str, str] = {}
            for m in methods:
                need = estimate_peak(m, kd, vocab, size["rows"], size["hidden"], args.chunk_size)
                if need > 0.8 * available_bytes():
                    skipped[m] = (f"estimated peak {need / 2**30:.1f} GiB > 80% of available memory "
                                  f"{available_bytes() / 2**30:.1f} GiB")
            for r in range(args.repeats):
                for m in methods:
                    if m in skipped:
                        continue
                    save = str(tmp / f"{m}.pt") if r == 0 else None
                    res = measure(m, loss, vocab, size, args, save)
                    print(f"V={vocab} {loss} {m} repeat {r}: {res}", file=sys.stderr)
                    runs[m].append(res)
            row = {"vocab": vocab, "rows": size["rows"], "hidden": size["hidden"], "loss": loss,
                   "chunk_size": args.chunk_size, "methods": {}, "skipped": skipped}
            for m, rs in runs.items():
                ok = [x for x in rs if "error" not in x]
                if not rs:
                    continue
                if not ok:
                    row["methods"][m] = {"error": rs[0]["error"]}
                    continue
                row["methods"][m] = {"seconds": [x["seconds"] for x in ok],
                                     "median_seconds": statistics.median(x["seconds"] for x in ok),
                                     "peak_rss_increase_bytes": max(x["peak_rss_increase_bytes"] for x in ok),
                                     "loss": ok[0]["loss"], "peak_method": ok[0]["peak_method"]}
            ref = tmp / "naive.pt"
            for m in ("chunked", "trl"):
                mine = tmp / f"{m}.pt"
                if m in row["methods"] and "error" not in row["methods"][m] and ref.exists() and mine.exists():
                    row["methods"][m].update(max_diff(torch.load(mine, weights_only=True),
                                                      torch.load(ref, weights_only=True)))
                    mn, mc = row["methods"]["naive"], row["methods"][m]
                    mc["peak_ratio_vs_naive"] = mc["peak_rss_increase_bytes"] / max(mn["peak_rss_increase_bytes"], 1)
                    mc["speedup_vs_naive"] = mn["median_seconds"] / mc["median_seconds"]
            for f in tmp.glob("*.pt"):
                f.unlink()
            results.append(row)
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           ("loss_memory_quick.json" if args.quick else "loss_memory.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "loss_memory", "command": " ".join(["python"] + sys.argv), "machine": machine(),
               "threads": args.threads, "repeats": args.repeats,
               "loadavg_1min": {"start": load_start[0], "end": os.getloadavg()[0]}, "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{'V':>7} {'loss':>10} {'method':>8} {'time s':>8} {'peak MB':>9} {'x naive':>8} {'speedup':>8} "
          f"{'|dloss|':>9} {'|dgrad_h|':>9} {'|dgrad_W|':>9}")
    for row in results:
        for m, r in row["methods"].items():
            if "error" in r:
                print(f"{row['vocab']:>7} {row['loss']:>10} {m:>8} error: {r['error']}")
                continue
            print(f"{row['vocab']:>7} {row['loss']:>10} {m:>8} {r['median_seconds']:>8.2f} "
                  f"{r['peak_rss_increase_bytes'] / 1e6:>9.0f} {r.get('peak_ratio_vs_naive', 1.0):>8.3f} "
                  f"{r.get('speedup_vs_naive', 1.0):>8.2f} {r.get('max_abs_diff_loss', 0.0):>9.1e} "
                  f"{r.get('max_abs_diff_grad_hidden', 0.0):>9.1e} {r.get('max_abs_diff_grad_weight', 0.0):>9.1e}")
        for m, why in row["skipped"].items():
            print(f"{row['vocab']:>7} {row['loss']:>10} {m:>8} skipped: {why}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
