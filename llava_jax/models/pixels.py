"""`normalize`: a vision tower's pixel convention (mean/std, `llava_jax.config.CLIP_MEAN` ...) applied
to numpy arrays on the host and jax arrays on the device. No flax here: the data pipeline's workers import it
(through `llava_jax.data.images`) and so does the model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

try:  # jax is optional for host-side use
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = jnp = None

from llava_jax.config import CLIP_MEAN, CLIP_STD


def normalize(images_uint8, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """``(x / 255 - mean) / std`` in float32 for uint8 ``[..., H, W, 3]`` numpy or jax arrays.

    Returns the same array family as the input (numpy in → numpy out, jax in → jax out), so the
    data pipeline can ship uint8 to the device and normalize inside the jitted step.

    Arithmetic order matches transformers exactly: it rescales in float64 (``x * (1/255)``) and
    casts to float32, then computes ``(x - mean) / std`` in float32 with float32 mean/std. For
    all 256 uint8 values ``float32(x) / float32(255)`` is bit-identical to that float64 product
    cast to float32 (checked exhaustively in the tests), so everything here stays in float32.
    On CPU the numpy path is bit-exact; XLA may rewrite the divisions (e.g. as reciprocal
    multiplies on TPU), which stays within ~1e-6.
    """
    is_jax = jax is not None and isinstance(images_uint8, jax.Array)
    xp = jnp if is_jax else np
    x = images_uint8 if is_jax else np.asarray(images_uint8)
    if x.shape[-1:] != (3,):
        raise ValueError(f"normalize expects [..., H, W, 3] images, got shape {tuple(x.shape)}")
    mean_a = xp.asarray(np.asarray(mean, dtype=np.float32))
    std_a = xp.asarray(np.asarray(std, dtype=np.float32))
    x = x.astype(xp.float32) / xp.float32(255.0)
    return (x - mean_a) / std_a
