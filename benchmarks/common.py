"""Shared pieces of the benchmark scripts: machine info, peak RSS, matmul peak, child processes,
alternation, steady-state rates, and the chat data both tools train on.

Every measurement runs in a fresh child process (``python SCRIPT --child SPEC.json --result OUT.json``)
so that peak RSS (``VmHWM``) belongs to one system alone, and systems are alternated A B A B so that
a burst of load from other users of the machine hits all of them alike.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- machine and process
def machine_info(command: list[str] | None = None, threads: int | None = None) -> dict:
    """CPU model, cores, load, allocator setting, library versions, date and the command that ran."""
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_average": loadavg(),
            "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "command": " ".join(command if command is not None else [Path(sys.executable).name, *sys.argv])}
    for mod in ("transformers", "trl", "accelerate", "datasets", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = None
    return info


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other users' work on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM`` in /proc/self/status), in bytes."""
    m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def matmul_peak_gflops(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048), seconds: float = 1.0,
                       trials: int = 3) -> float:
    """Best fp32 GFLOP/s of square ``(n, n) @ (n, n)`` matmuls over ``sizes`` on ``threads`` threads:
    the machine's practical peak (a busy neighbour lowers it, so callers measure before and after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(trials):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / trials:
                torch.mm(a, b)
                reps += 1
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(before)
    return best


def matmul_params(model) -> int:
    """Parameters used in matmuls (the N of 6N FLOPs/token): all unique ones minus an untied input
    embedding table (a lookup, not a matmul); a tied table counts once, as the LM head."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (emb.numel() if emb.data_ptr() != head.data_ptr() else 0)


def child_env(threads: int, extra: dict | None = None) -> dict:
    """Environment of a measured child: fixed thread counts, no tokenizer threads, ``extra`` on top."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # only where a run asks for it
    env.update(extra or {})
    return env


def run_child(script: Path, spec: dict, *, threads: int, env_extra: dict | None = None,
              timeout: float = 3600, log: Path | None = None) -> dict:
    """Run ``script --child SPEC --result OUT`` in a fresh process; return its result dict.

    A failed child returns ``{"error": last line of its output}`` rather than raising, so one
    broken system does not lose the others' numbers.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(script), "--child", str(spec_path), "--result", str(out_path)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=child_env(threads, env_extra), cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(f"\n==== {json.dumps(spec)[:300]}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n")
        if proc.returncode != 0 or not out_path.is_file():
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            return {"error": f"exit {proc.returncode}: {lines[-1][:500]}", "wall_s": wall}
        result = json.loads(out_path.read_text())
        result["wall_s"] = wall
        return result


def alternate(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """``[(0, A), (0, B), (1, A), (1, B), ...]``: every system once per round, in the same order."""
    return [(r, n) for r in range(rounds) for n in names]


def steady_tok_s(step_seconds: list[float], tokens_per_step: list[int] | int, skip: int) -> float | None:
    """Tokens/s over the steps after the first ``skip`` (total tokens / total time, not a mean of rates)."""
    secs = step_seconds[skip:]
    if not secs:
        return None
    toks = tokens_per_step[skip:] if isinstance(tokens_per_step, list) else [tokens_per_step] * len(secs)
    return sum(toks) / max(sum(secs), 1e-9)


def median_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def write_json(obj: dict, path: Path) -> None:
    """Write atomically (temporary file + rename), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- data both tools see
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# ChatML; the assistant turn ends at <|im_end|> with no newline after it, so TRL's completion span
# (everything after the generation prompt) and distillery's {% generation %} span are the same tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(name: str = "shakespeare8", max_chars: int | None = None) -> str:
    """A bundled corpus (``shakespeare8`` or ``paradise_lost``) as text."""
    path = resources.files("distillery") / "assets" / f"{name}.txt.gz"
    with path.open("rb") as fh:
        text = gzip.decompress(fh.read()).decode("utf-8")
    return text if max_chars is None else text[:max_chars]


def train_bpe_tokenizer(vocab_size: int = 4096, chars: int = 1_000_000):
    """A byte-level BPE tokenizer of ``vocab_size`` entries trained on Shakespeare, with a pad token and
    the ChatML template above (what GKD needs), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus(max_chars=chars)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_records(tokenizer, n: int, seq_len: int, prompt_tokens: int = 64, text: str | None = None) -> list[dict]:
    """``n`` conversations (user: ``prompt_tokens`` tokens of Shakespeare, assistant: the text that
    follows) that each render to exactly ``seq_len`` tokens in ``tokenizer``'s chat template.

    Exact length means both tools process identical ``(B, seq_len)`` blocks with no padding: TRL's
    collator pads a batch to its longest row, distillery packs one conversation per block.
    """
    text = text if text is not None else corpus(max_chars=max(200_000, 8 * n * seq_len))
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    decode = lambda a, b: tokenizer.decode(ids[a:b])  # noqa: E731

    def rendered(msgs) -> int:
        return len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])

    out, pos = [], 0
    while len(out) < n and pos + seq_len < len(ids):
        user = decode(pos, pos + prompt_tokens)
        c = seq_len - prompt_tokens - 8
        for _ in range(8):  # re-tokenising decoded text may merge differently: adjust until exact
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": decode(pos + prompt_tokens, pos + prompt_tokens + c)}]
            gap = seq_len - rendered(msgs)
            if gap == 0:
                out.append({"messages": msgs})
                break
            c += gap
            if c <= 0:
                break
        pos += prompt_tokens + max(c, 1)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} of {n} conversations of exactly {seq_len} tokens could be built")
    return out


# ----------------------------------------------------------------------------- timing a transformers Trainer
def trainer_clock(cuda: bool = False):
    """A ``TrainerCallback`` recording ``ticks`` (start, then the end of every step; the GPU synchronised first when
    ``cuda``) and the logged ``losses``: how the peers' step times are read, one definition for every benchmark."""
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ticks: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, *a, **k):
            self.ticks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.ticks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Clock()


def demo_folder_args(ap, name: str) -> None:
    """The arguments of a script that reruns parts of a finished demo folder: ``--demo-dir``, and ``--work-dir``,
    ``--threads``, ``--out`` defaulting to ``runs/bench/<name>`` and ``benchmarks/results/<name>.json``."""
    ap.add_argument("--demo-dir", required=True, help="a finished demo folder (benchmarks/demo.py --work-dir)")
    ap.add_argument("--work-dir", default=f"runs/bench/{name}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=f"benchmarks/results/{name}.json")


def open_demo_folder(args) -> tuple[Path, Path, dict]:
    """For :func:`demo_folder_args`' arguments: torch's threads set, the demo and work folders (made), the machine."""
    import torch

    torch.set_num_threads(args.threads)
    demo, work = Path(args.demo_dir).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return demo, work, machine_info(threads=args.threads)


def write_demo_result(name: str, machine: dict, demo: Path, out: Path, **fields) -> None:
    """Write a :func:`open_demo_folder` script's result: its name, the machine (load at the end), the demo folder
    it read, then ``fields``."""
    machine["load_average_end"] = loadavg()
    write_json({"benchmark": name, "machine": machine, "demo_dir": str(demo), **fields}, out)
