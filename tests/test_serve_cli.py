"""`python -m llava_jax.chat` driven through stdin: multi-turn, /image, /reset, streaming to stdout,
the first reply equal to the same request through ChatGenerator; on the other backbones
(serve_util.CHAT_BACKBONES) two turns, the first equal to transformers' greedy `generate` and
ended by the template's end-of-turn token."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from serve_util import CHAT_BACKBONES, STEER_QUESTION, chat_reference, make_chat_checkpoint, rand_image  # noqa: E402

from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# The CLI is backbone-agnostic past the generator: one new backbone (Qwen2 LLM, SigLIP tower, the
# real Qwen2 tokenizer), in the slow run (37 s); test_serve_api serves it through the server in CI.
@pytest.mark.parametrize("backbone", [None, pytest.param("siglip_qwen2", marks=pytest.mark.slow)])
def test_cli_chat_over_stdin(tmp_path, backbone):
    d, _, _ = make_chat_checkpoint(tmp_path / "ckpt", backbone=backbone)
    rand_image(0).save(tmp_path / "a.png")
    rand_image(1, 30, 60).save(tmp_path / "b.png")
    if backbone:  # the conversation over the backbone's chat template (the commands are template-free)
        script = "\n".join([STEER_QUESTION, "What color is it?", "/quit"]) + "\n"
    else:
        script = "\n".join([STEER_QUESTION, "What color is it?", f"/image {tmp_path / 'b.png'}",
                            "And this one?", "/reset", "/nonsense", f"/image {tmp_path / 'missing.png'}", "Hello",
                            "/quit", "never read"]) + "\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "llava_jax.chat", "--model", d, "--image", str(tmp_path / "a.png"),
                        "--temperature", "0", "--max-tokens", "12"], input=script.encode(), capture_output=True,
                       env=env, cwd=ROOT, timeout=600)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()  # bytes: a reply's own "\r\n" kept as it is
    assert r.returncode == 0, r.stderr[-3000:]
    # stdout (stdin not a terminal) is "ASSISTANT: <reply>\n" per turn; a reply may hold newlines itself
    replies = [p.removesuffix("\n") for p in r.stdout.split("ASSISTANT: ")[1:]]
    assert r.stdout.startswith("ASSISTANT: "), r.stdout
    gen = ChatGenerator.from_pretrained(d)
    first_msg = {"role": "user", "content": [{"type": "image", "image": rand_image(0)},
                                             {"type": "text", "text": STEER_QUESTION}]}
    first = gen.chat([first_msg], SamplingParams(max_new_tokens=12))
    assert replies[0] == first.text
    if backbone:
        from test_chat_templates import END

        assert len(replies) == 2, r.stdout
        assert f"(template {gen.template})" in r.stderr and gen.template == "chat_template"
        end = gen.tokenizer.convert_tokens_to_ids(END[CHAT_BACKBONES[backbone]["tokenizer"]])
        ref = chat_reference(d, gen, gen.encode([first_msg]), end, new=12)
        assert ref[-1] == end and len(ref) < 12 and first.finish_reason == "stop"  # ended by the end of turn
        assert replies[0] == gen.tokenizer.decode(ref, skip_special_tokens=True)
        # the second turn renders the first reply closed by the template's end of turn
        second = gen.chat([first_msg, {"role": "assistant", "content": first.text},
                           {"role": "user", "content": "What color is it?"}], SamplingParams(max_new_tokens=12))
        assert replies[1] == second.text
        return
    assert len(replies) == 4, r.stdout
    assert "new conversation" in r.stderr and "conversation reset" in r.stderr
    assert "unknown command /nonsense" in r.stderr and "error:" in r.stderr  # the missing image
