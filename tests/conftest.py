import os

import pytest
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


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """An offline LLaMA-style tokenizer with <image> and <pad> added (data-pipeline tests)."""
    from transformers import AutoTokenizer

    from llava_jax.data.tokenize import add_llava_special_tokens
    from tokenizer_util import make_llama_tokenizer

    tok = AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path_factory.mktemp("tok"), llava_tokens=True))
    add_llava_special_tokens(tok)
    return tok
