import os
import sys
from pathlib import Path

# Tests run on CPU; keep XLA from grabbing every core of the 2-core CI box per worker.
# 8 fake CPU devices in every test process, so sharding tests run in-process; XLA's own
# thread pools are kept small for the 2-core CI box.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "llava_reference"
