"""``open_teacher``: the one place a recipe's ``teacher:`` section becomes a :class:`~.protocol.Teacher`.

The backend is chosen by ``teacher.kind`` alone; callers never branch on it again. Each backend is
imported only when chosen (the in-process one pulls in transformers' model code; the served one openai).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..errors import DistilleryError
from .protocol import Teacher


def open_teacher(tcfg, device: str = "auto", *, data=None, student=None) -> Teacher:
    """Open the teacher a ``TeacherConfig`` names, on ``device`` (already resolved by
    :func:`~.protocol.teacher_device`; only the in-process backend uses it).

    ``data`` (a ``DataConfig``) and ``student`` (a ``StudentConfig``) are needed by ``api_logprobs`` only:
    its targets are read from the recipe's generated data set, tokenized with the student's tokenizer.
    """
    if tcfg.kind == "hf":
        from .hf import load_teacher

        return load_teacher(tcfg.source, device=device, dtype=tcfg.dtype, trust_remote_code=tcfg.trust_remote_code)
    if tcfg.kind == "cache":
        from .cached import CachedTeacher

        if not tcfg.cache_path:
            raise DistilleryError("teacher.kind is 'cache' but teacher.cache_path is not set")
        return CachedTeacher(tcfg.cache_path)
    if tcfg.kind == "served":
        from .served import ServedTeacher

        return ServedTeacher.from_config(tcfg)
    if tcfg.kind == "api_logprobs":
        from .api_logprobs import ApiLogprobTeacher, load_api_tokenizer

        if data is None or student is None:
            raise DistilleryError("teacher.kind 'api_logprobs' reads its targets from the recipe's data: "
                                  "open it through a whole recipe (distill), not on its own")
        tokenizer, mismatch = load_api_tokenizer(tcfg, student)
        return ApiLogprobTeacher(tokenizer, list(data.train) + list(data.validation), data.format,
                                 data.text_field, tokenizer_mismatch=mismatch)
    raise DistilleryError(f"teacher.kind '{tcfg.kind}' is not a teacher backend")


def teacher_config(tcfg, teacher: Teacher):
    """The teacher's Hugging Face config as far as it is known, for a student built beside it.

    An in-process teacher has its model's config. For a teacher that lives elsewhere (a cache, a server,
    stored answers) the config is read (no weights) when ``teacher.source`` names a local model folder;
    otherwise a Llama config carrying what the teacher does know: its vocabulary width and the
    tokenizer's special-token ids. Without it a student built from ``student.model`` would take its
    family's defaults, e.g. Llama's 32,000-entry vocabulary, whatever the teacher's tokenizer.
    Returns an object with ``.config`` (what ``students.build_student`` reads).
    """
    if teacher.model is not None:
        return teacher.model
    from transformers import AutoConfig

    tokenizer, width = teacher.tokenizer, teacher.vocab_width
    folder = Path(tcfg.source).expanduser()
    if "source" in tcfg.model_fields_set and (folder / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=tcfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            from .hf import remote_code_error

            raise remote_code_error(exc, f"teacher '{tcfg.source}'", "teacher.trust_remote_code") from None
    else:
        config = AutoConfig.for_model("llama", vocab_size=width, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return SimpleNamespace(config=config)
