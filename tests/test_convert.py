"""HF checkpoints in and out: every layout transformers reads, original LLaVA, CLIP + LLaMA,
stage-1 projector files, sharded export (never into a folder holding an old model unless asked),
and the errors for bad checkpoints."""
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import LlavaForConditionalGeneration  # noqa: E402

import llava_jax  # noqa: E402
from hf_util import make_batch, make_hf_llava, torch_logits  # noqa: E402
from llava_jax.convert.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402


def _tensors(d):
    f = SafetensorsFile(d / "model.safetensors")
    return {k: np.array(f.get(k)) for k in f.keys()}


def _logits(model, hf):
    ids, mask, px = make_batch(hf)
    return np.asarray(model(ids, pixel_values=px, attention_mask=mask)), torch_logits(hf, ids, mask, px), mask


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = make_hf_llava("gqa_llama3_list_tied", seed=1)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return hf, d


@pytest.mark.parametrize("name", ["mha_default_rope", "gqa_llama3_list_tied", "gqa_linear_rope_bias_full",
                                  "siglip_head_full"])
def test_round_trip_through_transformers(name, tmp_path):
    hf = make_hf_llava(name, seed=3)
    hf.save_pretrained(tmp_path / "in")
    model = llava_jax.from_pretrained(tmp_path / "in")
    llava_jax.save_pretrained(model, tmp_path / "out", max_shard_size=20_000)  # force several shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # The export uses the legacy llava-hf key layout.
    assert all(re.match(r"(language_model\.|vision_tower\.vision_model\.|multi_modal_projector\.)", k)
               for k in index["weight_map"])
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, px = make_batch(hf)
    ref, again = torch_logits(hf, ids, mask, px), torch_logits(back.eval(), ids, mask, px)
    valid = mask.astype(bool)
    assert np.abs(again - ref)[valid].max() <= 1e-6
    # And our own reload of the export.
    ours = np.asarray(llava_jax.from_pretrained(tmp_path / "out")(ids, pixel_values=px, attention_mask=mask))
    assert np.abs(ours - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("layout", ["model_prefix", "model_prefix_vision_model", "legacy_vision_model"])
def test_transformers5_key_layouts(layout, hf_dir, tmp_path):
    hf, d = hf_dir
    tensors = _tensors(d)

    def rename(k):
        if layout == "legacy_vision_model":
            return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k
        k = k.replace("language_model.model.", "model.language_model.", 1)
        k = k.replace("language_model.lm_head.", "lm_head.", 1)
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.", 1) if k.startswith("multi_modal") else k
        if k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            k = "model.vision_tower." + ("vision_model." + rest if layout == "model_prefix_vision_model" else rest)
        return k

    out = tmp_path / "ckpt"
    out.mkdir()
    items = [(rename(k), v) for k, v in tensors.items()]
    items.append(("model.language_model.rotary_emb.inv_freq", np.zeros(4, np.float32)))  # stale buffers
    items.append(("vision_tower.vision_model.embeddings.position_ids", np.arange(10)[None]))
    write_safetensors(out / "model.safetensors", items)
    (out / "config.json").write_text((d / "config.json").read_text())
    ours, ref, mask = _logits(llava_jax.from_pretrained(out), hf)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def _write_clip_dir(hf, path):
    """A CLIPModel dir as released (openai/clip-vit-*): `vision_model.*` and `text_model.*` keys."""
    tower = hf.model.vision_tower
    tower.save_pretrained(path)  # transformers 5 writes bare `embeddings.*` keys here
    items = [("vision_model." + k, v.detach().numpy()) for k, v in tower.state_dict().items()
             if not k.endswith("position_ids")]
    items += [("text_model.embeddings.token_embedding.weight", np.zeros((8, 4), np.float32)),
              ("logit_scale", np.zeros((), np.float32)), ("visual_projection.weight", np.zeros((4, 4), np.float32))]
    write_safetensors(path / "model.safetensors", items)
    cfg = {"model_type": "clip", "architectures": ["CLIPModel"],
           "vision_config": json.loads((path / "config.json").read_text()), "text_config": {}}
    (path / "config.json").write_text(json.dumps(cfg))


def _original_llava_dir(hf, d, path, with_projector=True):
    """Rewrite a llava-hf checkpoint in the original LLaVA (LlavaLlamaForCausalLM) layout."""
    path.mkdir()
    items = []
    for k, v in _tensors(d).items():
        if k.startswith("language_model.model."):
            items.append(("model." + k[len("language_model.model."):], v))
        elif k == "language_model.lm_head.weight":
            items.append(("lm_head.weight", v))
        elif k.startswith("multi_modal_projector.") and with_projector:
            n, kind = re.match(r"multi_modal_projector\.linear_(\d)\.(\w+)", k).groups()
            items.append((f"model.mm_projector.{(int(n) - 1) * 2}.{kind}", v))
    if "lm_head.weight" not in dict(items):  # tied: the original checkpoint still stores lm_head
        items.append(("lm_head.weight", dict(items)["model.embed_tokens.weight"]))
    write_safetensors(path / "model.safetensors", items)
    text = json.loads((d / "config.json").read_text())["text_config"]
    cfg = dict(text, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=24,
               image_aspect_ratio="pad", tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(cfg))


def test_original_llava_layout(tmp_path):
    hf = make_hf_llava("mha_default_rope", seed=4)  # untied, single feature layer: the LLaVA-1.5 shape
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    _write_clip_dir(hf, tmp_path / "clip")
    _original_llava_dir(hf, d, tmp_path / "orig")
    model = llava_jax.from_pretrained(tmp_path / "orig", clip_path=tmp_path / "clip", image_token_id=100)
    assert model.config.projector_type == "mlp2x_gelu"
    ours, ref, mask = _logits(model, hf)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def test_clip_plus_llama_fresh_projector_then_stage1_projector(tmp_path):
    hf = make_hf_llava("mha_default_rope", seed=5)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    _write_clip_dir(hf, tmp_path / "clip")
    hf.model.language_model.save_pretrained(tmp_path / "llama_base")  # a LlamaModel: keys without "model."
    # A LLaMA/Vicuna dir as users have it: LlamaForCausalLM keys.
    _original_llava_dir(hf, d, tmp_path / "llama", with_projector=False)
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    for k in [k for k in cfg if k.startswith("mm_")] + ["image_aspect_ratio"]:
        cfg.pop(k)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))

    fresh = llava_jax.from_pretrained(tmp_path / "llama", clip_path=tmp_path / "clip", image_token_id=100)
    # LLM and tower weights are the checkpoint's; the projector is new (random, right shapes).
    np.testing.assert_array_equal(np.asarray(fresh.llm.embed.value),
                                  hf.model.language_model.embed_tokens.weight.detach().numpy())
    k1 = np.asarray(fresh.projector.linear_1_kernel.value)
    assert k1.shape == (32, 32) and not np.allclose(k1, hf.model.multi_modal_projector.linear_1.weight.detach().numpy().T)

    # A stage-1 output (the original's mm_projector.bin, as a pickle) completes the model.
    proj = {f"model.mm_projector.{i}.{kind}": getattr(getattr(hf.model.multi_modal_projector, f"linear_{n}"), kind).detach().clone()
            for i, n in ((0, 1), (2, 2)) for kind in ("weight", "bias")}
    torch.save(proj, tmp_path / "mm_projector.bin")
    full = llava_jax.from_pretrained(tmp_path / "llama", clip_path=tmp_path / "clip",
                                     projector_path=tmp_path / "mm_projector.bin", image_token_id=100)
    ours, ref, mask = _logits(full, hf)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def test_bf16_export_loads_in_transformers(hf_dir, tmp_path):
    hf, d = hf_dir
    model = llava_jax.from_pretrained(d)
    llava_jax.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    f = SafetensorsFile(tmp_path / "bf16" / "model.safetensors")
    assert str(f.get(f.keys()[0]).dtype) == "bfloat16"
    back = llava_jax.from_pretrained(tmp_path / "bf16")
    a = np.asarray(back.llm.embed.value)
    b = np.asarray(model.llm.embed.value)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16")


