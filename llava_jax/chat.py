"""`python -m llava_jax.chat --model DIR --image photo.jpg`: chat with a checkpoint in the terminal
(see `llava_jax.serve.cli`)."""
import sys

from llava_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
