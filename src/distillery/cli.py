"""Command line: parse, load config, call one library function. No logic here.

Errors the user can cause end as one line ``error: ...`` and exit status 2 (set
``DISTILLERY_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys


def _cmd_distill(args) -> int:
    from .evaluate import strict_json
    from .config import load_config
    from .python_api import distill

    cfg = load_config(args.recipe, args.overrides)
    result = distill(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun only the main process prints
        print(strict_json(result.summary))
        print(f"student saved to {result.student_dir} (metrics: {result.metrics_path})", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from .errors import DistilleryError

    if (args.teacher is None) == (args.teacher_recipe is None):
        raise DistilleryError("eval needs exactly one of --teacher SOURCE and --teacher-recipe RECIPE")
    teacher = args.teacher
    from .config import EvalConfig

    ec = EvalConfig()
    if args.teacher_recipe:
        from .config import load_config

        recipe = load_config(args.teacher_recipe)
        teacher, ec = recipe.teacher, recipe.eval  # the recipe's eval: section; flags given here win
        if args.tasks:
            raise DistilleryError("--tasks scores the teacher's own model: give it with --teacher SOURCE")
        args.data = args.data or (list(ec.data) if not args.tasks else None)
    for flag in ("seq_len", "batch_size", "max_blocks", "own_samples", "prompt_tokens", "sample_temperature"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(ec, flag) if flag != "max_blocks" or args.teacher_recipe else None)
    if not args.data and not args.tasks:
        raise DistilleryError("eval needs --data (held-out text), --tasks (blimp, fidelity, lmeval:...), or both")
    if args.tasks:
        from .tasks import parse_tasks

        parse_tasks(args.tasks)  # a misspelt task fails before any scoring
    metrics = None
    if args.data:
        from .evaluate import run_eval

        metrics = run_eval(teacher, args.student, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_blocks=args.max_blocks, json_out=None if args.tasks else args.json,
                           own_samples=args.own_samples, prompt_tokens=args.prompt_tokens,
                           sample_temperature=args.sample_temperature)
    if args.tasks:  # one JSON: the task scores, with the held-out metrics under "held_out"
        from .tasks import run_tasks, summary

        result = run_tasks(args.teacher, args.student, args.tasks, blimp_per_paradigm=args.blimp_per_paradigm,
                           fidelity_prompts=args.fidelity_prompts, lm_eval_limit=args.lmeval_limit,
                           json_out=args.json, held_out=metrics)
        print(summary(result) if args.json else json.dumps(result, indent=2))
        return 0
    from .evaluate import strict_json

    print(strict_json(metrics))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(quick=args.quick, output_dir=args.output_dir, overrides=args.overrides,
             answer_temperature=args.answer_temperature, answer_top_p=args.answer_top_p,
             train_prompts=args.train_prompts, plain_chars=args.plain_chars, minutes=args.minutes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery", description="Distill a teacher LLM into a small student for consumer devices.")
    p.add_argument("--version", action="version", version=f"distillery {__import__('distillery').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distill", help="distill a teacher into a student from a YAML recipe")
    d.add_argument("recipe", help="YAML recipe (see configs/)")
    d.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. train.max_steps=200")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    d.set_defaults(func=_cmd_distill)

    e = sub.add_parser("eval", help="compare a student to its teacher on held-out text")
    e.add_argument("--teacher", default=None, help="teacher folder, .gguf file, or 'smollm2' (in this process)")
    e.add_argument("--teacher-recipe", default=None, metavar="RECIPE",
                   help="take the teacher from a recipe's teacher: section instead (e.g. teacher.kind: served)")
    e.add_argument("--student", required=True, help="student folder (HF format)")
    e.add_argument("--data", nargs="+", default=None,
                   help="held-out text/JSONL files or demo:milton (optional when --tasks is given)")
    e.add_argument("--seq-len", type=int_at_least(2), default=None, help="tokens per block (default 256)")
    e.add_argument("--batch-size", type=int_at_least(1), default=None, help="blocks per forward (default 4)")
    e.add_argument("--max-blocks", type=int_at_least(1), default=None, help="evaluate at most this many blocks")
    e.add_argument("--json", default=None, help="write the metrics to this JSON file")
    e.add_argument("--own-samples", type=int_at_least(0), default=None, metavar="N",
                   help="also score the student's own continuations of each block's prompt: N new tokens, "
                        "teacher perplexity of them and KL(T||S) on them (the on-policy measure)")
    e.add_argument("--prompt-tokens", type=int_at_least(1), default=None, help="prompt length for --own-samples (default 64)")
    e.add_argument("--sample-temperature", type=float, default=None, help="sampling temperature for --own-samples (default 1)")
    e.add_argument("--tasks", default=None, metavar="LIST",
                   help="task scores for teacher and student, comma-separated: blimp, fidelity, "
                        "lmeval:<distillery_blimp | distillery_milton | task.yaml | lm-eval registry task> (see docs/eval.md)")
    e.add_argument("--blimp-per-paradigm", type=int, default=None, metavar="N",
                   help="BLiMP: score N seeded pairs of each of the 67 paradigms (default: all 200)")
    e.add_argument("--fidelity-prompts", default=None, metavar="FILE",
                   help="answer fidelity: held-out prompts, one per line or JSONL {\"prompt\": ...} (default: 12 built in)")
    e.add_argument("--lmeval-limit", type=int, default=None, metavar="N", help="lm-eval: at most N documents per task")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("demo", help="distill SmolLM2-135M-Instruct into a small student and print the results")
    m.add_argument("--quick", action="store_true", help="a short run (under 3 minutes on 2 CPU cores)")
    m.add_argument("--output-dir", default="runs/demo")
    m.add_argument("--minutes", type=float, default=None,
                   help="time budget: train as many of the recipe's 360 steps as fit (default 15; 0 = all 360)")
    m.add_argument("--answer-temperature", type=float, default=None, metavar="T",
                   help="the teacher samples the training answers at temperature T (0 = greedy; default: demo.TRAIN_ANSWERS)")
    m.add_argument("--answer-top-p", type=float, default=None, metavar="P",
                   help="nucleus mass of those samples (default: demo.TRAIN_ANSWERS)")
    m.add_argument("--train-prompts", type=int, default=None, metavar="N",
                   help="prompts the teacher answers for training (default: demo.SETTINGS, 200)")
    m.add_argument("--plain-chars", type=int, default=None, metavar="N",
                   help="characters of the plays trained on as plain text (0 = none; default: demo.SETTINGS, 90,000)")
    m.add_argument("overrides", nargs="*", default=[], help="key=value overrides for the demo recipe (both runs; kd:key=value or ce:key=value for one run)")
    m.set_defaults(func=_cmd_demo)

    _optional_verbs(sub)
    for parser in (p, *sub.choices.values()):
        _one_line_errors(parser)
    return p


def int_at_least(low: int):
    """argparse type: a whole number >= ``low`` (``--seq-len 1``, ``--batch-size 0``: a usage error, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value
    parse.__name__ = "int"
    return parse


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Usage mistakes end like every other error: one ``error:`` line naming the verb, exit status 2."""
    def error(message: str):
        parser.exit(2, f"error: {parser.prog}: {message} (see {parser.prog} --help)\n")
    parser.error = error


def _optional_verbs(sub) -> None:
    """Verbs whose parts register their own arguments (cache, generate, prune, quantize, export, bench, report, plan)."""
    registrations = [
        ("distillery.cache.command", "add_cache_parser"),
        ("distillery.api.command", "add_generate_parser"),
        ("distillery.prune.cli", "add_prune_parser"),
        ("distillery.quantize", "add_quantize_parser"),
        ("distillery.export", "add_export_parser"),
        ("distillery.bench", "add_bench_parser"),
        ("distillery.report", "add_report_parser"),
        ("distillery.plan", "add_plan_parser"),
    ]
    import importlib

    for module, fn in registrations:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("distillery"):
                continue  # that part is not built yet
            raise
        if hasattr(mod, fn):
            getattr(mod, fn)(sub)


def main(argv: list[str] | None = None) -> int:
    from .errors import DistilleryError
    from .quiet import quiet_cli

    quiet_cli()  # no loading bars or import-time warnings from transformers/torchao in any verb

    parser = build_parser()
    # argparse cannot take positionals after an option (`distill r.yaml --resume train.max_steps=9`): key=value
    # words it leaves over are the verb's overrides, in command-line order; anything else is an error.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    try:
        from .preflight import check_args

        check_args(args)  # weights files, a recipe's inputs: before anything heavy loads
        return int(args.func(args) or 0)
    except DistilleryError as exc:
        if os.environ.get("DISTILLERY_DEBUG"):
            raise
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if os.environ.get("DISTILLERY_DEBUG"):
            raise
        print(f"error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    except OSError as exc:
        if os.environ.get("DISTILLERY_DEBUG") or exc.errno is None:
            raise
        hint = "; free some space, then rerun the same command (distill: with --resume)" if exc.errno == errno.ENOSPC else ""
        print(f"error: {exc.strerror}: {exc.filename or ''}".rstrip(": ") + hint, file=sys.stderr)
        return 2
    except Exception as exc:  # the guard: whatever escaped the checks still ends as one line, never a traceback
        if os.environ.get("DISTILLERY_DEBUG"):
            raise
        print(f"error: {args.command}: {_one_line(_unexpected(exc))}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _unexpected(exc: BaseException) -> str:
    """Words for an exception no check caught: the common kinds by name, the rest with their type."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    kind = type(exc).__name__
    if kind == "SafetensorError" or any(s in text for s in ("incomplete metadata", "HeaderTooLarge", "InvalidHeader",
                                                            "Error while deserializing header")):
        return f"a .safetensors weights file is truncated or damaged ({text}); copy or export it again"
    if isinstance(exc, UnicodeError) and "surrogate" in text:
        return f"the input text holds a lone surrogate code point, which is not valid Unicode ({text})"
    if isinstance(exc, MemoryError) or kind == "OutOfMemoryError":
        return f"out of memory ({text or kind}); lower the batch size or the sequence length"
    if isinstance(exc, RecursionError):
        return f"an input is nested too deeply ({text})"
    return f"unexpected {kind}: {text} (set DISTILLERY_DEBUG=1 for the traceback, and please report it)"


if __name__ == "__main__":
    sys.exit(main())
