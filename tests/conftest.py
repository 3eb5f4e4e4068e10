import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tests use tiny models: one thread is ~10x faster for them than several threads fighting over
# two cores (and keeps parallel test processes from oversubscribing the machine).
torch.set_num_threads(int(os.environ.get("DISTILLERY_TEST_THREADS", "1")))
