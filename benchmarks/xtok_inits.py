"""benchmarks/cross_tokenizer.py's student inits: one per student tokenizer, shared by every arm of that tokenizer.

``--init random``: ``student.model`` of the benchmark's shape (seeded); ``--init pruned``: the teacher pruned once to
``distillery demo``'s student (``distillery.demo.PRUNE``: 8 layers, d=384, FFN 1,024, 6 query / 3 KV heads, tied),
calibrated as the demo does (4 batches of 4 x 256 teacher tokens; here of the training text), then given each
tokenizer's vocabulary by embedding transplant (:mod:`distillery.xtok.transplant`). Each init folder holds an
``init.json`` saying what it is (the results JSON copies it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TINY_PRUNE = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2}  # --init pruned --student tiny (test teachers)
CALIB_SEQ = 256  # the block length distillery demo calibrates on (its batch and count: demo.SETTINGS["full"])


def pruned_body(args, teacher, files: dict):
    """The teacher pruned once to the demo student's shape (``--student tiny``: ``TINY_PRUNE``), fp32, calibrated as
    ``distillery.demo.make_student`` does (demo's full settings) on the training text; and the prune plan."""
    import torch

    from distillery.demo import PRUNE, SETTINGS
    from distillery.prune import prune_model
    from distillery.prune.cli import calibration_batches

    shape = TINY_PRUNE if args.student == "tiny" else PRUNE
    demo = SETTINGS["full"]
    calib = calibration_batches([files["train"]], teacher.tokenizer, seq_len=CALIB_SEQ,
                                batch_size=demo["micro_batch"], n_batches=demo["calib_batches"])
    t0 = time.perf_counter()
    model = prune_model(teacher.model, calib, **shape).to(torch.float32)
    info = {"prune": shape, "calibration": {"batches": len(calib), "batch": demo["micro_batch"], "seq_len": CALIB_SEQ,
                                            "text": "training text (train.jsonl)"},
            "teacher_dtype": str(teacher.model.dtype).replace("torch.", ""),
            "plan": getattr(model, "prune_plan", None), "prune_seconds": time.perf_counter() - t0}
    return model, info


def make_inits(args, teacher, files: dict, work: Path, shape: dict) -> tuple[dict, dict]:
    """One tokenizer folder and one saved init per ``--tokenizers`` entry: ``{name: init folder}``, and what each
    init is (``--init random``: ``student.model`` = ``shape``; ``pruned``: the pruned teacher transplanted to the
    tokenizer, with the transplant's counts of exact / split / special rows and its seconds)."""
    import copy

    from transformers import AutoConfig

    from distillery.config import DataConfig, StudentConfig
    from distillery.student_tokenizer import open_student_tokenizer
    from distillery.students import build_student, count_parameters
    from distillery.xtok.transplant import transplant_sources, transplant_vocabulary

    out, info, body, body_info = {}, {}, None, None
    for spec in args.tokenizers.split(","):
        name = spec.replace(":", "")
        folder = work / (f"init_{name}" if args.init == "random" else f"init_pruned_{args.student}_{name}")
        meta = folder / "init.json"
        if not (folder / "config.json").is_file() or not meta.is_file():
            tok = open_student_tokenizer(spec, teacher.tokenizer, DataConfig(train=[files["train"]]), work / f"tok_{name}")
            entry = {"init": args.init}
            if args.init == "random":
                model = {**shape, "vocab_size": len(tok),
                         **{k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
                student = build_student(StudentConfig(init="config", model=model), teacher.model, seed=args.seed)
            else:
                if body is None:
                    body, body_info = pruned_body(args, teacher, files)
                t0 = time.perf_counter()
                sources = transplant_sources(teacher.tokenizer, tok)
                student = transplant_vocabulary(copy.deepcopy(body), teacher.tokenizer, tok, sources)
                entry.update(body_info, transplant={"seconds": time.perf_counter() - t0, "rows": sources.counts(),
                                                    "exact_fraction": sources.exact_fraction()})
            entry["parameters"] = count_parameters(student)
            student.save_pretrained(folder)
            tok.save_pretrained(folder)
            meta.write_text(json.dumps(entry, indent=1))
        entry = json.loads(meta.read_text())
        c = AutoConfig.from_pretrained(folder)
        entry["shape"] = {k: getattr(c, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                          "intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
        out[name], info[name] = str(folder), entry
    return out, info
