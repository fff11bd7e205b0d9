"""llava_jax logits / hidden states equal transformers' on tiny random checkpoints."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import llava_jax  # noqa: E402
from hf_util import CONFIGS, IMAGE_TOKEN, make_batch, make_hf_llava, num_image_tokens, torch_logits  # noqa: E402


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf_llava(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d


def test_fp32_logits_match(pair):
    name, hf, d = pair
    ids, mask, px = make_batch(hf)
    ref = torch_logits(hf, ids, mask, px)
    model = llava_jax.from_pretrained(d)
    out = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask))
    valid = mask.astype(bool)
    diff = np.abs(out - ref)[valid].max()
    print(f"{name}: fp32 max|diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_bf16_logits_close(pair):
    name, hf, d = pair
    ids, mask, px = make_batch(hf)
    ref = torch_logits(hf, ids, mask, px)
    model = llava_jax.from_pretrained(d, dtype=jnp.bfloat16)
    out = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask)).astype(np.float32)
    valid = mask.astype(bool)
    rel = np.linalg.norm((out - ref)[valid]) / np.linalg.norm(ref[valid])
    print(f"{name}: bf16 relative error = {rel:.2e}")
    assert rel <= 2e-2


def test_every_vision_hidden_state_matches(pair):
    name, hf, d = pair
    _, _, px = make_batch(hf)
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.tensor(px), output_hidden_states=True).hidden_states
    model = llava_jax.from_pretrained(d)
    x = model.vision.embed(jnp.transpose(jnp.asarray(px), (0, 2, 3, 1)))
    _, ours = model.vision.hidden_states(x)
    assert len(ours) == len(ref)
    worst = max(float(np.abs(np.asarray(o) - r.numpy()).max()) for o, r in zip(ours, ref))
    print(f"{name}: vision hidden states max|diff| = {worst:.2e}")
    assert worst <= 1e-5


def test_batched_image_layout_equals_flat_layout(pair):
    """[B, M, H, W, C] images with a validity mask give the same logits as HF's flat layout."""
    name, hf, d = pair
    ids, mask, px = make_batch(hf)
    model = llava_jax.from_pretrained(d)
    flat = np.asarray(model(ids, pixel_values=px, attention_mask=mask))
    nhwc = np.transpose(px, (0, 2, 3, 1))
    images = np.zeros((3, 2) + nhwc.shape[1:], np.float32)
    images[0, 0], images[1, 0] = nhwc[0], nhwc[1]
    image_mask = np.array([[1, 0], [1, 0], [0, 0]], bool)
    batched = np.asarray(model(ids, attention_mask=mask, images=images, image_mask=image_mask))
    valid = mask.astype(bool)
    assert np.abs(batched - flat)[valid].max() <= 1e-5


def test_image_token_count_mismatch_raises(pair):
    name, hf, d = pair
    ids, mask, px = make_batch(hf)
    model = llava_jax.from_pretrained(d)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=px[:1], attention_mask=mask)
    with pytest.raises(ValueError, match="no images"):
        model(ids, attention_mask=mask)


def test_kv_cache_decoding_equals_full_forward(pair):
    """Prefill a prefix then feed tokens one at a time: logits equal the full forward pass."""
    name, hf, d = pair
    model = llava_jax.from_pretrained(d)
    rng = np.random.default_rng(1)
    vocab = model.config.text.vocab_size
    ids = rng.integers(3, vocab, (2, 10))
    ids[ids == model.config.image_token_id] = 4
    full = np.asarray(model(ids))
    llm = model.llm
    cache = llm.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.ones((2, 10), jnp.int32)
    emb = llm.embed_tokens(jnp.asarray(ids))
    out, cache = llm(emb[:, :6], pos[:, :6], seg[:, :6], cache=cache)
    steps = [np.asarray(out)]
    for t in range(6, 10):
        out, cache = llm(emb[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache=cache)
        steps.append(np.asarray(out))
    inc = np.concatenate(steps, axis=1)
    assert int(cache["index"]) == 10
    assert np.abs(inc - full).max() <= 1e-5


def test_packed_segments_equal_separate_rows():
    """Two sequences packed in one row (segment_ids, restarting positions) give the same logits
    as each alone: no attention across segments."""
    hf = make_hf_llava("gqa_llama3_list_tied")
    import tempfile

    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    model = llava_jax.from_pretrained(d)
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 90, 7), rng.integers(3, 90, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    out = np.asarray(model(packed, segment_ids=seg, positions=pos))
    ra, rb = np.asarray(model(a[None])), np.asarray(model(b[None]))
    assert np.abs(out[0, :7] - ra[0]).max() <= 1e-5
    assert np.abs(out[0, 7:12] - rb[0]).max() <= 1e-5


def test_position_embedding_interpolation_matches_hf():
    """Other image sizes: bicubic-interpolated position embeddings equal transformers'."""
    hf = make_hf_llava("mha_default_rope")
    import tempfile

    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    model = llava_jax.from_pretrained(d)
    px = np.random.default_rng(3).normal(size=(2, 3, 42, 56)).astype(np.float32)  # 3x4 patch grid
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.tensor(px), interpolate_pos_encoding=True,
                                    output_hidden_states=True).hidden_states[-2].numpy()
    ours = np.asarray(model.vision(jnp.transpose(px, (0, 2, 3, 1)), (2,), "full"))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5
