"""KV-cache generation equals transformers' greedy `generate` on the same tiny checkpoint."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llava_jax  # noqa: E402
from hf_util import IMAGE_TOKEN, hf_generate, make_hf_llava, num_image_tokens  # noqa: E402
from llava_jax.serve.engine import Engine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_llava("gqa_llama3_list_tied", seed=7)
    d = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(d)
    return hf, llava_jax.from_pretrained(d)


def _prompt(hf, rng, n_text):
    t = num_image_tokens(hf)
    text = rng.integers(3, hf.config.text_config.vocab_size, n_text)
    text[text == IMAGE_TOKEN] = 4
    return [1] + [IMAGE_TOKEN] * t + list(map(int, text))


@pytest.mark.parametrize("lengths", [(5,), (3, 9, 6)])
def test_greedy_equals_transformers_generate(pair, lengths):
    hf, model = pair
    rng = np.random.default_rng(len(lengths))
    prompts = [_prompt(hf, rng, n) for n in lengths]
    s = hf.config.vision_config.image_size
    pixels = rng.normal(size=(len(prompts), 3, s, s)).astype(np.float32)
    ref = hf_generate(hf, prompts, pixels, new=8)
    images = np.transpose(pixels, (0, 2, 3, 1))[:, None]
    ours = Engine(model).generate(prompts, images, np.ones((len(prompts), 1), bool), SamplingParams(max_new_tokens=8))
    assert ours == ref


# ---------------------------------------------------------------------------- engine behaviour
from llava_jax.serve.engine import Request, sample_rows  # noqa: E402


def _reqs(hf, rng, lengths, params=None):
    s = hf.config.vision_config.image_size
    out = []
    for i, n in enumerate(lengths):
        img = rng.normal(size=(1, s, s, 3)).astype(np.float32)
        out.append(Request(_prompt(hf, rng, n), img, params[i] if params else SamplingParams(max_new_tokens=10)))
    return out


def test_streaming_chunks_and_no_recompile(pair):
    hf, model = pair
    eng = Engine(model, chunk_size=3)
    reqs = _reqs(hf, np.random.default_rng(0), (3, 9, 6))
    steps = list(eng.stream(reqs))
    assert len(steps) == 1 + 3  # prefill + ceil(9 / 3) chunks of 3 decode steps
    streamed = [sum((s.new_tokens[i] for s in steps), []) for i in range(3)]
    assert all(len(x) == 10 for x in streamed) and steps[-1].finish == ["length"] * 3
    assert streamed == eng.generate([r.prompt for r in reqs], np.stack([r.images for r in reqs]),
                                    params=SamplingParams(max_new_tokens=10))
    traces = dict(eng.traces)
    assert traces == {"prefill": 1, "decode": 1}
    # new lengths in the same bucket, other sampling settings, seeds and max_new: no new compile
    other = [SamplingParams(max_new_tokens=5), SamplingParams(12, temperature=0.8, top_p=0.9, seed=3),
             SamplingParams(7, temperature=1.3, top_k=5, seed=4)]
    list(eng.stream(_reqs(hf, np.random.default_rng(1), (4, 11, 2), other)))
    assert dict(eng.traces) == traces


def test_eos_stop_and_cancel(pair):
    hf, model = pair
    eng = Engine(model, chunk_size=4)
    reqs = _reqs(hf, np.random.default_rng(2), (5, 8))
    ref = eng.generate([r.prompt for r in reqs], np.stack([r.images for r in reqs]),
                       params=SamplingParams(max_new_tokens=10))
    eos = ref[0][4]
    k0 = ref[0].index(eos)
    out = eng.generate([r.prompt for r in reqs], np.stack([r.images for r in reqs]),
                       params=SamplingParams(max_new_tokens=10), eos_ids=[eos])
    assert out[0] == ref[0][:k0]
    assert out[1] == (ref[1][:ref[1].index(eos)] if eos in ref[1] else ref[1])
    steps = list(eng.stream(reqs, cancelled=lambda i: i == 0))
    assert steps[-1].finish == ["cancelled", "length"]
    assert sum(len(s.new_tokens[0]) for s in steps) == 1  # the prefill's token only
    assert sum(len(s.new_tokens[1]) for s in steps) == 10


def test_sampling_seeded_batch_independent(pair):
    hf, model = pair
    eng = Engine(model, chunk_size=8)
    rng = np.random.default_rng(3)
    greedy = SamplingParams(max_new_tokens=12)
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, seed=11)
    a, b, c = _reqs(hf, rng, (4, 7, 9), [hot, greedy, greedy])
    alone = eng.generate([a.prompt], a.images[None], params=hot)[0]
    together = eng.generate([a.prompt, b.prompt, c.prompt], np.stack([a.images, b.images, c.images]),
                            params=[hot, greedy, hot])
    assert together[0] == alone  # a row's random stream depends on its seed only
    g = eng.generate([a.prompt], a.images[None], params=greedy)[0]
    assert together[0] != g  # (t = 1.5 on this model: sampling differs from greedy)
    top1 = eng.generate([a.prompt], a.images[None], params=SamplingParams(12, temperature=1.5, top_k=1, seed=5))[0]
    assert top1 == g
    tiny_p = eng.generate([a.prompt], a.images[None], params=SamplingParams(12, temperature=1.5, top_p=1e-6, seed=5))
    assert tiny_p[0] == g
    # a k beyond int32 (a library caller; the server refuses it) is "every token", not an overflow
    huge_k = eng.generate([a.prompt], a.images[None], params=SamplingParams(12, temperature=1.5, top_k=2**40, seed=11))
    assert huge_k[0] == alone


def test_sample_rows_top_k_top_p_sets():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 50)).astype(np.float32) * 2
    n = 400
    x = jnp.asarray(np.repeat(logits, n, 0))
    ones = jnp.ones((n,), jnp.float32)

    def draw(top_k, top_p, t=1.0):
        samp = {"temperature": t * ones, "top_k": jnp.full((n,), top_k, jnp.int32), "top_p": top_p * ones,
                "seed": jnp.arange(n, dtype=jnp.uint32)}
        return set(np.asarray(jax.jit(sample_rows)(x, jnp.zeros((n,), jnp.int32), samp)).tolist())

    order = np.argsort(-logits[0])
    assert draw(3, 1.0) <= set(order[:3].tolist()) and len(draw(3, 1.0)) == 3
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    nucleus = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)  # smallest head with mass >= 0.6
    got = draw(0, 0.6)
    assert got <= set(order[:nucleus].tolist()) and len(got) > 1
    assert len(draw(0, 1.0)) > nucleus


def test_sharded_engine_on_mesh(pair, tmp_path):
    """Params sharded over a (data 2, fsdp 2, tensor 2) mesh of the 8 CPU devices: same ids."""
    import jax

    from llava_jax.sharding import make_mesh

    hf, model = pair
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    hf.save_pretrained(tmp_path)
    mesh = make_mesh((2, 2, 2))
    sharded = llava_jax.from_pretrained(tmp_path, mesh=mesh)
    q = sharded.llm.layers.q_kernel.value
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    reqs = _reqs(hf, np.random.default_rng(4), (3, 9, 6))
    args = ([r.prompt for r in reqs], np.stack([r.images for r in reqs]))
    eng = Engine(sharded, chunk_size=4)
    assert eng.mesh is not None
    ref = Engine(model).generate(*args, params=SamplingParams(max_new_tokens=9))
    assert eng.generate(*args, params=SamplingParams(max_new_tokens=9)) == ref
    # continuous batching on the mesh: request 2 joins a running batch of requests 0 and 1
    for r in reqs:
        r.params = SamplingParams(max_new_tokens=9)
    batch = eng.open(reqs[:2], slots=4, reserve_new_tokens=16)
    got = {0: [], 1: [], 2: []}
    first = True
    while batch.running:
        for slot, (toks, _) in batch.step().items():
            got[slot] += toks
        if first:
            assert batch.join([reqs[2]]) == [2]
            first = False
    assert [got[i] for i in range(3)] == ref


def test_continuous_batching_joins_equal_solo_runs(pair):
    """Requests joining a running batch between decode chunks (into new and freed rows) get
    exactly the tokens they get alone; the decode chunk compiles once for the batch."""
    hf, model = pair
    eng = Engine(model, chunk_size=3)
    rng = np.random.default_rng(5)
    ps = [SamplingParams(max_new_tokens=m) for m in (4, 12, 9, 10, 6)]
    ps[3] = SamplingParams(max_new_tokens=10, temperature=1.2, seed=9)
    reqs = _reqs(hf, rng, (3, 9, 6, 5, 8), ps)
    reqs[2].images = None  # a text-only joiner
    reqs[2].prompt = [t for t in reqs[2].prompt if t != IMAGE_TOKEN]
    solo = [eng.generate([r.prompt], None if r.images is None else r.images[None], params=r.params)[0] for r in reqs]
    before = dict(eng.traces)
    batch = eng.open(reqs[:2], slots=4, reserve_new_tokens=40)
    got = {0: [], 1: []}
    req_of = {0: 0, 1: 1}
    waiting = [2, 3, 4]
    done = {}
    steps = 0
    while batch.running or waiting:
        for slot, (toks, fin) in batch.step().items():
            got[req_of[slot]] += toks
            if fin:
                done[req_of[slot]] = fin
        steps += 1
        if steps >= 2 and waiting:  # join after the first decode chunk, as many as fit
            k = min(len(batch.free_slots), len(waiting))
            joiners = [waiting.pop(0) for _ in range(k)]
            if joiners:
                for j, slot in zip(joiners, batch.join([reqs[j] for j in joiners])):
                    req_of[slot] = j
                    got[j] = []
    assert [got[i] for i in range(5)] == solo
    assert done[0] == "length" and eng.stats["joined"] == 3
    new = {k: v - before.get(k, 0) for k, v in eng.traces.items()}
    assert new["decode"] == 1 and new["prefill"] == 1  # one batch shape, whatever joined
