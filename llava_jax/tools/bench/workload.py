"""What is measured: the model geometry and work sizes (`Geometry`, `PRESETS`), the llava-jax
option sets swept with `--variants`, and the random token inputs both frameworks get."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Geometry:
    # vision tower (CLIP ViT)
    v_hidden: int = 1024
    v_inter: int = 4096
    v_layers: int = 24
    v_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    # LLaMA
    vocab: int = 32064
    hidden: int = 2048
    inter: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    image_token_id: int = 32000
    # work
    seq_len: int = 2048
    train_batch: int = 8
    prompt_text: int = 32
    new_tokens: int = 256
    decode_batches: tuple[int, ...] = (1, 16)
    warmup: int = 3
    steps: int = 10
    decode_repeats: int = 3

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prompt_len(self) -> int:
        return 1 + self.num_image_tokens + self.prompt_text

    def llava_config(self, runtime=None):
        from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig

        return LlavaConfig(
            vision=VisionConfig(hidden_size=self.v_hidden, intermediate_size=self.v_inter, num_layers=self.v_layers,
                                num_heads=self.v_heads, image_size=self.image_size, patch_size=self.patch_size),
            text=TextConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                            head_dim=self.hidden // self.heads, max_position_embeddings=4096, pad_token_id=0),
            image_token_id=self.image_token_id, projector_type="mlp2x_gelu", vision_feature_layer=-2,
            runtime=runtime or RuntimeOptions())


PRESETS: dict[str, dict[str, Any]] = {
    # The geometry: CLIP ViT-L/14-336 + a 1.1B LLaMA (TinyLlama shape) + mlp2x_gelu.
    "h100": dict(geometry=Geometry(),
                 variants="attention=cudnn_padded,remat=dots_attn,loss_chunk=1024,frozen_bf16=1"),
    # Runs on CPU in seconds; the variant mirrors the GPU default with CPU-runnable kernels.
    # 48 new tokens, 5 repeats: with 16 and 3, the 15 decode steps of this tiny model in eager
    # torch (~1 ms each) sometimes timed below the 1-token call's noise on a busy CPU, giving
    # no ms/step at all.
    "tiny": dict(geometry=Geometry(v_hidden=32, v_inter=64, v_layers=2, v_heads=2, image_size=28, patch_size=14,
                                   vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2,
                                   image_token_id=255, seq_len=64, train_batch=2, prompt_text=8, new_tokens=48,
                                   decode_batches=(1, 2), warmup=1, steps=3, decode_repeats=5),
                 variants="attention=dpa_padded,remat=dots_attn,loss_chunk=16,frozen_bf16=1"),
    # CPU decoding side by side with llama.cpp (issue 23), batch 1, one run each:
    # the demo's model size (configs/demo.py: 48-px images of 9 patches, a 3-layer 128-wide LLM) ...
    "demo": dict(geometry=Geometry(v_hidden=64, v_inter=128, v_layers=2, v_heads=4, image_size=48, patch_size=16,
                                   vocab=776, hidden=128, inter=256, layers=3, heads=4, kv_heads=2,
                                   image_token_id=775, prompt_text=32, new_tokens=128, decode_batches=(1,),
                                   decode_repeats=3),
                 variants="attention=xla"),
    # ... and the 1B-class geometry of the h100 preset, with fewer new tokens for 2 CPU cores.
    "cpu": dict(geometry=Geometry(new_tokens=32, decode_batches=(1,), decode_repeats=1),
                variants="attention=xla"),
}

VARIANT_KEYS = {"attention": str, "remat": str, "loss_chunk": int, "frozen_bf16": int, "param_dtype": str, "xla": str,
                "serve_dtype": str}
# `serve_dtype`: the weights' and compute dtype of decoding (bf16 serving; float32 is the faster
# choice on CPUs, where XLA has no fast bf16 matmul); the training variants ignore it.
DEFAULT_VARIANT = {"attention": "xla", "remat": "none", "loss_chunk": 0, "frozen_bf16": 0, "param_dtype": "float32",
                   "xla": "default", "serve_dtype": "bfloat16"}
# Named XLA_FLAGS sets for the `xla=` variant key (isolated runs only: XLA reads its flags at
# start-up). Every name here is accepted by jaxlib 0.10.2 (tests/test_bench.py checks).
XLA_FLAG_SETS = {
    "default": "",
    "cublas": "--xla_gpu_enable_triton_gemm=false",  # every GEMM through cuBLAS(Lt), none through Triton
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "cublas_lhs": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true",
    "graphs": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,WHILE,CONDITIONAL "
              "--xla_gpu_graph_min_graph_size=1",  # CUDA graphs for more of the step (decode)
}


def parse_variants(text: str) -> list[dict[str, Any]]:
    out = []
    for part in [p for p in text.split(";") if p.strip()]:
        v = dict(DEFAULT_VARIANT)
        for kv in [x for x in part.split(",") if x.strip()]:
            k, _, val = kv.partition("=")
            k = k.strip()
            if k not in VARIANT_KEYS:
                raise ValueError(f"unknown variant key {k!r} in {part!r}; known: {', '.join(VARIANT_KEYS)}")
            v[k] = VARIANT_KEYS[k](val.strip())
        if v["xla"] not in XLA_FLAG_SETS:
            raise ValueError(f"unknown xla flag set {v['xla']!r}; known: {', '.join(XLA_FLAG_SETS)}")
        out.append(v)
    return out or [dict(DEFAULT_VARIANT)]


def variant_label(v: dict[str, Any]) -> str:
    return ",".join(f"{k}={v.get(k, d)}" for k, d in DEFAULT_VARIANT.items() if v.get(k, d) != d) or "defaults"


def train_tokens(geo: Geometry, seed: int = 0):
    """ids [B, L] int32 (BOS, image tokens, random text) and HF-style labels (-100 on BOS and image
    tokens); llava-jax targets are the same labels shifted left by one."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, l, t = geo.train_batch, geo.seq_len, geo.num_image_tokens
    ids = rng.integers(3, min(geo.vocab, 32000) - 1, (b, l)).astype(np.int32)
    ids[ids == geo.image_token_id] = 5
    ids[:, 0] = 1
    ids[:, 1:1 + t] = geo.image_token_id
    labels = ids.copy()
    labels[:, :1 + t] = -100
    return ids, labels


def prompt_tokens(geo: Geometry, batch: int, seed: int = 1):
    import numpy as np

    rng = np.random.default_rng(seed)
    text = rng.integers(3, min(geo.vocab, 32000) - 1, (batch, geo.prompt_text)).astype(np.int32)
    text[text == geo.image_token_id] = 5
    ids = np.concatenate([np.ones((batch, 1), np.int32),
                          np.full((batch, geo.num_image_tokens), geo.image_token_id, np.int32), text], 1)
    return ids
