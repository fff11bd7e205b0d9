"""The input pipeline's settings (`PipelineConfig`), apart from the pipeline that runs them
(`data/pipeline.py`): shapes, content, order, packing, batching, parallelism, AnyRes and the
image decode modes, each checked when the config is made."""
from __future__ import annotations

import dataclasses

from llava_jax.config import ImageProcessorConfig, LlavaConfig
from llava_jax.data import images as imglib
from llava_jax.data.templates import resolve_template

IMAGE_DECODE_MODES = ("exact", "fast", "draft")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings.

    Shapes: ``max_length`` (tokens per row, L), ``max_images_per_row`` (M), ``image_size``
    (H = W), ``num_image_tokens`` (tokens per image: 576 for CLIP-L/336), ``image_token_id``
    (None: the tokenizer's ``<image>`` id), ``pad_token_id`` (None: the tokenizer's pad id, or 0).

    Content: ``template`` (conversation template name), ``image_mode`` ``"pad"`` (LLaVA-1.5) or
    ``"crop"``, ``image_processor`` (the model's ``LlavaConfig.image_processor``: CLIP or SigLIP
    preprocessing); ``image_root`` joins relative image paths; ``length_policy`` ``"drop"`` (over-long
    samples are skipped) or ``"truncate"`` (text after the last image is cut at max_length when
    supervised tokens remain; a cut through an image drops the sample either way).

    Order: ``seed``, ``shuffle`` (reshuffled every epoch), ``num_epochs`` (None = forever).

    Packing: ``pack`` (False: one padded sample per row), ``pack_bins`` (open rows of a packing
    window, default ``batch_size``; more bins pack tighter), ``max_samples_per_row`` (None =
    unlimited).

    Batching: ``batch_size`` (rows per process), ``drop_remainder``.

    Parallelism: ``worker_count`` Grain worker processes (0 = decode in the main process),
    ``worker_group_size`` consecutive samples sent from a worker as ONE element (concatenated
    arrays: Grain's per-element inter-process cost, ~2.5 ms CPU here, is paid once per group;
    the sample stream is the same for any group size), ``worker_buffer_size`` groups buffered
    per worker, ``read_threads`` threads per process running the per-sample step (PIL and the
    tokenizer release the GIL for most of it; 0 = synchronous), ``read_buffer_size`` groups
    read ahead per process, ``prefetch_batches``
    finished batches prepared by a background thread of the main process (0 = none),
    ``min_shm_bytes``: worker outputs (numpy arrays) at least this large travel through shared
    memory, smaller ones are pickled through the worker's pipe (Grain's ``min_shm_size``; None =
    Grain's default 0: every array, even the token ids, gets its own shared-memory segment, which
    measured ~20-30% more CPU per sample here). 64 KiB sends images through shared memory and
    tokens through the pipe. Pickling the images too is about as fast, but then a worker blocked
    on a full pipe cannot exit and ``close()`` waits 25 s per worker for Grain's kill timeout.

    LLaVA-NeXT: ``anyres`` (the model's ``LlavaConfig`` when it has ``image_grid_pinpoints``;
    ``from_config`` sets it): each image is decoded into its AnyRes views
    (``data.anyres.preprocess_anyres_uint8``: base view + tiles, padded to ``max_tiles``) and its
    ``<image>`` expands to that image's own token count (``anyres.num_image_tokens`` of its size),
    so the length policy sees the real length. ``image_decode`` / ``image_mode`` do not apply
    (always a full decode: the tiles need the whole resolution). ``max_views_per_row`` (None =
    ``max_images_per_row`` x (1 + max_tiles), every slot's padding views) bounds the REAL views a
    row's samples take, counted when packing; the device still encodes every slot's views (the
    shapes stay static), so it does not shrink the step, it only decides which samples share a row.

    Images: ``image_decode``:

    * ``"exact"``: full decode + ``preprocess_image_uint8``: bit-equal to transformers'
      ``CLIPImageProcessorPil`` (+ LLaVA pad) for every input.
    * ``"fast"`` (default): ``images.decode_and_preprocess_uint8`` (``draft_gap``): bit-equal
      while the edge that is resized is < 2 x image_size; larger JPEGs are decoded at 1/2-1/8
      scale by libjpeg (DCT reduction) and stay a downsample (small deviations, see images.py).
    * ``"draft"``: like fast, but the DCT reduction is also used when it leaves the resized edge
      at >= ``draft_min_ratio`` x image_size (a slight final UPsample), e.g. 640x480 -> 320x240
      -> 336 in pad mode: ~1.5-1.6x faster per sample than exact on 640x480 JPEGs; deviation
      from exact on the benchmark's photo-like images: mean 0.65 uint8 levels, p99 5, max 59
      (at sharp edges); a harsher noisy image gave mean 1.4, p99 6 (python -m
      llava_jax.tools.data_bench). Not bit-exact: opt in knowingly.
    """

    max_length: int = 2048
    max_images_per_row: int = 4
    image_size: int = 336
    image_mode: str = "pad"
    image_processor: ImageProcessorConfig = ImageProcessorConfig()
    template: str = "vicuna_v1"
    num_image_tokens: int = 576
    image_token_id: int | None = None
    pad_token_id: int | None = None
    batch_size: int = 8
    pack: bool = True
    pack_bins: int | None = None
    max_samples_per_row: int | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    worker_count: int = 0
    worker_buffer_size: int = 2
    worker_group_size: int = 8
    read_threads: int = 1
    read_buffer_size: int = 2
    prefetch_batches: int = 2
    length_policy: str = "drop"
    drop_remainder: bool = True
    image_decode: str = "fast"
    draft_gap: float = 1.0
    draft_min_ratio: float = 0.9
    image_root: str | None = None
    min_shm_bytes: int | None = 65536
    anyres: LlavaConfig | None = None
    max_views_per_row: int | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"PipelineConfig: {msg}")

        if self.max_length < 2:
            bad(f"max_length must be >= 2, got {self.max_length}")
        if self.max_images_per_row < 0:
            bad(f"max_images_per_row must be >= 0, got {self.max_images_per_row}")
        if self.image_mode not in imglib.MODES:
            bad(f"image_mode must be one of {imglib.MODES}, got {self.image_mode!r}")
        if self.image_size < 1:
            bad(f"image_size must be >= 1, got {self.image_size}")
        if self.num_image_tokens < 1:
            bad(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        if self.batch_size < 1:
            bad(f"batch_size must be >= 1, got {self.batch_size}")
        if self.length_policy not in ("drop", "truncate"):
            bad(f"length_policy must be 'drop' or 'truncate', got {self.length_policy!r}")
        if self.image_decode not in IMAGE_DECODE_MODES:
            bad(f"image_decode must be one of {IMAGE_DECODE_MODES}, got {self.image_decode!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            bad(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if self.worker_count < 0 or self.read_threads < 0 or self.prefetch_batches < 0:
            bad("worker_count, read_threads and prefetch_batches must be >= 0")
        if self.worker_group_size < 1:
            bad(f"worker_group_size must be >= 1, got {self.worker_group_size}")
        if self.pack_bins is not None and self.pack_bins < 1:
            bad(f"pack_bins must be >= 1, got {self.pack_bins}")
        if self.max_samples_per_row is not None and self.max_samples_per_row < 1:
            bad(f"max_samples_per_row must be >= 1, got {self.max_samples_per_row}")
        if not 0 <= self.seed < 2**32:
            bad(f"seed must be in [0, 2**32), got {self.seed}")
        if self.draft_gap < 1 or not 0 < self.draft_min_ratio <= 1:
            bad("draft_gap must be >= 1 and draft_min_ratio in (0, 1]")
        if self.anyres is not None and not self.anyres.is_anyres:
            bad("anyres must be a model config with image_grid_pinpoints (LLaVA-NeXT) or None")
        if self.max_views_per_row is not None:
            if self.anyres is None:
                bad("max_views_per_row counts AnyRes views: it needs anyres (a LLaVA-NeXT model)")
            if self.max_views_per_row < 1 + self.anyres.max_tiles:
                bad(f"max_views_per_row={self.max_views_per_row} cannot hold one image with the most tiles "
                    f"(1 + max_tiles = {1 + self.anyres.max_tiles})")
        resolve_template(self.template)  # KeyError with the known names

    @classmethod
    def from_config(cls, data_config, model_cfg, batch_size: int) -> "PipelineConfig":
        """The pipeline of a training config: every field of `config.data` that is a pipeline
        field (same name), the image and token geometry from the model config, and the rows per
        batch. The training config is the one source of settings; the defaults here serve
        direct library use."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in dict(data_config).items() if k in names}
        return cls(**given, image_size=model_cfg.vision.image_size, image_processor=model_cfg.image_processor,
                   num_image_tokens=model_cfg.num_image_tokens,
                   image_token_id=model_cfg.image_token_id, batch_size=batch_size,
                   anyres=model_cfg if model_cfg.is_anyres else None)

    def replace(self, **kw) -> "PipelineConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_bins(self) -> int:
        """Open rows of a packing window: ``pack_bins``, by default ``batch_size``; 1 unpacked."""
        return (self.pack_bins or self.batch_size) if self.pack else 1
