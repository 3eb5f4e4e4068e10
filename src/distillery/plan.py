"""``distillery plan RECIPE.yaml [key=value ...]``: peak memory per device and time per step, before a run.

Nothing is loaded but configs (see :mod:`.plan_models`); the numbers are arithmetic on the shapes.
Memory per student process (bytes; ``N`` student parameters, ``B×T`` tokens per micro-batch, ``V``
vocabulary, ``H``/``F``/``L`` hidden, MLP width and layers, ``kv`` the key/value width):

* weights ``4N`` (fp32 master copy), gradients ``4N``, AdamW's two moments ``8N``; DDP's gradient
  buckets another ``4N`` (world > 1). Under FSDP (``--fsdp``) those ``16N`` are divided by the world
  size, plus weights and gradients of what is gathered at once: the root unit (embeddings and head) and
  two decoder layers, and on GPUs the foreach AdamW step's temporaries (``4N`` divided likewise; elsewhere
  torch's fused AdamW keeps none); on GPUs bf16 autocast adds a ``2N`` weight cache.
* activations kept for backward: ``B·T·(L·(8H + 4F + 2kv) + 2H)`` floats (counted from the tensors
  autograd saves for a Llama/Qwen2 block with SDPA attention, fp32; ~2.5 bytes each under bf16), plus
  two blocks' worth of gradient tensors alive during backward.
* the fused loss (``losses.chunked_distill_loss``): five ``(c, V)`` fp32 buffers, ``c =
  min(chunk_size, B·T)``, the ``(V, H)`` head gradient and two ``(B·T, H)`` row buffers.
* a live teacher on the same device: its weights, its final hidden states ``(B·T, H_t)`` and, while
  it runs (before the student's forward), its largest layer's tensors ``B·T·(4H_t + 3F_t)``; on
  another device (``teacher.device``) those go there and a copy of its LM head comes to the
  student's device. A cache holds no weights, only ``(B, T, K)`` top-k targets.
* validation (main process): nine ``(c, V)`` fp32 logit tensors, ``c = min(1024, chunk_size, B·T)``
  (``evaluate`` holds seven at once; nine is what the SmolLM2 recipe's measured peak implies).

The peak is the resident state (runtime, weights, gradients, optimizer, teacher) plus the largest of
the three transients: a training step, the teacher's forward, a validation chunk.
* the runtime: this process's RSS after importing what ``distill`` imports (CPU), plus a CUDA context (GPU).

Time per optimizer step: ``A·B·T·(6·N_s + 2·N_t + 6·L_s·T·H_s + 2·L_t·T·H_t)`` FLOPs (``N`` counts the
parameters that take part in a matmul; the last terms are attention) over the device's dense
throughput (the best of three short matmul bursts, or ``--tflops``) times ``--efficiency`` (default
0.6 on CPU, where 10-135M-parameter recipes reached 0.56-0.85 of the probe; 0.4 on GPUs, a usual
model-FLOPs utilisation, not measured here). Tiny models are overhead-bound and run far slower.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from .config import RunConfig, load_config
from .errors import DistilleryError

GB = 1024 ** 3
ACT_FLOATS = (8, 4, 2, 2)  # per token: L·(8H + 4F + 2kv) + 2H  (see the module docstring)
CUDA_CONTEXT = 0.5 * GB
EVAL_ROWS = 1024  # the most rows train._validate hands evaluate at once
EVAL_BUFFERS = 9
EFFICIENCY = {"cpu": 0.6, "cuda": 0.4}  # default fraction of the probe's throughput a step reaches
BACKWARD_BLOCKS = 2


@dataclass
class Plan:
    """The estimate: memory lines (name, bytes) per device and the time per step."""

    device: str
    processes: int
    student: dict
    teacher: dict | None
    memory: dict[str, float] = field(default_factory=dict)  # student process, bytes
    teacher_memory: dict[str, float] = field(default_factory=dict)  # on teacher.device when elsewhere
    flops_per_step: float = 0.0
    tflops: float = 0.0
    efficiency: float = 0.6
    limit_bytes: float = 0.0
    limit_what: str = ""

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def seconds_per_step(self) -> float:
        return self.flops_per_step / max(self.tflops * 1e12 * self.efficiency, 1.0)

    @property
    def needed_bytes(self) -> float:
        """What must fit in the limit: per GPU, or all processes together on one CPU machine."""
        per = self.peak_bytes
        return per * self.processes + (sum(self.teacher_memory.values()) if self.device == "cpu" else 0)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.limit_bytes

    def to_dict(self) -> dict:
        return {"device": self.device, "processes": self.processes, "student": self.student, "teacher": self.teacher,
                "memory_bytes": self.memory, "teacher_device_bytes": self.teacher_memory,
                "peak_bytes_per_process": self.peak_bytes, "needed_bytes": self.needed_bytes,
                "limit_bytes": self.limit_bytes, "limit": self.limit_what, "fits": self.fits,
                "flops_per_step": self.flops_per_step, "tflops": self.tflops, "efficiency": self.efficiency,
                "seconds_per_step": self.seconds_per_step}


def _rss_bytes() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.5 * GB


def estimate(cfg: RunConfig, *, processes: int = 1, device: str = "auto", memory_gb: float | None = None,
             tflops: float | None = None, efficiency: float | None = None, fsdp: bool = False) -> Plan:
    """Estimate peak memory per device and time per step for ``cfg`` on ``processes`` data-parallel ranks
    (``fsdp``: the student's weights, gradients and moments sharded over them, as ``distillery.fsdp`` does)."""
    from .plan_models import device_memory_bytes, model_shapes, probe_tflops
    from .teachers.hf import pick_dtype

    if processes < 1:
        raise DistilleryError(f"--processes must be at least 1, got {processes}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    if efficiency is None:  # measured here on CPU: 0.56-0.85 of the probe for 10-135M models; GPUs: a usual MFU
        efficiency = EFFICIENCY["cuda" if gpu else "cpu"]
    from . import train  # noqa: F401  (the trainer's imports: the runtime term is this process's RSS after them)

    teacher, student, cache = model_shapes(cfg)
    tc, lc, dc = cfg.train, cfg.loss, cfg.data
    tokens = tc.micro_batch_size * dc.seq_len  # B·T per micro-batch
    n, h, v = student.params, student.hidden, student.vocab
    vocab = min(v, teacher.vocab) if teacher is not None else v
    bf16 = gpu and tc.mixed_precision in ("auto", "bf16")
    act_bytes = 2.5 if bf16 or tc.mixed_precision == "fp16" else 4.0
    a_h, a_f, a_kv, a_0 = ACT_FLOATS
    act_per_token = student.layers * (a_h * h + a_f * student.ffn + a_kv * student.kv_dim) + a_0 * h

    mem = {"runtime (python, torch" + (", CUDA context)" if gpu else ")"): _rss_bytes() + (CUDA_CONTEXT if gpu else 0)}
    if fsdp and processes > 1:  # sharded state, plus what is gathered at once: the root unit (embeddings, head,
        # kept gathered from its forward through backward) and two decoder layers (the running one, the next)
        tied = bool(getattr(student.config, "tie_word_embeddings", False))
        root = (1 if tied else 2) * v * h
        layer = max(0.0, (n - root) / max(1, student.layers))
        mem.update({f"student weights, gradients, AdamW moments (fp32, 1/{processes} each)": 16.0 * n / processes,
                    "FSDP gathered root unit (weights + gradients)": 8.0 * root,
                    "FSDP gathered decoder layers (2, weights + gradients)": 2 * 8.0 * layer})
    else:
        mem.update({"student weights (fp32)": 4.0 * n, "gradients": 4.0 * n, "AdamW moments": 8.0 * n})
        if processes > 1:
            mem["DDP gradient buckets"] = 4.0 * n
    if gpu and fsdp and processes > 1:  # plain tensors step with torch's fused AdamW (no temporaries); DTensors foreach
        mem["AdamW foreach temporaries"] = 4.0 * n / processes
    if bf16:
        mem["bf16 autocast weight cache"] = 2.0 * student.matmul_params
    block = a_h * h + a_f * student.ffn + a_kv * student.kv_dim  # one block's saved floats per token
    chunk = min(lc.chunk_rows("cuda" if gpu else "cpu", vocab), tokens)  # loss rows per chunk, as the loop picks them
    train = {f"activations ({tc.micro_batch_size} x {dc.seq_len} tokens)": tokens * act_per_token * act_bytes,
             "backward gradient buffers": BACKWARD_BLOCKS * tokens * block * act_bytes,
             f"loss chunks (5 x {chunk} x {vocab} fp32)": 5.0 * chunk * vocab * 4,
             "loss head gradient + row buffers": 4.0 * (vocab * h + 2 * tokens * h)}
    tdev = cfg.teacher.device
    teacher_here = teacher is not None and tdev in ("auto", device, f"{device}:0" if gpu else device)
    teacher_mem: dict[str, float] = {}
    teacher_run, t_info = 0.0, None
    if teacher is not None:
        t_dev = torch.device(device if tdev == "auto" else tdev.split(":")[0])
        if cfg.teacher.dtype == "auto" and t_dev.type == "cuda" and not torch.cuda.is_available():
            t_dtype = torch.bfloat16  # planning for a GPU from a machine without one: assume bf16 (Ampere and later)
        else:
            t_dtype = pick_dtype(cfg.teacher.dtype, t_dev)
        tb = torch.tensor([], dtype=t_dtype).element_size()
        teacher_mem = {f"teacher weights ({str(t_dtype).removeprefix('torch.')})": float(teacher.params * tb)}
        teacher_run = float(tokens * (4 * teacher.hidden + 3 * teacher.ffn) * tb)
        train["teacher hidden states (lazy targets)"] = float(tokens * teacher.hidden * tb)
        if not teacher_here:
            train["teacher LM head copy"] = float(vocab * teacher.hidden * tb)
        t_info = {"params": teacher.params, "layers": teacher.layers, "hidden": teacher.hidden, "vocab": teacher.vocab,
                  "device": tdev if tdev != "auto" else device, "dtype": str(t_dtype).removeprefix("torch.")}
    elif cache is not None:
        k = int(cache.reader.manifest.get("k", 32))
        train[f"cached top-{k} targets"] = float(tokens * k * 12 + tokens * 4)
        t_info = {"cache": str(cfg.teacher.cache_path), "k": k}
    if teacher_here:
        mem.update(teacher_mem)
        teacher_mem = {}
    elif teacher is not None:  # the teacher's forward runs on its own device
        teacher_mem["teacher activations (no grad)"] = teacher_run
        teacher_run = 0.0
    rows = min(EVAL_ROWS, chunk)
    eval_peak = EVAL_BUFFERS * rows * vocab * 4.0 if (dc.val_fraction > 0 or dc.validation) else 0.0
    train_peak = sum(train.values())
    mem.update(train)
    if max(eval_peak, teacher_run) > train_peak:  # transients that never overlap: the largest one counts
        name = (f"validation logits ({EVAL_BUFFERS} x {rows} x {vocab} fp32)" if eval_peak >= teacher_run
                else "teacher forward") + ", beyond the step's"
        mem[name] = max(eval_peak, teacher_run) - train_peak

    attn_s = 6 * student.layers * dc.seq_len * h
    per_token = 6 * student.matmul_params + attn_s
    if teacher is not None:
        per_token += 2 * teacher.matmul_params + 2 * teacher.layers * dc.seq_len * teacher.hidden
    flops = tc.grad_accum * tokens * per_token
    if tflops is None:
        tflops = probe_tflops(device, torch.bfloat16 if bf16 else torch.float32)
    if memory_gb is not None:
        limit, what = memory_gb * GB, "--memory-gb"
    else:
        limit, what = device_memory_bytes(device)
    s_info = {"params": n, "layers": student.layers, "hidden": h, "vocab": v, "family": student.config.model_type}
    return Plan(device=device, processes=processes, student=s_info, teacher=t_info, memory=mem,
                teacher_memory=teacher_mem, flops_per_step=float(flops), tflops=float(tflops),
                efficiency=efficiency, limit_bytes=float(limit), limit_what=what)


def format_plan(plan: Plan, recipe: str) -> str:
    """A plain-text report (one line per memory term, GB)."""
    s = plan.student
    lines = [f"plan for {recipe}: {plan.processes} process(es) on {plan.device}",
             f"student  {s['family']} {s['params'] / 1e6:.1f}M parameters ({s['layers']} layers, d={s['hidden']}, V={s['vocab']:,})"]
    t = plan.teacher
    if t and "params" in t:
        lines.append(f"teacher  {t['params'] / 1e6:.1f}M parameters ({t['layers']} layers, d={t['hidden']}), "
                     f"live on {t['device']} ({t['dtype']})")
    elif t:
        lines.append(f"teacher  cache {t['cache']} (top-{t['k']}): no teacher weights on any device")
    lines.append("memory per process (GB):")
    lines += [f"  {name:<44}{b / GB:8.3f}" for name, b in plan.memory.items()]
    lines.append(f"  {'peak estimate':<44}{plan.peak_bytes / GB:8.3f}")
    if plan.teacher_memory:
        lines.append(f"on the teacher's device {t['device']} (one copy per process):")
        lines += [f"  {name:<44}{b / GB:8.3f}" for name, b in plan.teacher_memory.items()]
    scope = f"{plan.processes} processes together" if plan.device == "cpu" and plan.processes > 1 else "per device"
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"needs {plan.needed_bytes / GB:.2f} GB {scope}; {plan.limit_what}: {plan.limit_bytes / GB:.2f} GB -> {verdict}")
    lines.append(f"time per step: {plan.flops_per_step:.3g} FLOP / ({plan.tflops:.3g} TFLOP/s x {plan.efficiency:g} "
                 f"efficiency) = {plan.seconds_per_step:.3g} s")
    return "\n".join(lines)


def _cmd_plan(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    processes = args.processes or int(os.environ.get("WORLD_SIZE", 1))
    plan = estimate(cfg, processes=processes, fsdp=args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true",
                    device=args.device, memory_gb=args.memory_gb, tflops=args.tflops,
                    efficiency=args.efficiency)
    print(format_plan(plan, args.recipe))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan.to_dict(), fh, indent=2)
    if not plan.fits:
        print(f"warning: the run needs about {plan.needed_bytes / GB:.2f} GB but {plan.limit_what} is "
              f"{plan.limit_bytes / GB:.2f} GB: lower train.micro_batch_size, data.seq_len or loss.chunk_size, "
              "or move the teacher (teacher.device, teacher.kind: cache)", file=sys.stderr)
        return 1
    return 0


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            import argparse

            raise argparse.ArgumentTypeError(f"must be a positive number, got '{text}'")
        return value
    return parse


def add_plan_parser(subparsers) -> None:
    """Register ``distillery plan`` on the CLI's subparsers."""
    p = subparsers.add_parser("plan", help="estimate peak memory per device and time per step for a recipe")
    p.add_argument("recipe", help="YAML recipe (as for `distill`)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--processes", type=_positive(int), default=None, help="data-parallel processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--fsdp", action="store_true", help="the student sharded over the processes (configs/accelerate/fsdp.yaml; "
                   "default: on when $ACCELERATE_USE_FSDP is true)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the student trains")
    p.add_argument("--memory-gb", type=_positive(float), default=None, help="memory per device (default: GPU memory, or available RAM)")
    p.add_argument("--tflops", type=_positive(float), default=None, help="device throughput in TFLOP/s (default: a matmul probe)")
    p.add_argument("--efficiency", type=_positive(float), default=None,
                   help="fraction of that throughput a step reaches (default 0.6 on CPU, 0.4 on GPU)")
    p.add_argument("--json", default=None, help="also write the estimate to this JSON file")
    p.set_defaults(func=_cmd_plan)
