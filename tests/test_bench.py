"""`python -m llava_jax.tools.bench --preset=tiny` runs end to end on CPU: both frameworks, every
work item, plausible numbers, a markdown block with the command and versions."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from llava_jax.tools import bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=900):
    p = subprocess.run([sys.executable, "-m", "llava_jax.tools.bench", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _rows(table: str):
    rows, work = [], None
    for line in table.splitlines():
        if not line.startswith("| ") or line.startswith("| work") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        work = cells[0] or work
        rows.append([work] + cells[1:])
    return rows


def _num(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


# CI runs one training stage and one decode batch (~1 CPU-minute); the whole preset is slow.
@pytest.mark.parametrize("args,works", [  # slow set: 37 s on 2 cores (CI time)
    pytest.param(["--tasks=stage2,decode", "--decode_batches=2"], {"stage 2 train", "decode B=2"},
                 marks=pytest.mark.slow),
    pytest.param([], {"stage 1 train", "stage 2 train", "decode B=1", "decode B=2"}, marks=pytest.mark.slow),
])
def test_tiny_preset_end_to_end(tmp_path, args, works):
    md, js = tmp_path / "BENCH.md", tmp_path / "r.jsonl"
    md.write_text("# existing\n")
    out = _run(["--preset=tiny", f"--markdown={md}", f"--json={js}", "--peak_tflops=1", *args], tmp_path)
    rows = _rows(out)
    assert {r[0].split(" (")[0] for r in rows} == works
    works = {r[0] for r in rows}
    for w in works:
        sides = {r[1].split(" (")[0]: r for r in rows if r[0] == w}
        assert set(sides) == {"llava-jax", "transformers eager"}, (w, sides)
        for side, r in sides.items():
            tok_s, ms, mfu, mem, ratio = _num(r[2]), _num(r[3]), r[4], r[5], r[6]
            assert tok_s > 0 and ms > 0, r
            assert ratio.endswith("x") and _num(ratio) > 0, r
            if side == "transformers eager":
                assert ratio == "1.00x"
            if w.startswith("stage"):
                assert mfu.endswith("%") and _num(mfu) > 0, r  # --peak_tflops=1 gives an MFU on CPU
                assert "loss" in r[7]
            if side == "llava-jax" and w.startswith("stage"):
                assert mem.startswith("~") and _num(mem) > 0, r  # XLA's estimate on CPU
    assert "torch.compile skipped on CPU" in out
    text = md.read_text()
    assert text.startswith("# existing\n") and "`python -m llava_jax.tools.bench --preset=tiny" in text
    assert "jax 0." in text and "transformers 5." in text and "torch 2." in text
    results = [json.loads(x) for x in js.read_text().splitlines()]
    assert len(results) == 2 * len(works) and all(r["ok"] for r in results)
    # Saved results render again without running anything.
    again = _run([f"--from_json={js}", "--preset=tiny", "--peak_tflops=1"], tmp_path, timeout=120)
    assert _rows(again) == rows


@pytest.mark.slow
def test_isolated_workers_and_a_failure_is_reported(tmp_path):
    """One subprocess per measurement (the GPU mode); a bad variant fails alone, exit code 1."""
    p = subprocess.run([sys.executable, "-m", "llava_jax.tools.bench", "--preset=tiny", "--isolate=yes",
                        "--tasks=stage1", "--variants=attention=xla;attention=nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 1
    rows = _rows(p.stdout)
    assert any("attention=nope" in r[1] and r[2] == "failed" and "unknown attention impl" in r[7] for r in rows)
    assert any(r[1] == "transformers eager" and _num(r[2]) > 0 for r in rows)
    assert {r[1] for r in rows} == {"llava-jax (defaults)", "llava-jax (attention=nope)", "transformers eager"}
    assert any(r[1] == "llava-jax (defaults)" and _num(r[2]) > 0 for r in rows)


def test_resume_skips_recorded_jobs_and_keeps_their_results(tmp_path):
    """A rerun with --resume runs only the jobs its JSON lines hold no result for: a recorded
    success or failure (a kernel that refused the shape) is reported as it was, not run again."""
    js = tmp_path / "r.jsonl"
    base = [sys.executable, "-m", "llava_jax.tools.bench", "--preset=tiny", "--tasks=stage1", f"--json={js}",
            "--resume", "--variants=attention=xla;attention=nope"]
    first = subprocess.run(base + ["--frameworks=jax"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 1  # the unknown attention fails
    recorded = [json.loads(x) for x in js.read_text().splitlines()]
    assert [r["ok"] for r in recorded] == [True, False]
    again = subprocess.run(base + ["--frameworks=jax,torch"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 1
    assert again.stderr.count("not run again") == 2 and "failed: " in again.stderr
    lines = [json.loads(x) for x in js.read_text().splitlines()]
    assert lines[:2] == recorded and len(lines) == 3 and lines[2]["framework"] == "torch" and lines[2]["ok"]
    rows = _rows(again.stdout)
    jax_ok = [r for r in rows if r[1] == "llava-jax (defaults)"]
    first_ok = [r for r in _rows(first.stdout) if r[1] == "llava-jax (defaults)"]
    # the recorded figures, not a new measurement (the ratio column now has transformers beside it)
    assert [r[:6] + r[7:] for r in jax_ok] == [r[:6] + r[7:] for r in first_ok] and len(jax_ok) == 1
    assert any("attention=nope" in r[1] and r[2] == "failed" for r in rows)
    assert any(r[1] == "transformers eager" and _num(r[2]) > 0 for r in rows)


def test_peak_table_and_variants():
    from llava_jax.train.metrics import peak_tflops  # the trainer's MFU and the bench read one table

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") is None
    v = bench.parse_variants("attention=cudnn_padded,loss_chunk=512;remat=dots")
    assert v[0]["attention"] == "cudnn_padded" and v[0]["loss_chunk"] == 512 and v[1]["remat"] == "dots"
    assert bench.variant_label(v[1]) == "remat=dots"
    with pytest.raises(ValueError, match="unknown variant key"):
        bench.parse_variants("atention=xla")


def test_xla_flag_sets_are_known_to_this_jaxlib():
    """XLA aborts on an unknown flag or enum value at start-up; every named set must parse."""
    import os

    flags = " ".join(dict.fromkeys(" ".join(bench.XLA_FLAG_SETS.values()).split()))
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(int((jnp.ones(2) + 1).sum()))"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "4", p.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"],
                         env={**env, "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,BOGUS"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0  # the check above can fail
    with pytest.raises(ValueError, match="unknown xla flag set"):
        bench.parse_variants("xla=fast")


def test_llamacpp_rows_are_decode_at_batch_one_per_quant():
    """llama.cpp's CLI decodes one sequence: its rows exist only for decode B=1, one per GGUF type."""
    args = bench.parse_args(["--preset=demo", "--tasks=stage1,decode", "--decode_batches=1,2",
                             "--frameworks=jax,llamacpp", "--llamacpp_quants=f16,q4_K_M"])
    jobs = bench.build_jobs(args, bench.geometry_from_args(args))
    got = {(j["framework"], j["work"], j.get("batch"), j.get("quant")) for j in jobs}
    assert {g for g in got if g[0] == "llamacpp"} == {("llamacpp", "decode", 1, "f16"), ("llamacpp", "decode", 1, "q4_K_M")}
    assert ("jax", "decode", 2, None) in got and ("jax", "train", None, None) in got


