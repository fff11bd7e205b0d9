"""The SigLIP vision tower against transformers' SiglipVisionModel / LLaVA with a SigLIP tower,
and the SigLIP image processor chosen from a checkpoint's preprocessor_config.json by the
serving generator and the training pipeline. (Logits, bf16, every hidden state, the batched
image layout and KV-cache decoding of a SigLIP LLaVA run in test_model_parity.py through
hf_util.CONFIGS["siglip_head_full"]; its export round trip in test_convert.py.)"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

import llava_jax  # noqa: E402
from hf_util import (CONFIGS, IMAGE_TOKEN, hf_generate, make_batch, make_hf_llava, num_image_tokens,  # noqa: E402
                     torch_logits)
from llava_jax.config import ImageProcessorConfig, LlavaConfig, VisionConfig  # noqa: E402
from llava_jax.presets import PRESETS, SIGLIP_SO400M_14_384  # noqa: E402
from llava_jax.models.pixels import normalize  # noqa: E402
from llava_jax.serve.engine import Engine, SamplingParams  # noqa: E402

# A SigLIP tower without the pooling head (as llava-hf's SigLIP conversions), features of two
# layers with the "default" strategy (transformers then drops the first patch).
NO_HEAD_DEFAULT = dict(CONFIGS["siglip_head_full"],
                       vision=dict(CONFIGS["siglip_head_full"]["vision"], vision_use_head=False),
                       llava=dict(vision_feature_layer=[-2, -1], vision_feature_select_strategy="default"))


@pytest.fixture(scope="module")
def with_head(tmp_path_factory):
    hf = make_hf_llava("siglip_head_full", seed=2)
    d = tmp_path_factory.mktemp("siglip")
    hf.save_pretrained(d)
    return hf, llava_jax.from_pretrained(d)


def test_tower_outputs_equal_siglip_vision_model(with_head):
    """Every hidden state, the post-layernorm output and the pooling head's output equal
    SiglipVisionModel's (fp32), at the trained size and at another (interpolated positions)."""
    hf, model = with_head
    tower = hf.model.vision_tower
    assert type(tower).__name__ == "SiglipVisionModel"
    for shape, interpolate in (((30, 30), False), ((40, 50), True)):  # 3x3 and 4x5 patch grids
        px = np.random.default_rng(shape[1]).normal(size=(2, 3) + shape).astype(np.float32)
        with torch.no_grad():
            ref = tower(torch.tensor(px), output_hidden_states=True, interpolate_pos_encoding=interpolate)
        x = model.vision.embed(jnp.transpose(jnp.asarray(px), (0, 2, 3, 1)))
        last, ours = model.vision.hidden_states(x)
        assert len(ours) == len(ref.hidden_states) == 4
        worst = max(float(np.abs(np.asarray(o) - r.numpy()).max()) for o, r in zip(ours, ref.hidden_states))
        assert worst <= 1e-5, (shape, worst)
        post = model.vision.post_norm(last)
        assert np.abs(np.asarray(post) - ref.last_hidden_state.numpy()).max() <= 1e-5
        assert np.abs(np.asarray(model.vision.pool(post)) - ref.pooler_output.numpy()).max() <= 1e-5


def test_greedy_generation_equals_transformers_generate(with_head):
    hf, model = with_head
    rng = np.random.default_rng(0)
    t = num_image_tokens(hf)
    assert t == model.config.num_image_tokens == 9  # 3x3 patches, no class token, "full"
    prompts = []
    for n in (4, 9):
        text = rng.integers(3, hf.config.text_config.vocab_size, n)
        text[text == IMAGE_TOKEN] = 4
        prompts.append([1] + [IMAGE_TOKEN] * t + list(map(int, text)))
    pixels = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)
    ref = hf_generate(hf, prompts, pixels, new=8)
    images = np.transpose(pixels, (0, 2, 3, 1))[:, None]
    assert Engine(model).generate(prompts, images, np.ones((2, 1), bool), SamplingParams(max_new_tokens=8)) == ref


