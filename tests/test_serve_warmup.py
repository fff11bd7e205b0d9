"""`python -m llava_jax.serve --warmup`: the shapes real requests use are compiled before serving,
through the server's own batching path, so the first request of each does not stall."""
import threading

import pytest

pytest.importorskip("torch")

from serve_util import IMAGE_SIZE, make_chat_checkpoint, rand_image  # noqa: E402

from llava_jax.serve.__main__ import warmup_groups  # noqa: E402
from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator, Completion  # noqa: E402
from llava_jax.serve.scheduler import BatchScheduler  # noqa: E402


S = IMAGE_SIZE
# LLaVA-NeXT: llava-v1.6's grid pinpoints scaled from 336 px; tower patch 7: up to 88 tokens an image
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]


@pytest.mark.parametrize("anyres", [False, True], ids=["llava", "llava_next"])
def test_warm_up_compiles_what_requests_then_use(tmp_path, anyres):
    kw = dict(pinpoints=PINPOINTS, patch_size=7) if anyres else {}
    d, _, _ = make_chat_checkpoint(tmp_path / "ckpt", **kw)
    gen = ChatGenerator.from_pretrained(d)
    sched = BatchScheduler(gen, max_batch=2, window_s=0.2)
    try:
        groups = warmup_groups(gen, max_batch=2, max_prompt_tokens=256)
        assert [len(g) for g in groups[:4]] == [1, 1, 2, 2]  # batch buckets 1, 2 x (text, image)
        assert len(groups) > 4  # and single prompts of longer prompt buckets
        report = sched.warm_up(groups, max_new_tokens=16)
        assert report["compilations"]["prefill"] >= 2 and report["compilations"]["decode"] >= 1
        assert sched.stats()["requests_completed"] == 0  # warm-up is not counted as traffic
        before = dict(gen.engine.traces)

        def ask(messages, n=1):
            finished = threading.Semaphore(0)
            comps = [Completion(gen.encode(messages), SamplingParams(max_new_tokens=16),
                                on_done=lambda _c: finished.release()) for _ in range(n)]
            for c in comps:
                sched.submit(c)
            for _ in comps:
                assert finished.acquire(timeout=300)
            return comps

        image = [{"role": "user", "content": [{"type": "image", "image": rand_image(3)},
                                              {"type": "text", "text": "What is in the picture?"}]}]
        (c,) = ask(image)
        assert c.finish_reason in ("stop", "length") and c.error is None
        # an image of another size (another AnyRes grid) with a longer question: a longer prompt bucket
        long_image = [{"role": "user", "content": [{"type": "image", "image": rand_image(4, w=70, h=23)},
                                                   {"type": "text", "text": "Describe it. " * 12}]}]
        assert len(gen.encode(image).ids) < len(gen.encode(long_image).ids) <= 256
        ask(long_image)
        ask([{"role": "user", "content": "Tell me a story."}], n=2)
        assert dict(gen.engine.traces) == before  # nothing compiled on arrival
    finally:
        sched.close()
