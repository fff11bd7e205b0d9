"""Tiny random transformers LLaVA models built offline (the numerical reference)."""
from __future__ import annotations

import numpy as np

IMAGE_TOKEN = 100

# Configs covering: MHA/GQA, linear/mlp2x_gelu projector (the latter via llava-hf),
# default/llama3 rope, feature layer -2 / a list, tied/untied embeddings, biases; CLIP towers and
# a SigLIP tower ("vision_type": "siglip", with the pooling head; -1 / "full" as llava-hf's
# SigLIP models).
CONFIGS = {
    "mha_default_rope": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=28, patch_size=14),
        text=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4),
        llava=dict(vision_feature_layer=-2),
    ),
    "gqa_llama3_list_tied": dict(
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                    image_size=30, patch_size=10),
        text=dict(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
        llava=dict(vision_feature_layer=[-3, -1], tie_word_embeddings=True),
    ),
    "gqa_linear_rope_bias_full": dict(
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=7),
        text=dict(vocab_size=140, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                  rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                   multimodal_projector_bias=False),
    ),
    "siglip_head_full": dict(
        vision_type="siglip",
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    image_size=30, patch_size=10, vision_use_head=True),
        text=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
        llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    ),
}

# The other text architectures (`text_type`: a transformers model_type; default llama), tested in
# tests/test_backbones.py and the packing / export tests.
BACKBONES = {
    # Qwen2: q/k/v biases without an o bias, theta 1e6, untied head (as Qwen2-7B).
    "qwen2_gqa_bias": dict(
        text_type="qwen2",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=14),
        text=dict(vocab_size=144, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        llava=dict(vision_feature_layer=-2),
    ),
    # Qwen2 with a tied head (tie_word_embeddings, as Qwen2-0.5B / 1.5B): the embedding is the head.
    # Init std 0.2: at the default 0.02 the residual stream is mostly the input embedding, so a
    # tied head repeats the last token forever and greedy generation checks nothing.
    "qwen2_tied": dict(
        text_type="qwen2",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=14),
        text=dict(vocab_size=152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        llava=dict(vision_feature_layer=-2, tie_word_embeddings=True),
    ),
    # Mistral with a sliding window of 5, shorter than make_batch's rows (4 image tokens + 12).
    "mistral_window": dict(
        text_type="mistral",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=14),
        text=dict(vocab_size=136, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
        llava=dict(vision_feature_layer=-2),
    ),
}


def vision_config(spec: dict):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = SiglipVisionConfig if spec.get("vision_type") == "siglip" else CLIPVisionConfig
    return cls(**spec["vision"])


def make_hf_llava(name: str | dict, seed: int = 0):
    """A perturbed random LlavaForConditionalGeneration of `CONFIGS[name]` / `BACKBONES[name]` (or
    of a spec dict)."""
    import torch
    from transformers import CONFIG_MAPPING, LlavaConfig, LlavaForConditionalGeneration

    spec = name if isinstance(name, dict) else CONFIGS[name] if name in CONFIGS else BACKBONES[name]
    vc = vision_config(spec)
    tc = CONFIG_MAPPING[spec.get("text_type", "llama")](**spec["text"])
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, **spec["llava"])
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random init leaves norms at 1 / biases at 0: perturb every param so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def num_image_tokens(model) -> int:
    c = model.config
    n = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    n += 0 if c.vision_config.model_type == "siglip_vision_model" else 1  # CLIP's class token
    return n - (1 if c.vision_feature_select_strategy == "default" else 0)  # transformers drops the first


def make_batch(model, seed: int = 0):
    """Three rows: right-padded row with 1 image, row with 1 image and more text, text-only row
    padded; two images in total (transformers' flat pixel_values layout)."""
    rng = np.random.default_rng(seed)
    c = model.config
    vocab = c.text_config.vocab_size
    t = num_image_tokens(model)
    L = t + 12

    def text(n):
        ids = rng.integers(3, vocab, n)
        return np.where(ids == IMAGE_TOKEN, 5, ids)

    rows = [
        np.concatenate([[1], text(2), [IMAGE_TOKEN] * t, text(4)]),
        np.concatenate([[1], [IMAGE_TOKEN] * t, text(L - t - 1)]),
        np.concatenate([[1], text(8)]),
    ]
    ids = np.zeros((3, L), np.int64)
    mask = np.zeros((3, L), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    s = c.vision_config.image_size
    pixels = rng.normal(size=(2, 3, s, s)).astype(np.float32)
    return ids, mask, pixels


def torch_logits(model, ids, mask, pixels):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    pixel_values=torch.tensor(pixels))
    return out.logits.float().numpy()


def hf_generate(hf, prompts, pixels, new, eos_token_id=None):
    """transformers' greedy `generate` on left-padded prompts: the new tokens per prompt (with
    `eos_token_id`: up to and including the first one; `pixels` None: text-only prompts)."""
    import torch

    L = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), L), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as for batched generation
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    with torch.no_grad():
        px = {} if pixels is None else {"pixel_values": torch.tensor(pixels)}
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **px, max_new_tokens=new,
                          do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    rows = [list(map(int, r)) for r in out[:, L:].numpy()]
    if eos_token_id is not None:  # a finished row is padded to the longest one
        rows = [r[:r.index(eos_token_id) + 1] if eos_token_id in r else r for r in rows]
    return rows


ORIGINAL_PREFIX = "base_model.model.model."  # PEFT on the original LLaVA's LlavaLlamaForCausalLM


def original_lora_dir(peft_dir, out, projector: dict, weights: str = "adapter_model.bin"):
    """`out`: the adapter of the PEFT directory `peft_dir` (written on transformers'
    LlavaForConditionalGeneration) as haotian-liu/LLaVA's train.py writes a LoRA run: PEFT keys on
    its LlavaLlamaForCausalLM (`base_model.model.model.layers.N...`) in `weights`
    (adapter_model.bin, as the PEFT of its day, or .safetensors), `target_modules` the LLM's Linear
    names (find_all_linear_names), and the projector it trained (`projector`: llava-hf names
    `linear_1.weight`, ... -> tensors) as `named_parameters()` keys in non_lora_trainables.bin."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    peft_dir, out = Path(peft_dir), Path(out)
    out.mkdir()
    sd = load_file(peft_dir / "adapter_model.safetensors")
    orig = {ORIGINAL_PREFIX + k.removeprefix(ORIGINAL_PREFIX + "language_model."): v.contiguous() for k, v in sd.items()}
    assert all(k.startswith(ORIGINAL_PREFIX + "layers.") for k in orig), sorted(orig)[:3]
    (torch.save if weights.endswith(".bin") else save_file)(orig, out / weights)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    names = sorted({k.split(".")[-3] for k in orig})  # q_proj, ..., the modules adapted
    cfg.update(target_modules=names, task_type="CAUSAL_LM", base_model_name_or_path="lmsys/vicuna-7b-v1.5")
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    # nn.Sequential(Linear, GELU, Linear): linear_i is mm_projector.{2 (i - 1)}
    non_lora = {f"{ORIGINAL_PREFIX}mm_projector.{2 * (int(k.split('.')[0][7:]) - 1)}.{k.split('.')[-1]}":
                torch.as_tensor(np.array(v)) for k, v in projector.items()}
    torch.save(non_lora, out / "non_lora_trainables.bin")
    return out
