"""Bits per byte and BLiMP of one model for ``benchmarks/cross_tokenizer.py``: each model on its own tokenization of
the same documents, so students with other vocabularies than the teacher's compare fairly."""

from __future__ import annotations

import time


def bits_per_byte(model, tok, file: str, seq_len: int, batch: int = 8) -> dict:
    """Σ −log₂ p(label) / Σ bytes(label) over every label of the file's ``seq_len`` blocks in ``tok``'s tokens
    (specials excluded from both sums): comparable across vocabularies (lm-eval-harness's bits per byte)."""
    import torch

    from distillery.config import DataConfig
    from distillery.data import build_datasets
    from distillery.xtok.align import spelling

    ds = build_datasets(DataConfig(train=[file], seq_len=seq_len, val_fraction=0.0), tok, progress=False).train
    spelled = spelling(tok).spelling
    n_bytes = torch.tensor([len(s) if s is not None else 0 for s in spelled] + [0] * 1024, dtype=torch.float64)
    bits = nbytes = 0.0
    tokens = 0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(ds), batch):
            b = ds.batch(torch.arange(lo, min(lo + batch, len(ds))))
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()  # (B, T, V)
            lp = torch.log_softmax(logits, -1).gather(-1, b["labels"].clamp(min=0)[..., None]).squeeze(-1)
            w = n_bytes[b["labels"].clamp(min=0)] * (b["labels"] != -100)
            keep = w > 0
            bits += float(-lp[keep].double().sum()) / 0.6931471805599453
            nbytes += float(w.sum())
            tokens += int(keep.sum())
    return {"bits_per_byte": bits / max(nbytes, 1.0), "bytes": int(nbytes), "tokens": tokens, "blocks": len(ds)}


def evaluate_model(model, tok, files: dict, seq_len: int, blimp_n: int, name: str) -> dict:
    from distillery.tasks.blimp import score_blimp

    t0 = time.perf_counter()
    out = {"heldout": bits_per_byte(model, tok, files["heldout"], seq_len),
           "milton": bits_per_byte(model, tok, files["milton"], seq_len)}
    blimp = score_blimp(model, tok, per_paradigm=blimp_n, progress=False, name=name)
    out["blimp"] = {k: blimp[k] for k in ("overall", "n_pairs", "n_paradigms", "per_field", "prefix_token")}
    out["eval_seconds"] = time.perf_counter() - t0
    return out
