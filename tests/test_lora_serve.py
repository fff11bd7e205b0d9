"""`--adapter DIR` for the server and the chat CLI: a PEFT LoRA adapter written by PEFT itself on
the tiny chat checkpoint, loaded onto that base (merged at load, or kept unmerged), gives the
greedy tokens of transformers + PEFT for one image prompt; the chat CLI with `--adapter` replies
what the adapted generator does; an adapter of another geometry is refused naming the tensor and
both shapes."""
import argparse
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from serve_util import make_chat_checkpoint, rand_image  # noqa: E402

from llava_jax.models.pixels import normalize  # noqa: E402
from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402

NEW = 10
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """(checkpoint dir, adapter dir, the PEFT model): B random (init_lora_weights=False), large
    enough that the adapter changes the greedy tokens."""
    root = tmp_path_factory.mktemp("adapter")
    d, hf, _ = make_chat_checkpoint(root / "ckpt")
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                 target_modules=TARGETS)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    pm.save_pretrained(root / "adapter")
    return d, root / "adapter", pm


def _messages():
    return [{"role": "user", "content": [{"type": "image", "image": rand_image(0)},
                                         {"type": "text", "text": "What is in the image?"}]}]


def _greedy(gen, enc):
    return gen.engine.generate([enc.ids], enc.images[None], np.ones((1, len(enc.images)), bool),
                               SamplingParams(max_new_tokens=NEW))[0]


def _hf_greedy(model, enc):
    pixels = np.transpose(np.asarray(normalize(enc.images)), (0, 3, 1, 2))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([enc.ids]), pixel_values=torch.tensor(pixels),
                             attention_mask=torch.ones((1, len(enc.ids)), dtype=torch.long), max_new_tokens=NEW,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, len(enc.ids):]]


def test_adapter_greedy_tokens_equal_transformers_peft(base_and_adapter):
    d, adapter, pm = base_and_adapter
    merged = ChatGenerator.from_pretrained(d, adapter=adapter)
    assert merged.model.config.lora is None  # folded into the kernels
    enc = merged.encode(_messages())
    ref = _hf_greedy(pm, enc)
    with pm.disable_adapter():
        plain = _hf_greedy(pm, enc)
    assert ref != plain  # the adapter changes the answer
    assert _greedy(merged, enc) == ref
    unmerged = ChatGenerator.from_pretrained(d, adapter=adapter, merge_adapter=False)
    assert unmerged.model.config.lora.rank == 4
    assert _greedy(unmerged, enc) == ref


def test_chat_cli_with_adapter(base_and_adapter, tmp_path):
    from llava_jax.serve.cli import main

    d, adapter, _ = base_and_adapter
    rand_image(0).save(tmp_path / "a.png")
    out = io.StringIO()
    rc = main(["--model", d, "--adapter", str(adapter), "--image", str(tmp_path / "a.png"), "--temperature", "0",
               "--max-tokens", str(NEW)], stdin=io.StringIO("What is in the image?\n"), stdout=out)
    assert rc == 0
    reply = [line for line in out.getvalue().splitlines() if line.startswith("ASSISTANT: ")]
    gen = ChatGenerator.from_pretrained(d, adapter=adapter)
    want = gen.chat(_messages(), SamplingParams(max_new_tokens=NEW)).text
    assert reply == [f"ASSISTANT: {want}"]


def test_adapter_of_another_geometry_is_refused(base_and_adapter, tmp_path, capsys):
    """The server and the chat CLI share the loading: one error line naming the adapter, the
    tensor and both shapes."""
    from safetensors.numpy import load_file, save_file

    from llava_jax.serve.__main__ import add_model_args, load_generator

    d, adapter, _ = base_and_adapter
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.0.self_attn.q_proj.lora_A" in k)
    tensors[key] = np.zeros((4, 40), np.float32)  # a base of hidden size 40, not 48
    save_file(tensors, bad / "adapter_model.safetensors")
    p = argparse.ArgumentParser()
    add_model_args(p)
    with pytest.raises(SystemExit) as e:
        load_generator(p.parse_args(["--model", d, "--adapter", str(bad)]))
    msg = str(e.value)
    print(msg)
    assert "cannot put the adapter" in msg and str(bad) in msg
    assert key in msg and "(4, 40)" in msg and "(4, 48)" in msg
