"""`python -m llava_jax.chat` driven through stdin: multi-turn, /image, /reset, streaming to stdout,
the first reply equal to the same request through ChatGenerator."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from serve_util import make_chat_checkpoint, rand_image  # noqa: E402

from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_cli_chat_over_stdin(tmp_path):
    d, _, _ = make_chat_checkpoint(tmp_path / "ckpt")
    rand_image(0).save(tmp_path / "a.png")
    rand_image(1, 30, 60).save(tmp_path / "b.png")
    script = "\n".join(["What is in the image?", "What color is it?", f"/image {tmp_path / 'b.png'}",
                        "And this one?", "/reset", "/nonsense", f"/image {tmp_path / 'missing.png'}", "Hello", "/quit",
                        "never read"]) + "\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "llava_jax.chat", "--model", d, "--image", str(tmp_path / "a.png"),
                        "--temperature", "0", "--max-tokens", "12"], input=script, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    replies = [line[len("ASSISTANT: "):] for line in r.stdout.splitlines() if line.startswith("ASSISTANT: ")]
    assert len(replies) == 4, r.stdout
    assert "new conversation" in r.stderr and "conversation reset" in r.stderr
    assert "unknown command /nonsense" in r.stderr and "error:" in r.stderr  # the missing image
    gen = ChatGenerator.from_pretrained(d)
    first = gen.chat([{"role": "user", "content": [{"type": "image", "image": rand_image(0)},
                                                    {"type": "text", "text": "What is in the image?"}]}],
                     SamplingParams(max_new_tokens=12))
    assert replies[0] == first.text