def test_export_over_an_old_model_needs_overwrite_and_leaves_no_stale_shards(hf_dir, tmp_path):
    """A single-file export over a sharded one used to leave the old shards and their index,
    which the loader then read instead of the new file."""
    _, d = hf_dir
    old = llava_jax.from_pretrained(d)
    out = tmp_path / "out"
    llava_jax.save_pretrained(old, out, max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("the user's own file")
    new = llava_jax.from_pretrained(d)
    new.llm.embed.value = new.llm.embed.value + 1.0
    with pytest.raises(FileExistsError, match="not empty: pass --overwrite"):
        llava_jax.save_pretrained(new, out)
    assert (out / "model.safetensors.index.json").exists()  # refused: nothing touched
    llava_jax.save_pretrained(new, out, overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    back = llava_jax.from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(back.llm.embed.value), np.asarray(new.llm.embed.value))


# ------------------------------------------------------------------ bad checkpoints
def _rewrite(d, out, edit):
    out.mkdir()
    items = edit(list(_tensors(d).items()))
    write_safetensors(out / "model.safetensors", items)
    (out / "config.json").write_text((d / "config.json").read_text())
    return out


def test_wrong_shape_names_key_and_shapes(hf_dir, tmp_path):
    _, d = hf_dir
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    bad = _rewrite(d, tmp_path / "bad", lambda items: [(k, v[:-1] if k == key else v) for k, v in items])
    with pytest.raises(llava_jax.CheckpointError) as e:
        llava_jax.from_pretrained(bad)
    msg = str(e.value)
    assert key in msg and "expected (16, 48)" in msg and "found (15, 48)" in msg


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
    _, d = hf_dir
    gone = "vision_tower.encoder.layers.2.mlp.fc1.bias"
    bad = _rewrite(d, tmp_path / "bad", lambda items: [(k, v) for k, v in items if k != gone]
                   + [("language_model.model.extra.weight", np.zeros(3, np.float32))])
    with pytest.raises(llava_jax.CheckpointError) as e:
        llava_jax.from_pretrained(bad)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "vision_tower.vision_model.encoder.layers.2.mlp.fc1.bias" in msg
    assert "unexpected keys (1)" in msg and "language_model.model.extra.weight" in msg


def test_unknown_architecture_says_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unknown architecture model_type='gemma'.*supported: llava"):
        llava_jax.from_pretrained(tmp_path)
    # a plain Mistral / Qwen2 LLM dir is a stage-1 start: it needs the CLIP dir beside it
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"mistral/original-LLaVA checkpoint; pass clip_path"):
        llava_jax.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "gemma"}}))
    with pytest.raises(ValueError, match="unsupported text model_type 'gemma'; supported: llama"):
        llava_jax.from_pretrained(tmp_path)


