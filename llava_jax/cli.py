"""What every command-line entry point shares.

* Quiet by default: llava-jax's own messages (the `llava_jax` logger) print at INFO; other
  libraries' INFO logs (absl, Orbax, JAX, Grain) only with `--verbose`. JAX is kept from probing
  for a TPU on a machine that has none (with `jax[tpu]` installed, every CPU run otherwise logs
  libtpu's failed initialisation).
* `--help` prints the command's usage and its own flags and exits 0 (absl's exits 1, and lists
  nothing for a command whose flags live in another module); argparse commands show each default
  once (`HelpFormatter`).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

VERBOSE_HELP = "also show other libraries' INFO logs (absl, Orbax, JAX, Grain)"


def accelerator_present() -> bool:
    """A TPU (/dev/accel*, /dev/vfio/*) or NVIDIA GPU (/dev/nvidia[0-9]*) device file exists."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"))


def setup(verbose: bool = False) -> None:
    """Logging and platform choice for a command run (call first thing in `main`)."""
    if not os.environ.get("JAX_PLATFORMS") and not accelerator_present():
        import jax

        try:
            jax.config.update("jax_platforms", "cpu")
        except Exception:  # noqa: BLE001 - a backend is already up: nothing to save
            pass
    ours = logging.getLogger("llava_jax")
    if not any(getattr(h, "_llava_jax", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[llava_jax] %(message)s"))
        handler._llava_jax = True  # noqa: SLF001 - marks our handler, so setup() is idempotent
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    level = logging.INFO if verbose else logging.WARNING
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass
    logging.getLogger().setLevel(level)
    for name in ("jax", "orbax", "absl", "grain", "tensorflow", "etils"):
        logging.getLogger(name).setLevel(level)


def run_absl(main, module) -> None:
    """`absl.app.run(main)` for an entry point whose flags are defined in `module`, with a
    `--verbose` flag and a `--help` that shows `module`'s docstring and flags and exits 0."""
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in sys.argv[1:]):
        doc = (module.__doc__ or "").strip()
        print(doc + "\n\nflags:\n" + flags.FLAGS.module_help(module) + "\n  --[no]verbose: " + VERBOSE_HELP
              + "\n\nEvery config field can be set with --config.<group>.<field>=VALUE where the command has a"
              " --config (see llava_jax/train/defaults.py); --helpfull lists every flag." * ("config" in flags.FLAGS))
        sys.exit(0)

    def wrapped(argv):
        setup(flags.FLAGS.verbose)
        return main(argv)

    app.run(wrapped)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse help with each default shown once: appended as "(default: X)" unless the help
    text already says its default, and never for None/False/empty defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d in (None, False, "", [], argparse.SUPPRESS) or action.option_strings == []:
            return text
        return f"{text} (default: {d})" if text else f"(default: {d})"
