"""Build llama.cpp from source (CPU) into a cache outside the repository, for checking the GGUF export
against llama.cpp itself (tests/test_gguf_llamacpp.py, slow) and for the CPU side-by-side in
BENCHMARKS.md.

    python -m llava_jax.tools.llamacpp            # download + build (minutes to tens of minutes)
    python -m llava_jax.tools.llamacpp --print    # the bin folder if the build is there, else exit 1

The C++ source comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp under
`vendor/llama.cpp`, with its git metadata), fetched by `pip download --no-binary :all:`; the version
is pinned by `VERSION` so the tests name the llama.cpp commit they were checked with. The build
goes to `$LLAVA_JAX_LLAMACPP` or `~/.cache/llava_jax/llama.cpp/<VERSION>` (`bin/` holds the
tools); an existing build is reused. Only the tools used here are built: `llama-mtmd-cli`
(multimodal generation), `llama-mtmd-debug` (the image embedding), `llama-tokenize` (the prompt ids), `llama-quantize` (q4_K_M),
`llama-bench` (tokens/s). Tests never build: they use the cache when it is there and skip otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; vendors llama.cpp commit 0c1e570 (see `commit()`)
TOOLS = ("llama-mtmd-cli", "llama-mtmd-debug", "llama-tokenize", "llama-quantize", "llama-bench")


def cache_dir(version: str = VERSION) -> Path:
    env = os.environ.get("LLAVA_JAX_LLAMACPP")
    return Path(env) if env else Path.home() / ".cache" / "llava_jax" / "llama.cpp" / version


def source_dir(version: str = VERSION) -> Path:
    return cache_dir(version) / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def bin_dir(version: str = VERSION) -> Path | None:
    """The folder holding the built tools, or None when the build is missing."""
    d = cache_dir(version) / "build" / "bin"
    return d if all((d / t).exists() for t in TOOLS) else None


def commit(version: str = VERSION) -> str | None:
    """The llama.cpp commit the sdist vendors (its git metadata), or None."""
    try:
        return subprocess.run(["git", "-C", str(source_dir(version)), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def build(version: str = VERSION, jobs: int = 2, native: bool = True, nice: int = 19) -> Path:
    root = cache_dir(version)
    (root / "src").mkdir(parents=True, exist_ok=True)
    src = source_dir(version)
    if not (src / "CMakeLists.txt").exists():
        sdist = root / "src" / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.exists():
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                  "--no-deps", "--no-build-isolation", "-d", root / "src"])
        with tarfile.open(sdist) as tf:
            tf.extractall(root / "src", filter="data")
    out = root / "build"
    pre = ["nice", "-n", str(nice)] if nice else []
    _run(pre + ["cmake", "-S", src, "-B", out, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                f"-DGGML_NATIVE={'ON' if native else 'OFF'}", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF"])
    _run(pre + ["cmake", "--build", out, "-j", str(jobs), "--target", *TOOLS])
    b = bin_dir(version)
    if b is None:
        raise RuntimeError(f"the build finished but {out / 'bin'} lacks one of {TOOLS}")
    return b


# ------------------------------------------------------------------------------ running the tools
MEDIA = "<__media__>"  # mtmd's default image marker


def tool(name: str, version: str = VERSION) -> str:
    b = bin_dir(version)
    if b is None:
        raise FileNotFoundError(f"no llama.cpp build under {cache_dir(version)}: python -m llava_jax.tools.llamacpp")
    return str(b / name)


def mtmd_generate(llm, mmproj, image, prompt: str, n: int, *, threads: int = 2, extra=(), timeout: int = 600):
    """Greedy generation with llama-mtmd-cli (one user turn through the GGUF's chat template);
    returns (the generated text as the tool prints it, the tool's log)."""
    cmd = [tool("llama-mtmd-cli"), "-m", llm, "--mmproj", mmproj, "--image", image, "-p", prompt, "-n", str(n),
           "--temp", "0", "--seed", "0", "-t", str(threads), "--no-warmup", *extra]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-3000:]}")
    return p.stdout.decode("utf-8", errors="replace"), p.stderr.decode("utf-8", errors="replace")