def test_llava_config_json_round_trip(hf_dir):
    from transformers import LlavaConfig as HFLlavaConfig

    _, d = hf_dir
    src = json.loads((d / "config.json").read_text())
    ours = llava_jax.LlavaConfig.from_hf_dict(src)
    again = HFLlavaConfig(**{k: v for k, v in ours.to_hf_dict().items() if k != "architectures"})
    assert again.text_config.rope_parameters == src["text_config"]["rope_parameters"]
    assert list(again.vision_feature_layer) == src["vision_feature_layer"]
    assert again.tie_word_embeddings == src["tie_word_embeddings"]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
        assert getattr(again.vision_config, k) == src["vision_config"][k]
    for k in ("hidden_size", "num_key_value_heads", "vocab_size", "intermediate_size"):
        assert getattr(again.text_config, k) == src["text_config"][k]


def test_a_broken_weight_file_is_named_in_the_error(tmp_path):
    import llava_jax

    good = tmp_path / "ok.safetensors"
    write_safetensors(good, [("a", np.ones((4, 4), np.float32))])
    data = good.read_bytes()
    for name, blob in {"truncated": data[:-8], "garbage": b"\x00" * 5, "header": b"\xff" * 64}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=f"{bad}"):
            SafetensorsFile(bad).get("a")
    with pytest.raises(ValueError, match="broken.safetensors"):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
        (tmp_path / "m" / "broken.safetensors").write_bytes(data[:20])
        llava_jax.from_pretrained(tmp_path / "m")


def test_a_broken_header_or_index_is_named_in_the_error(tmp_path):
    """The header length is checked against the file size before anything is read; a broken
    index names the index file (it was a bare JSONDecodeError / KeyError)."""
    import struct

    blobs = {
        "huge": (struct.pack("<Q", 2**62) + b"{}", "header length 4611686018427387904 does not fit"),
        "longer_than_file": (struct.pack("<Q", 1000) + b'{"a": 1}', "header length 1000 does not fit"),
        "short": (b"\x01\x02\x03", "too short"),
        "not_json": (struct.pack("<Q", 4) + b"abcd", "header is not JSON"),
    }
    for name, (blob, why) in blobs.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*{why}"):
            SafetensorsFile(bad)
    for name, text in {"not_json": "{not json", "no_map": "{}", "a_list": "[1, 2]"}.items():
        d = tmp_path / f"index_{name}"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llava"}')
        (d / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(d / 'model.safetensors.index.json'))} is not a readable"):
            llava_jax.from_pretrained(d)
