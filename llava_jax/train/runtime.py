"""Process start-up: multi-host initialisation and logging from process 0 only."""
from __future__ import annotations

import os

import jax
from absl import logging


def maybe_initialize_distributed():
    """`jax.distributed.initialize()` when running on several hosts: Cloud TPU pod VMs and SLURM
    are detected by JAX itself; a generic cluster sets JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if explicit:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    elif slurm or tpu_pod:
        jax.distributed.initialize()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
