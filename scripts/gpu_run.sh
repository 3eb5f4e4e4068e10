#!/usr/bin/env bash
# Runs ON the lent GPU machine (see benchmarks/gpu.py; prepare here first with scripts/gpu_lease.sh).
#   scripts/gpu_run.sh 1   carry: .whl .gpu/tokenizer .gpu/plays34.txt.gz .gpu/teacher.part1 .gpu/teacher.sha256
#       installs the wheels, checks the stack, keeps teacher half 1 in /tmp, throughput on the 135m pair
#   scripts/gpu_run.sh 2   carry: the same with .gpu/teacher.part2 (a second call to the same warm machine)
#       joins and checks the teacher, runs the GPU demo (real pair), then throughput on the 1.7b pair
# Results land in $OUT: small.tgz (JSON, logs) and kd_student.tgz.part-* (the demo's KD student, fp32).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT" /tmp/res
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok
fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, accelerate, pyarrow; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__)"
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" || echo "TRL not importable: its systems will fail"
python3 -c "import distillery.train, distillery.cache; print('distillery imports ok')"
pack() { tar czf "$OUT/small.tgz" -C /tmp/res . ; ls -la "$OUT"; }
if [ "$1" = 1 ]; then
  cp .gpu/teacher.part1 /tmp/teacher.part1
  timeout 420 python3 benchmarks/gpu.py throughput --tokenizer .gpu/tokenizer --text .gpu/plays34.txt.gz --pairs 135m --steps "${STEPS:-25}" \
      --systems "${SYSTEMS135:-trl_fair,ours_live,student_ce,ours_cached,trl_defaults}" --out /tmp/res/gpu_throughput_135m.json 2>&1 | tee /tmp/res/call1.log | grep -v "it/s\]"
  cp /tmp/distillery-gpu/children.log /tmp/res/children_135m.log 2>/dev/null
  pack
else
  T=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -f /tmp/teacher.part1 ]; then
    cat /tmp/teacher.part1 .gpu/teacher.part2 > $T
    [ "$(sha256sum $T | cut -c1-64)" = "$(cat .gpu/teacher.sha256)" ] && echo "teacher sha256 ok" || { echo "teacher sha256 MISMATCH"; rm -f $T; }
  else
    echo "teacher half 1 is gone (fresh machine): no GPU demo"
  fi
  if [ -f $T ]; then
    timeout "${DEMO_S:-300}" python3 benchmarks/gpu.py demo --teacher $T --extra-text .gpu/plays34.txt.gz --out-dir /tmp/gpu-demo \
        2>&1 | tee /tmp/res/demo.log | grep -v "it/s\]"
    cp /tmp/gpu-demo/results.json /tmp/res/gpu_demo_results.json 2>/dev/null
    for r in kd ce; do cp /tmp/gpu-demo/$r/metrics.jsonl /tmp/res/gpu_demo_${r}_metrics.jsonl 2>/dev/null; done
    if [ -f /tmp/gpu-demo/kd/student/model.safetensors ]; then
      tar czf /tmp/kd_student.tgz -C /tmp/gpu-demo/kd student/model.safetensors student/config.json student/generation_config.json
      split -b 15M -d /tmp/kd_student.tgz "$OUT/kd_student.tgz.part-"
    fi
  fi
  pack
  timeout "${BIG_S:-200}" python3 benchmarks/gpu.py throughput --tokenizer .gpu/tokenizer --text .gpu/plays34.txt.gz --pairs 1.7b --steps "${STEPS:-25}" \
      --systems "${SYSTEMS17:-trl_fair,ours_live,student_ce}" --out /tmp/res/gpu_throughput_1.7b.json 2>&1 | tee /tmp/res/call2.log | grep -v "it/s\]"
  cp /tmp/distillery-gpu/children.log /tmp/res/children_1.7b.log 2>/dev/null
  pack
fi
