"""Other LLM backbones through the one scanned decoder, against transformers on tiny random LLaVA
checkpoints: Qwen2 (q/k/v biases, no o bias; untied and tied head) and Mistral with a sliding window (5)
shorter than every sequence here. fp32 logits, greedy generation past the window (the serving
engine's KV cache), the fused attention impls on packed rows, the llava-hf export (transformers
loads it: same architecture, equal logits), the PEFT adapter export, the GGUF refusal, and a
short stage-2 training run (also on Llama-3's layout and the SigLIP tower). Llama-3's parity
(llama3 RoPE) is `gqa_llama3_list_tied` in tests/test_model_parity.py; packing is in
tests/test_packing.py."""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llava_jax  # noqa: E402
from hf_util import (BACKBONES, CONFIGS, IMAGE_TOKEN, hf_generate, make_batch, make_hf_llava,  # noqa: E402
                     num_image_tokens, torch_logits)
from llava_jax.config import LlavaConfig  # noqa: E402
from llava_jax.presets import PRESETS  # noqa: E402


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def pair(request, tmp_path_factory):
    hf = make_hf_llava(request.param, seed=4)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d, llava_jax.from_pretrained(d)


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_config_reads_the_architecture(pair):
    name, hf, d, model = pair
    t = model.config.text
    tc = hf.config.text_config
    assert t.model_type == tc.model_type
    if t.model_type == "qwen2":
        assert (t.attention_bias, t.o_proj_bias) == (True, False) and t.sliding_window is None
        assert t.tie_word_embeddings == tc.tie_word_embeddings == (name == "qwen2_tied")
        assert hasattr(model.llm, "lm_head") != t.tie_word_embeddings  # tied: the embedding is the head
    else:
        assert (t.attention_bias, t.o_proj_bias, t.sliding_window) == (False, False, tc.sliding_window)
    layers = model.llm.layers
    assert all(hasattr(layers, f"{n}_bias") == t.attention_bias for n in "qkv")
    assert not hasattr(layers, "o_bias")


def test_fp32_logits_match(pair):
    name, hf, d, model = pair
    ids, mask, px = make_batch(hf)
    ref = torch_logits(hf, ids, mask, px)
    out = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask))
    diff = _max_diff(out, ref, mask)
    print(f"{name}: fp32 max|diff| = {diff:.2e}")
    assert diff <= 1e-4
    if model.config.text.sliding_window is not None:  # the window shapes the reference's logits
        tc = hf.config.text_config
        tc.sliding_window, window = None, tc.sliding_window
        try:
            full = torch_logits(hf, ids, mask, px)
        finally:
            tc.sliding_window = window
        assert _max_diff(full, ref, mask) > 1e-3


def _greedy_equals_transformers(hf, model, new=12):
    """Two prompts of different lengths (left-padded), `new` greedy tokens from the serving
    engine and from transformers' `generate`."""
    from llava_jax.serve.engine import Engine, SamplingParams

    rng = np.random.default_rng(5)
    t = num_image_tokens(hf)
    prompts = []
    for n in (3, 8):
        text = rng.integers(3, hf.config.text_config.vocab_size, n)
        text[text == IMAGE_TOKEN] = 4
        prompts.append([1] + [IMAGE_TOKEN] * t + list(map(int, text)))
    s = hf.config.vision_config.image_size
    pixels = rng.normal(size=(2, 3, s, s)).astype(np.float32)
    ref = hf_generate(hf, prompts, pixels, new=new)
    images = np.transpose(pixels, (0, 2, 3, 1))[:, None]
    ours = Engine(model).generate(prompts, images, np.ones((2, 1), bool), SamplingParams(max_new_tokens=new))
    assert ours == ref
    assert min(len(set(r)) for r in ref) > 2  # not a degenerate repetition


def test_greedy_generation_equals_transformers(pair):
    """For Mistral every step attends through a window of 5 over the KV cache."""
    name, hf, d, model = pair
    _greedy_equals_transformers(hf, model)


# The LLaVA-OneVision pairing, SigLIP (no class token, "full" features) x Qwen2 (q/k/v biases).
SIGLIP_QWEN2 = dict(BACKBONES["qwen2_gqa_bias"], vision_type="siglip", vision=CONFIGS["siglip_head_full"]["vision"],
                    llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full"))


def test_siglip_tower_with_qwen2(tmp_path):
    """SigLIP x Qwen2: fp32 logits, greedy generation and the llava-hf export against
    transformers."""
    from transformers import LlavaForConditionalGeneration

    hf = make_hf_llava(SIGLIP_QWEN2, seed=0)
    hf.save_pretrained(tmp_path / "in")
    model = llava_jax.from_pretrained(tmp_path / "in")
    assert (model.config.vision.model_type, model.config.text.model_type) == ("siglip_vision_model", "qwen2")
    ids, mask, px = make_batch(hf)
    ref = torch_logits(hf, ids, mask, px)
    assert _max_diff(np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask)), ref, mask) <= 1e-4
    _greedy_equals_transformers(hf, model)
    llava_jax.save_pretrained(model, tmp_path / "out")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert _max_diff(torch_logits(back, ids, mask, px), ref, mask) <= 1e-6


