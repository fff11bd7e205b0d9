"""Weight-only int8 (per channel) and int4 (grouped) quantization of the LLM's linear layers:
memory, logits similarity, greedy agreement, serving through the load flag, on a sharded mesh."""
import numpy as np
import pytest

pytest.importorskip("torch")

from serve_util import make_chat_checkpoint, rand_image  # noqa: E402

import llava_jax  # noqa: E402
from llava_jax.serve.engine import Engine, SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.quant import compare_logits, dequantize_roundtrip_error, param_bytes, quantized_copy  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("q"))[0]


def test_quantized_logits_memory_and_greedy(ckpt):
    model = llava_jax.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 800, (4, 40))
    ref = model(ids)
    fp_bytes = param_bytes(model, linear_only=True)
    prompts = [list(r) for r in ids[:, :20]]
    greedy = Engine(model).generate(prompts, params=SamplingParams(max_new_tokens=16))
    report = {}
    for mode, min_cos, max_ratio in (("int8", 0.999, 0.30), ("int4", 0.95, 0.20)):
        q = quantized_copy(model, mode, group_size=16)
        assert str(q.llm.layers.q_kernel[...].dtype) == mode and model.llm.layers.q_kernel[...].dtype == np.float32
        stats = compare_logits(ref, q(ids))
        ratio = param_bytes(q, linear_only=True) / fp_bytes
        report[mode] = dict(stats, linear_bytes_ratio=ratio)
        if mode == "int8":
            out = Engine(q).generate(prompts, params=SamplingParams(max_new_tokens=16))
            report[mode]["greedy_token_agreement"] = float(np.mean([a == b for x, y in zip(greedy, out)
                                                                    for a, b in zip(x, y)]))
        assert stats["cosine_mean"] > min_cos and ratio < max_ratio
    print(f"\nrandom tiny model (48 hidden): {report}")
    assert report["int8"]["top1_agreement"] > 0.95 and report["int8"]["greedy_token_agreement"] > 0.6
    assert dequantize_roundtrip_error(model, "int8") < 0.01


def test_quantized_serving_on_a_mesh(ckpt):
    import jax

    from llava_jax.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    msgs = [{"role": "user", "content": [{"type": "image", "image": rand_image(0)}, {"type": "text", "text": "Hi?"}]}]
    plain = ChatGenerator.from_pretrained(ckpt, quantize="int8")
    sharded = ChatGenerator.from_pretrained(ckpt, quantize="int8", mesh=make_mesh((2, 1, 4)))
    k = sharded.model.llm.layers.up_kernel[...]
    assert k.dtype == np.int8 and not k.sharding.is_fully_replicated
    p = SamplingParams(max_new_tokens=8)
    assert sharded.chat(msgs, p).text == plain.chat(msgs, p).text


def test_llava_7b_memory_from_shapes():
    from llava_jax.tools.quant_eval import shapes_memory

    mem = shapes_memory("7b", ["int8", "int4"], 64)
    bf16 = mem["bfloat16"]["llm_linear_bytes"]
    assert 12.9e9 < bf16 < 13.0e9  # 32 x (4 x 4096^2 + 3 x 4096 x 11008) params x 2 bytes
    assert 0.50 <= mem["int8"]["llm_linear_bytes"] / bf16 < 0.51  # + per-channel fp32 scales
    assert 0.26 < mem["int4"]["llm_linear_bytes"] / bf16 < 0.27  # + bf16 scales per 64 weights