def tokenize(llm, text: str, bos: bool) -> list[int]:
    """llama.cpp's ids for `text` (special tokens parsed, as mtmd tokenizes prompt text)."""
    import ast
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)
    try:
        cmd = [tool("llama-tokenize"), "-m", str(llm), "-f", f.name, "--ids", "--log-disable", "--no-escape"]
        out = subprocess.run(cmd + ([] if bos else ["--no-bos"]), capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return list(ast.literal_eval(out.strip().splitlines()[-1]))


def run_debug_encode(llm, mmproj, image: str, size: int, *, threads: int = 2, timeout: int = 600):
    """llama-mtmd-debug's encode pass on one of its synthetic inputs (`image`: "rainbow", "cb", ...,
    fed as pixel values, no preprocessing) of `size` x `size`; returns (stdout, stderr)."""
    cmd = [tool("llama-mtmd-debug"), "-m", llm, "--mmproj", mmproj, "--image", image, "-n", str(size), "-p",
           "encode", "-t", str(threads), "--no-warmup"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama-mtmd-debug failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout, p.stdout + p.stderr


def rainbow(size: int):
    """llama-mtmd-debug's "rainbow" input as an [H, W, 3] float32 array (its formula, in numpy)."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = np.float32(size / 2.0)
    dx, dy = x - c, y - c
    hue = np.arctan2(dy, dx) / np.float32(2 * 3.14159265)
    hue = np.where(hue < 0, hue + 1, hue)
    sat = np.minimum(np.sqrt(dx * dx + dy * dy) / np.sqrt(c * c + c * c), 1.0)
    h6 = hue * 6
    i6 = h6.astype(np.int32)
    f = h6 - i6
    p, q, t, one = 1 - sat, 1 - sat * f, 1 - sat * (1 - f), np.ones_like(sat)
    table = [(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]
    out = np.zeros((size, size, 3), np.float32)
    for k, rgb in enumerate(table):
        m = (i6 % 6) == k
        for ch in range(3):
            out[..., ch] = np.where(m, rgb[ch], out[..., ch])
    return out


def debug_tensors(log: str) -> list[dict]:
    """The tensors llama-mtmd-debug prints (`common_debug_cb_eval`): [{name, ne, rows, sum}], rows
    being the printed values per row (the first and last 3 of a long row, `None` between)."""
    import re

    out, cur = [], None
    for line in log.splitlines():
        m = re.match(r"common_debug_cb_eval:\s+(\S+) = \((\w+)\) .* = \{([\d, ]+)\}\s*$", line)
        if m:
            cur = {"name": m.group(1), "type": m.group(2), "ne": [int(x) for x in m.group(3).split(",")],
                   "rows": [], "sum": None}
            out.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("sum ="):
            cur["sum"] = float(s.split("=")[1])
            cur = None
        elif s.startswith("[") and s.endswith("],") and len(s) > 3:
            cur["rows"].append([None if v.strip() == "..." else float(v) for v in s[1:-2].split(",") if v.strip()])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version (vendors llama.cpp)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-native", action="store_true", help="portable build (no -march=native)")
    p.add_argument("--print", action="store_true", help="print the bin folder of an existing build; exit 1 if none")
    a = p.parse_args(argv)
    if a.print:
        b = bin_dir(a.version)
        print(b if b else f"no build under {cache_dir(a.version)}")
        sys.exit(0 if b else 1)
    b = bin_dir(a.version) or build(a.version, a.jobs, not a.no_native)
    print(f"llama.cpp {commit(a.version) or '?'} (llama-cpp-python {a.version}): {b}")


if __name__ == "__main__":
    main()
