#!/usr/bin/env python3
"""Check a Core ML export on a Mac (macOS 15+, where Core ML's predict() exists) against PyTorch.

One command, after `pip install 'distillery[apple]'` on the Mac:

    python scripts/verify_coreml_mac.py STUDENT_DIR COREML_DIR [--tokens 256] [--compute-units cpu|all]

STUDENT_DIR is the student folder that was exported, COREML_DIR the folder `distillery export
--format coreml` wrote. The held-out tokens (tail of *Paradise Lost*) go through the .mlpackage
twice: prefill of the first half in one call, then one token per call through the stateful KV cache
(`model.make_state()`); both are compared with the PyTorch student in fp32. Printed as JSON:
max |Δlogit|, relative error, top-1 agreement, KL(torch ‖ Core ML), and whether 32 greedy tokens
are identical. Exit status 0 when top-1 agreement ≥ 99 % (f16) / 97 % (q8) and greedy tokens match
(f16, q8); 4-bit variants are reported only. fp16 compute makes |Δ| ~1e-2 normal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student")
    ap.add_argument("coreml")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--compute-units", choices=("cpu", "all"), default="cpu")
    args = ap.parse_args()
    if sys.platform != "darwin":
        print("Core ML predict() runs only on macOS; on Linux `distillery export --format coreml` checks the structure")
        return 2

    import coremltools as ct
    import torch

    from distillery.export.coreml_export import MANIFEST, PACKAGE, causal_mask
    from distillery.export.device_check import GREEDY_NEW, GREEDY_PROMPT, greedy_fields, torch_greedy
    from distillery.export.inputs import heldout_ids, load_student
    from distillery.export.metrics import compare_logits

    manifest = json.loads((Path(args.coreml) / MANIFEST).read_text())
    units = ct.ComputeUnit.CPU_ONLY if args.compute_units == "cpu" else ct.ComputeUnit.ALL
    mlmodel = ct.models.MLModel(str(Path(args.coreml) / PACKAGE), compute_units=units)
    model, tok = load_student(args.student)
    n = min(args.tokens, manifest["max_seq_len"])
    ids = heldout_ids(tok, n)

    def call(state, chunk: list[int], end: int) -> np.ndarray:
        feed = {"input_ids": np.array([chunk], dtype=np.int32),
                "causal_mask": causal_mask(len(chunk), end).numpy().astype(np.float16)}
        return mlmodel.predict(feed, state=state)["logits"][0].astype(np.float32)

    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    state, half = mlmodel.make_state(), n // 2
    rows = [call(state, ids[:half], half)] + [call(state, [t], half + i + 1) for i, t in enumerate(ids[half:])]
    result = {"quant": manifest["quant"], "prefill_and_decode": compare_logits(ref, np.concatenate(rows))}

    prompt, state = ids[:GREEDY_PROMPT], mlmodel.make_state()
    logits, got = call(state, prompt, len(prompt)), []
    for i in range(GREEDY_NEW):
        got.append(int(logits[-1].argmax()))
        logits = call(state, [got[-1]], len(prompt) + i + 1)
    result.update(greedy_fields(torch_greedy(model, prompt, GREEDY_NEW), got))
    need = {"f16": 0.99, "q8": 0.97}.get(manifest["quant"])
    ok = need is None or (result["prefill_and_decode"]["top1_agreement"] >= need and result["greedy_identical"])
    result["passed"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