def test_llamacpp_side_by_side_runs_llama_cpp_itself(tmp_path):
    """The demo-size model exported by llava-jax's GGUF export and timed by llama.cpp's own tools
    (llama-mtmd-cli for the image encoder, llama-bench for the LLM) next to llava-jax's engine."""
    from llava_jax.tools import llamacpp

    if llamacpp.bin_dir() is None:
        pytest.skip("no llama.cpp build (python -m llava_jax.tools.llamacpp builds it, ~25 min); tests never build")
    js = tmp_path / "r.jsonl"
    out = _run(["--preset=demo", "--tasks=decode", "--frameworks=jax,llamacpp", "--llamacpp_quants=f16",
                "--new_tokens=16", "--decode_repeats=1", f"--json={js}"], tmp_path)
    rows = {r[1]: r for r in _rows(out)}
    assert set(rows) == {"llava-jax (Engine)", "llama.cpp (f16 GGUF)"}, rows
    r = rows["llama.cpp (f16 GGUF)"]
    assert _num(r[2]) > 0 and _num(r[3]) > 0 and "42 prompt tokens" in r[7], r
    (res,) = [json.loads(x) for x in js.read_text().splitlines() if '"llamacpp"' in x]
    assert res["ok"] and res["backend"].startswith("llama.cpp ") and res["llm_file_bytes"] > 0