@pytest.mark.parametrize("impl", ["dpa", "dpa_padded", "pallas", "splash"])
def test_fused_attention_impls_equal_xla(pair, impl):
    """The fused impls (window via local_window_size or splash's LocalMask; Pallas falls back to the mask) give the
    xla path's logits on a packed row (dpa_padded: one right-padded segment per row)."""
    name, hf, d, model = pair
    rng = np.random.default_rng(6)
    vocab = model.config.text.vocab_size
    ids = rng.integers(3, vocab, (2, 16))
    ids[ids == IMAGE_TOKEN] = 4
    if impl == "dpa_padded":
        seg = np.array([[1] * 13 + [0] * 3, [1] * 16])
        pos = np.where(seg > 0, np.arange(16), 0)
    else:
        seg = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 7 + [2] * 9])
        pos = np.array([list(range(9)) + list(range(5)) + [0, 0], list(range(7)) + list(range(9))])
    other = llava_jax.from_pretrained(d, attention_impl=impl)
    ref = np.asarray(model(ids, segment_ids=seg, positions=pos))
    out = np.asarray(other(ids, segment_ids=seg, positions=pos))
    assert _max_diff(out, ref, seg > 0) <= 1e-5


def test_export_loads_in_transformers_with_equal_logits(pair, tmp_path):
    from transformers import LlavaForConditionalGeneration

    name, hf, d, model = pair
    llava_jax.save_pretrained(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == hf.config.text_config.model_type
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(back.config.text_config) is type(hf.config.text_config)
    assert back.config.text_config.sliding_window == hf.config.text_config.sliding_window
    ids, mask, px = make_batch(hf)
    ref, again = torch_logits(hf, ids, mask, px), torch_logits(back.eval(), ids, mask, px)
    assert _max_diff(again, ref, mask) <= 1e-6
    assert llava_jax.from_pretrained(tmp_path / "out").config == model.config


def test_clip_plus_llm_dir_is_read_as_its_architecture(pair, tmp_path):
    """The stage-1 start: a CLIP dir + a Qwen2 / Mistral `*ForCausalLM` dir (+ the stage-1
    projector) gives the llava-hf model's logits."""
    from transformers import AutoModelForCausalLM

    name, hf, d, _ = pair
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    lm = AutoModelForCausalLM.from_config(hf.config.text_config)
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    lm.save_pretrained(tmp_path / "llm")
    proj = {f"multi_modal_projector.{k}": v for k, v in hf.model.multi_modal_projector.state_dict().items()}
    torch.save(proj, tmp_path / "mm_projector.bin")
    model = llava_jax.from_pretrained(tmp_path / "llm", clip_path=tmp_path / "clip",
                                      projector_path=tmp_path / "mm_projector.bin", image_token_id=IMAGE_TOKEN)
    assert model.config.text == pair[3].config.text
    ids, mask, px = make_batch(hf)
    out = np.asarray(model(ids, pixel_values=px, attention_mask=mask))
    assert _max_diff(out, torch_logits(hf, ids, mask, px), mask) <= 1e-4


def test_peft_adapter_export_loads_in_peft(pair, tmp_path):
    """Qwen2 only: PEFT names modules, not biases, so its adapter keys are LLaMA's; Mistral's
    layer is LLaMA's (tests/test_lora.py). The tied Qwen2 has the same adapters (none on the head)."""
    peft = pytest.importorskip("peft")
    if pair[0].startswith("mistral"):
        pytest.skip("Mistral's layer layout is LLaMA's: covered by tests/test_lora.py")
    if pair[0] == "qwen2_tied":
        pytest.skip("the adapters (q/k/v/o, MLP) are the untied Qwen2's: covered by qwen2_gqa_bias")
    import jax
    from flax import nnx

    from llava_jax.convert import peft as lpeft
    from llava_jax.models.lora import LoraConfig

    name, hf, d, _ = pair
    model = lpeft.add_lora(llava_jax.from_pretrained(d), LoraConfig(rank=4, alpha=8))
    key = jax.random.key(0)
    for n, var in sorted(nnx.state(model.llm.layers.lora, nnx.Param).items()):  # adapters that do something
        key, k = jax.random.split(key)
        getattr(model.llm.layers.lora, n).value = 0.2 * jax.random.normal(k, var.value.shape, var.value.dtype)
    ids, mask, px = make_batch(hf)
    ours = np.asarray(model(ids, pixel_values=px, attention_mask=mask))
    lpeft.save_adapter(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(make_hf_llava(name, seed=4), tmp_path / "adapter").eval()
    ref = torch_logits(pm, ids, mask, px)
    assert _max_diff(torch_logits(hf, ids, mask, px), ref, mask) > 1e-2  # the adapter matters
    assert _max_diff(ours, ref, mask) <= 1e-5 * np.abs(ref).max()


def test_gguf_export_refuses_what_it_would_write_wrong(pair, tmp_path):
    pytest.importorskip("gguf")
    from llava_jax.convert.gguf_export import export_gguf

    name, hf, d, model = pair
    with pytest.raises(NotImplementedError, match="Qwen2|sliding-window"):
        export_gguf(model, None, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


def _stage2_reduces_the_loss(name, d):
    """Four stage-2 steps (projector + LLM trained, tower frozen) of the llava-hf dir `d` on one
    synthetic batch: the loss drops."""
    from train_util import run_steps, synthetic_batch

    model = llava_jax.from_pretrained(d)
    batch = synthetic_batch(model.config, batch=4, length=16)
    *_, losses = run_steps(model, [r"projector/.*", r"llm/.*"], batch, steps=4, lr=3e-3)
    print(f"{name}: losses {losses}")
    assert losses[-1] < losses[0] - 0.1


def test_stage2_training_reduces_the_loss(pair):
    name, hf, d, _ = pair
    _stage2_reduces_the_loss(name, d)


@pytest.mark.parametrize("name", ["gqa_llama3_list_tied", "siglip_head_full", "siglip_qwen2"])
def test_stage2_training_reduces_the_loss_llama3_and_siglip(name, tmp_path):
    """The same run on the Llama-3 layout (GQA, llama3 RoPE, tied head; hf_util.CONFIGS) and on
    the SigLIP tower, with LLaMA and with Qwen2."""
    make_hf_llava(SIGLIP_QWEN2 if name == "siglip_qwen2" else name, seed=4).save_pretrained(tmp_path)
    _stage2_reduces_the_loss(name, tmp_path)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_config_round_trips_through_transformers(preset):
    """Every preset's HF config builds the right transformers config class and reads back equal."""
    from transformers import LlavaConfig as HFLlavaConfig

    cfg = PRESETS[preset]()
    d = cfg.to_hf_dict()
    hc = HFLlavaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    assert hc.text_config.model_type == cfg.text.model_type
    assert getattr(hc.text_config, "sliding_window", None) == cfg.text.sliding_window
    assert LlavaConfig.from_hf_dict(json.loads(hc.to_json_string())).text == cfg.text


def test_unsupported_layouts_are_refused():
    from llava_jax.config import TextConfig

    qwen_mixed = {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8,
                  "max_window_layers": 2}
    with pytest.raises(ValueError, match="some layers only"):
        TextConfig.from_hf_dict(qwen_mixed)
    every = TextConfig.from_hf_dict({**qwen_mixed, "max_window_layers": 0})
    assert every.sliding_window == 8 and every.attention_bias and not every.o_proj_bias
    with pytest.raises(ValueError, match="unsupported text model_type 'gemma'"):
        TextConfig.from_hf_dict({"model_type": "gemma"})
    with pytest.raises(ValueError, match="covers q, k, v and o"):
        dataclasses.replace(every, model_type="llama", sliding_window=None).to_hf_dict()
    with pytest.raises(ValueError, match="no sliding window"):
        TextConfig(sliding_window=16).to_hf_dict()
    with pytest.raises(ValueError, match="a mistral config has"):
        TextConfig(model_type="mistral", attention_bias=True, o_proj_bias=True).to_hf_dict()


@pytest.mark.parametrize("llm, preset, template", [("llama3_8b", "llava_llama3_8b", "llama3"),
                                                    ("qwen2_7b", "llava_qwen2_7b", "qwen2"),
                                                    ("mistral_7b", "llava_mistral_7b", "chat_template")])
def test_recipe_configs_use_the_backbone_preset_and_template(llm, preset, template):
    """configs/llava_v1_5.py on another LLM: without checkpoint dirs its geometry is the preset
    (what tools/aot.py compiles), stage 2 renders with the backbone's template."""
    from train_util import recipes

    from llava_jax import build
    from llava_jax.data.templates import resolve_template

    mod = recipes("llava_v1_5")
    c = mod.get_config(f"{llm}_stage2")
    assert c.data.template == template and resolve_template(template)
    assert build.model_config(c).text == PRESETS[preset]().text
    assert build.preset_for(c.model.llm_path) == preset
    s1 = mod.get_config(f"{llm}_stage1")
    assert s1.data.template == "plain" and s1.model.cast_frozen  # the frozen LLM in bf16 (bit-identical steps)
