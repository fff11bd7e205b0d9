"""Process start-up: multi-host initialisation and logging from process 0 only."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def distributed_mode(env=None) -> str:
    """How this process joins a multi-process run: 'explicit' (JAX_COORDINATOR_ADDRESS, with
    JAX_NUM_PROCESSES / JAX_PROCESS_ID), 'auto' (let JAX detect a Cloud TPU slice, SLURM, ...),
    or 'none' (one process).

    LLAVA_JAX_DISTRIBUTED=1 forces 'auto' (the launch scripts set it on every TPU worker) and =0
    turns detection off. Without it: SLURM with more than one task, or GKE TPU worker hostnames
    listing several hosts, mean 'auto'.
    """
    env = os.environ if env is None else env
    flag = env.get("LLAVA_JAX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no"):
        return "none"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if flag in ("1", "true", "yes"):
        return "auto"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:  # inside `srun`
        return "auto"
    if env.get("TPU_WORKER_HOSTNAMES", "").count(","):
        return "auto"
    return "none"


def maybe_initialize_distributed():
    """`jax.distributed.initialize()` when this is one process of several (see
    `distributed_mode`); then only process 0 logs at INFO."""
    env = os.environ
    mode = distributed_mode(env)
    if mode == "explicit":
        num = env.get("JAX_NUM_PROCESSES")
        pid = env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(num) if num else None,
                                   process_id=int(pid) if pid else None)
    elif mode == "auto":
        jax.distributed.initialize()
    if jax.process_index() != 0:
        logging.getLogger("llava_jax").setLevel(logging.WARNING)
    elif mode != "none":
        log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count())
