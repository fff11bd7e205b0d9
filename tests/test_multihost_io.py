"""Multi-host plumbing that runs in one process: bucket (gs://) workdirs for metrics, TensorBoard
and the skip log (through a fake GCS file system that, like GCS, cannot append), which input
shard each process reads for a given mesh layout, and when `jax.distributed` is initialised."""
import json

import pytest

from llava_jax import sharding as shd
from llava_jax.train.runtime import distributed_mode


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://BUCKET/path -> tmp_path/gcs/BUCKET/path, for etils.epath's fsspec backend."""
    from etils.epath import backend
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "gcs"

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            kwargs.pop("finalize_on_close", None)
            super().__init__(auto_mkdir=True)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            return str(root / path[len("gs://"):]) if path.startswith("gs://") else super()._strip_protocol(path)

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("GCS objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    fake = FakeGCS()
    # Orbax asks the real bucket (google-cloud-storage) whether it has hierarchical namespace
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    real = type(backend.fsspec_backend)._get_filesystem
    monkeypatch.setattr(type(backend.fsspec_backend), "_get_filesystem",
                        lambda self, name: fake if name in ("gs", "gcs") else real(self, name))
    return root


def record(step):
    return {"loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "packing_efficiency": 0.9}


def test_metrics_and_tensorboard_to_a_bucket(fake_gcs):
    from llava_jax.train.metrics import MetricsWriter

    w = MetricsWriter("gs://bkt/run", tensorboard=True, progress_total=4, progress_bar=False,
                      remote_flush_secs=3600)
    for s in (1, 2, 3):
        w.write(s, record(s))
    w.close()
    run = fake_gcs / "bkt" / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    # a resumed run keeps the earlier lines (read back, then rewritten: no append on GCS)
    w = MetricsWriter("gs://bkt/run", tensorboard=False, progress_bar=False, start=3)
    w.write(4, record(4))
    w.close()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_skip_log_and_paths_on_a_bucket(fake_gcs):
    from llava_jax.data.skips import SkipLog
    from llava_jax.fileio import as_path, is_remote
    from llava_jax.checkpoint import Checkpointer

    log = SkipLog("gs://bkt/run/skipped.jsonl")
    log.record("a.json", 3, "x", "too_long: 3000 tokens")
    log.record("a.json", 7, "y", "image_missing: nope.jpg")
    rows = [json.loads(x) for x in (fake_gcs / "bkt" / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [3, 7]
    p = as_path("gs://bkt/run") / "train_summary.json"
    p.write_text("{}")
    assert is_remote(p) and str(p) == "gs://bkt/run/train_summary.json"
    assert (fake_gcs / "bkt" / "run" / "train_summary.json").exists()
    assert not is_remote("/local/dir")
    # the checkpoint directory stays a gs:// URI for Orbax (its arrays go through tensorstore's
    # own GCS driver, which needs a real bucket)
    ck = Checkpointer("gs://bkt/run", async_save=False)
    assert str(ck.directory) == "gs://bkt/run/checkpoints" and ck.latest_step() is None
    ck.close()


@pytest.mark.parametrize("rows, expect", [
    ({0: {0, 1}, 1: {2, 3}}, [(0, 2), (1, 2)]),  # batch axes span the hosts: disjoint shards
    ({0: {0, 1}, 1: {0, 1}}, [(0, 1), (0, 1)]),  # batch replicated across hosts (tensor axis): same data
    ({0: {0}, 1: {1}, 2: {0}, 3: {1}}, [(0, 2), (1, 2), (0, 2), (1, 2)]),
    ({0: {0, 2}, 1: {1, 3}}, [(0, 2), (1, 2)]),  # strided rows are fine
])
def test_input_shard_per_process(rows, expect):
    n = len(set().union(*rows.values()))
    assert [shd.shard_of(rows, p, n) for p in sorted(rows)] == expect


def test_uneven_batch_rows_are_refused():
    with pytest.raises(ValueError, match="overlapping or uneven"):
        shd.shard_of({0: {0, 1}, 1: {1, 2}}, 0, 3)


def test_single_process_reads_everything():
    m = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.process_data_shard(m) == (0, 1)


@pytest.mark.parametrize("env, mode", [
    ({}, "none"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, "explicit"),
    ({"LLAVA_JAX_DISTRIBUTED": "1"}, "auto"),
    ({"LLAVA_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, "none"),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, "auto"),
    ({"SLURM_NTASKS": "8"}, "none"),  # the batch script itself, outside srun
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "auto"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "none"),
])
def test_distributed_mode(env, mode):
    assert distributed_mode(env) == mode
