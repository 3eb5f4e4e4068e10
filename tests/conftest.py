import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tests use tiny models: one thread is ~10x faster for them than several threads fighting over
# two cores (and keeps parallel test processes from oversubscribing the machine).
torch.set_num_threads(int(os.environ.get("DISTILLERY_TEST_THREADS", "1")))

# The fp32 parity tests (accumulation == one batch, DDP == one process, resume == uninterrupted) hold to
# 1e-6; on a CPU whose bf16 probe passes, `auto` precision would train in bf16. Pin fp32 here, also for the
# subprocesses tests start; tests/test_hardware.py tests the probe itself (it clears this variable).
os.environ.setdefault("DISTILLERY_CPU_BF16", "0")
