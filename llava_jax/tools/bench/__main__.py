"""``python -m llava_jax.tools.bench``: see the package docstring."""
import sys

from llava_jax.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