def test_no_head_default_strategy_logits_and_export(tmp_path):
    """A headless tower holds no head params and exports none; "default" drops the first patch
    like transformers; the export loads in transformers with no missing/unexpected keys."""
    hf = make_hf_llava(NO_HEAD_DEFAULT, seed=4)
    hf.save_pretrained(tmp_path / "in")
    model = llava_jax.from_pretrained(tmp_path / "in")
    assert not model.config.vision.use_head and not hasattr(model.vision, "head")
    assert model.config.num_image_tokens == num_image_tokens(hf) == 8
    ids, mask, px = make_batch(hf)
    ref = torch_logits(hf, ids, mask, px)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(model(ids, pixel_values=px, attention_mask=mask)) - ref)[valid].max() <= 1e-4
    llava_jax.save_pretrained(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["vision_config"]["vision_use_head"] is False
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert np.abs(torch_logits(back.eval(), ids, mask, px) - ref)[valid].max() <= 1e-6
    proc = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert proc["image_processor_type"] == "SiglipImageProcessor" and proc["image_mean"] == [0.5] * 3
    assert json.loads((tmp_path / "out" / "processor_config.json").read_text())["num_additional_image_tokens"] == 0


def test_siglip_tower_dir_plus_llama_dir(tmp_path):
    """The stage-1 start with a SigLIP tower: a SiglipVisionModel dir (keys without
    "vision_model.", with the head) + a LLaMA dir; the tower's weights are the checkpoint's."""
    hf = make_hf_llava("siglip_head_full", seed=6)
    hf.model.vision_tower.save_pretrained(tmp_path / "siglip")
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(hf.config.text_config)
    llama.model.load_state_dict(hf.model.language_model.state_dict())
    llama.lm_head.load_state_dict(hf.lm_head.state_dict())
    llama.save_pretrained(tmp_path / "llama")
    model = llava_jax.from_pretrained(tmp_path / "llama", clip_path=tmp_path / "siglip", image_token_id=IMAGE_TOKEN,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    assert model.config.vision.is_siglip and model.config.image_processor.type == "siglip"
    np.testing.assert_array_equal(np.asarray(model.vision.head.probe.value),
                                  hf.model.vision_tower.head.probe.detach().numpy())
    np.testing.assert_array_equal(np.asarray(model.vision.patch_bias.value),
                                  hf.model.vision_tower.embeddings.patch_embedding.bias.detach().numpy())


def test_generator_and_pipeline_use_the_checkpoints_siglip_processor(tmp_path):
    """A SigLIP llava-hf dir saved with its processor (bilinear here): the serving generator and
    the training pipeline produce transformers' LlavaProcessor pixel values, the same number of
    image tokens, and the model normalises uint8 images on device as the processor does."""
    from serve_util import hf_processor, make_chat_checkpoint, png_bytes, rand_image

    from llava_jax.data.pipeline import decode_image
    from llava_jax.data.pipeline_config import PipelineConfig
    from llava_jax.serve.generator import ChatGenerator

    d, hf, tok = make_chat_checkpoint(tmp_path, siglip_resample=2)
    # transformers 5 nests the image processor in processor_config.json (no preprocessor_config.json)
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]["resample"] == 2
    proc = hf_processor(tok, siglip_resample=2)
    gen = ChatGenerator.from_pretrained(d, image_mode="crop")
    ip = gen.cfg.image_processor
    assert (ip.type, ip.resample, ip.mean) == ("siglip", 2, (0.5, 0.5, 0.5))
    pcfg = PipelineConfig.from_config({"template": "plain", "image_mode": "crop"}, gen.cfg, batch_size=1)
    for seed, (w, h, mode) in enumerate([(40, 33, "RGB"), (17, 61, "RGBA"), (90, 20, "L")]):
        img = rand_image(seed, w, h).convert(mode)
        ref = proc(images=img, text="<image>\nHi", return_tensors="np")
        enc = gen.encode([{"role": "user", "content": [{"type": "image", "image": img},
                                                       {"type": "text", "text": "Hi"}]}])
        ours = normalize(enc.images, ip.mean, ip.std).transpose(0, 3, 1, 2)
        assert np.array_equal(ours, ref["pixel_values"]), (w, h, mode)
        n_img = int((np.asarray(enc.ids) == gen.cfg.image_token_id).sum())
        assert n_img == int((ref["input_ids"] == gen.cfg.image_token_id).sum()) == 4
        piped = decode_image(png_bytes(img), pcfg)
        assert np.array_equal(piped, enc.images[0])
        # uint8 on the device, normalised by the model = the processor's floats
        ids = np.asarray(enc.ids)[None]
        a = np.asarray(gen.model(ids, images=enc.images[None], image_mask=np.ones((1, 1), bool)))
        b = np.asarray(gen.model(ids, pixel_values=ref["pixel_values"]))
        assert np.abs(a - b).max() <= 1e-5


def test_configs_and_presets():
    # google/siglip-so400m-patch14-384's config.json (a full SiglipModel config; other fields default)
    so400m = {"model_type": "siglip", "vision_config": {
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}}
    assert VisionConfig.from_hf_dict(so400m) == SIGLIP_SO400M_14_384
    from transformers import SiglipVisionConfig

    hf = SiglipVisionConfig(**so400m["vision_config"])
    assert (hf.hidden_act, hf.layer_norm_eps, hf.vision_use_head) == ("gelu_pytorch_tanh", 1e-6, True)
    cfg = PRESETS["llava_siglip_7b"]()
    assert cfg.num_image_tokens == 729 and cfg.feature_layers == (26,) and cfg.image_processor.type == "siglip"
    # config.json round trip, and a CLIP processor config paired with the tower is refused when its size differs
    back = LlavaConfig.from_hf_dict(cfg.to_hf_dict())
    assert back.vision == cfg.vision and back.num_image_tokens == 729
    with pytest.raises(ValueError, match="image_size 384"):
        ImageProcessorConfig.from_hf_dict({"image_processor_type": "SiglipImageProcessor",
                                           "size": {"height": 224, "width": 224}}, cfg.vision)
    with pytest.raises(ValueError, match="unsupported image_processor_type"):
        ImageProcessorConfig.from_hf_dict({"image_processor_type": "Qwen2VLImageProcessor"}, cfg.vision)
    # SigLIP x Qwen2-7B (LLaVA-OneVision's pairing): the same tower features, <image> after Qwen2's vocabulary
    qwen = PRESETS["llava_siglip_qwen2_7b"]()
    assert (qwen.vision, qwen.feature_layers, qwen.num_image_tokens) == (cfg.vision, (26,), 729)
    assert qwen.text.model_type == "qwen2" and qwen.image_token_id == qwen.text.vocab_size == 152064


def test_siglip_recipes_name_their_preset_and_llm_template():
    from train_util import recipes

    siglip = recipes("llava_siglip")
    for arg, preset, template in [("7b_stage2", "llava_siglip_7b", "vicuna_v1"),
                                  ("qwen2_7b_stage1", "llava_siglip_qwen2_7b", "plain"),
                                  ("qwen2_7b_stage2", "llava_siglip_qwen2_7b", "qwen2"),
                                  ("qwen2_7b_qlora", "llava_siglip_qwen2_7b", "qwen2")]:
        c = siglip.get_config(arg)
        assert (c.model.preset, c.data.template, c.model.vision_feature_select_strategy) == (preset, template, "full")
        assert PRESETS[c.model.preset]().num_image_tokens == 729
    with pytest.raises(ValueError, match="qwen2_7b"):
        siglip.get_config("13b_stage2")
