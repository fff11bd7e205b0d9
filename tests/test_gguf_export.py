"""GGUF export (`python -m llava_jax.export --format=gguf`), validated with the gguf package's own
reader: architectures, metadata keys, tensor names and shapes in llama.cpp's LLaVA layout, and the
weights read back (f16 / q8_0 dequantized by gguf) equal to the llava-hf ones (Q/K rows in GGML's
RoPE order). Running the files in llama.cpp itself is not part of this test (docs/export.md)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from shapes_model import make_shapes_model

REPO = Path(__file__).resolve().parents[1]
gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e '.[gguf]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    make_shapes_model(root, num_eval=2)
    return root / "hf"


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _val(r, key):
    f = r.fields[key]
    return f.contents()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_layout_and_weights(model_dir, tmp_path, quant):
    from llava_jax.convert.gguf_export import _permute
    from llava_jax.export import export_gguf_checkpoint as export_checkpoint

    if quant == "f16":
        files = export_checkpoint(str(tmp_path), model_dir=str(model_dir), quant=quant)
    else:  # the CLI, in a subprocess (importing llava_jax.export would define its absl flags here)
        p = subprocess.run([sys.executable, "-m", "llava_jax.export", "--format=gguf", f"--model={model_dir}",
                            f"--out={tmp_path}", f"--quant={quant}"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)})
        assert p.returncode == 0, p.stderr[-2000:]
        files = {"llm": tmp_path / f"hf-{quant}.gguf", "mmproj": tmp_path / "mmproj-hf-f16.gguf",
                 "modelfile": tmp_path / "Modelfile"}
    assert files["llm"].name == f"hf-{quant}.gguf" and files["mmproj"].name == "mmproj-hf-f16.gguf"
    mf = files["modelfile"].read_text()
    assert f"FROM ./hf-{quant}.gguf" in mf and "FROM ./mmproj-hf-f16.gguf" in mf and "ASSISTANT:" in mf
    hf = load_file(str(model_dir / "model.safetensors"))

    r, t = _read(files["llm"])
    assert _val(r, "general.architecture") == "llama"
    assert _val(r, "llama.block_count") == 2 and _val(r, "llama.attention.head_count") == 4
    assert _val(r, "llama.attention.head_count_kv") == 2 and _val(r, "llama.embedding_length") == 32
    assert _val(r, "tokenizer.ggml.model") == "llama"
    vocab = hf["language_model.lm_head.weight"].shape[0]
    assert len(_val(r, "tokenizer.ggml.tokens")) == vocab
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(t) == names
    want_type = "F16" if quant == "f16" else "Q8_0"
    for name, hf_key, heads in [("blk.1.attn_q.weight", "language_model.model.layers.1.self_attn.q_proj.weight", 4),
                                ("blk.0.attn_k.weight", "language_model.model.layers.0.self_attn.k_proj.weight", 2),
                                ("blk.0.ffn_down.weight", "language_model.model.layers.0.mlp.down_proj.weight", 0),
                                ("output.weight", "language_model.lm_head.weight", 0)]:
        ref = hf[hf_key]
        ref = _permute(ref, heads) if heads else ref
        assert t[name].tensor_type.name == want_type
        assert tuple(int(x) for x in t[name].shape) == ref.shape[::-1]  # GGUF lists ne0 (columns) first
        got = gguf.quants.dequantize(t[name].data, t[name].tensor_type).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, atol=2e-3 if quant == "f16" else 0.02 * np.abs(ref).max())
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    r, t = _read(files["mmproj"])
    assert _val(r, "general.architecture") == "clip"
    assert _val(r, "clip.has_llava_projector") is True and _val(r, "clip.projector_type") == "mlp"
    assert _val(r, "clip.vision.image_size") == 16 and _val(r, "clip.vision.patch_size") == 8
    assert _val(r, "clip.vision.block_count") == 2 and _val(r, "clip.vision.feature_layer") == [2]
    assert _val(r, "clip.use_gelu") is False  # quick_gelu
    expect = {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
              "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} | {
        f"v.blk.{i}.{n}.{p}" for i in range(2) for n in
        ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_down", "ffn_up") for p in ("weight", "bias")}
    assert set(t) == expect
    for name, hf_key in [("v.blk.0.ffn_down.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
                         ("v.patch_embd.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"),
                         ("mm.2.weight", "multi_modal_projector.linear_2.weight"),
                         ("mm.0.bias", "multi_modal_projector.linear_1.bias")]:
        ref = hf[hf_key]
        assert tuple(int(x) for x in t[name].shape) == ref.shape[::-1]
        got = np.asarray(t[name].data, np.float32).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, atol=2e-3)


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_hf", "chatml", "qwen2", "llama_2"])
def test_chat_template_renders_as_llava_jax(name):
    """The Jinja chat template written into the LLM GGUF (llama.cpp's tools and server apply it)
    renders exactly llava-jax's prompt; templates of another shape get none (and no Modelfile
    TEMPLATE)."""
    jinja2 = pytest.importorskip("jinja2")
    from llava_jax.convert.gguf_export import chat_template_jinja, modelfile
    from llava_jax.data.templates import render

    j = chat_template_jinja(name)
    if name == "llama_2":
        assert j is None and "TEMPLATE" not in modelfile("a.gguf", "m.gguf", name).replace("no TEMPLATE", "")
        return
    tpl = jinja2.Environment().from_string(j)
    for conv in ([("human", "<image>\nWhat is it?")], [("system", "Be brief."), ("human", "q1"), ("gpt", "a1"),
                                                       ("human", "<image>\nq2")], [("system", ""), ("human", "x")]):
        msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(r, r), "content": c} for r, c in conv]
        assert tpl.render(messages=msgs, add_generation_prompt=True) == render(name, conv, True).text


def test_gguf_has_chat_template(model_dir, tmp_path):
    from llava_jax.convert.gguf_export import chat_template_jinja
    from llava_jax.export import export_gguf_checkpoint as export_checkpoint

    files = export_checkpoint(str(tmp_path), model_dir=str(model_dir), quant="f16")
    r, _ = _read(files["llm"])
    assert _val(r, "tokenizer.chat_template") == chat_template_jinja("vicuna_v1")
