"""lmms-eval plugin (`llava_jax.eval.lmms`), proven with lmms-eval itself: its entry-point
registry finds `llava_jax` in this checkout's package metadata (setup.py egg_info), the real
`lmms-eval` CLI runs the demo's held-out questions as local tasks (`llava_jax.demo.lmms_task`),
and its scores equal the shapes world's own scorer on the same answers, which are the answers
`llava_jax.eval.answer` gives. Loglikelihoods are checked against transformers' Llava.

lmms-eval is optional (`pip install -e ".[lmms]"`, see docs/eval.md); these tests skip with the
reason when it cannot run here. lmms-eval 0.7.3 needs filelock < 4 (it imports filelock._api);
an environment that keeps filelock 4 can put a filelock 3 folder in front for the CLI only:
`pip install --target DIR "filelock<4"` and `LLAVA_JAX_LMMS_SITE=DIR`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shapes_model import make_shapes_model

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional: pip install -e '.[lmms]')")


def _env(egg: Path) -> dict:
    site = [os.environ["LLAVA_JAX_LMMS_SITE"]] if os.environ.get("LLAVA_JAX_LMMS_SITE") else []
    path = os.pathsep.join(site + [str(egg), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**os.environ, "PYTHONPATH": path, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny random model + 5 images' questions, the task folder, and this checkout's package
    metadata (with its lmms_eval.models entry point) in a folder for PYTHONPATH."""
    root = tmp_path_factory.mktemp("lmms")
    questions, _ = make_shapes_model(root, num_eval=5)
    from llava_jax.demo.lmms_task import write_tasks

    write_tasks(root / "data", root / "tasks", max_new_tokens=6)
    egg = root / "egg"
    egg.mkdir()
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg)], cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"setup.py egg_info failed: {r.stderr[-500:]}")
    return root, questions, egg


def test_entry_point_registers_the_model(shapes):
    root, _, egg = shapes
    code = ("from lmms_eval.models import get_model, get_model_manifest\n"
            "m = get_model_manifest('llava_jax'); c = get_model('llava_jax')\n"
            "print(m.simple_class_path, c.__module__, c.__name__, c.is_simple)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(egg), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-4:] == ["llava_jax.eval.lmms.LlavaJax", "llava_jax.eval.lmms", "LlavaJax", "True"]


def test_loglikelihood_equals_transformers(shapes):
    """The plugin's (mean NLL, is_greedy) of a continuation = transformers' LlavaForConditionalGeneration
    on the same ids (the prompt our template renders, the image, the reply tokens)."""
    torch = pytest.importorskip("torch")
    from lmms_eval.api.instance import Instance
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from llava_jax.eval.lmms import LlavaJax, _messages
    from llava_jax.models.pixels import normalize

    root, questions, _ = shapes
    lm = LlavaJax(pretrained=str(root / "hf"), batch_size=2)
    q = questions[0]
    img = Image.open(root / "data" / "images" / q["image"]).convert("RGB")
    lm.task_dict = {"t": {"test": [{"img": img}]}}
    reqs = [Instance("loglikelihood", (q["text"], c, lambda d: [d["img"]], 0, "t", "test"), idx=i,
                     metadata={"task": "t", "doc_id": 0, "repeats": 1})
            for i, c in enumerate(q["choices"])]
    got = [r.text if hasattr(r, "text") else r for r in lm.loglikelihood(reqs)]

    ref = LlavaForConditionalGeneration.from_pretrained(root / "hf", dtype=torch.float32).eval()
    for c, (nll, greedy) in zip(q["choices"], got):
        prompt, full, start, cont = lm._continuation_ids(_messages(q["text"], [img]), c)
        assert cont and full[start:start + len(cont)] == cont
        pix = torch.from_numpy(np.ascontiguousarray(np.transpose(normalize(prompt.images), (0, 3, 1, 2))))
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([full]), pixel_values=pix).logits[0].float()
        logp = torch.log_softmax(logits, -1)[np.arange(start, start + len(cont)) - 1]
        want = -float(logp[torch.arange(len(cont)), torch.tensor(cont)].mean())
        assert nll == pytest.approx(want, abs=2e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.slow  # the lmms-eval CLI: about 35 s on 2 cores, + the answer CLI
def test_lmms_eval_cli_scores_equal_ours(shapes, tmp_path):
    from llava_jax.demo.scoring import score_answer
    from llava_jax.eval import answer as answer_cli

    root, questions, egg = shapes
    env = _env(egg)
    probe = subprocess.run([sys.executable, "-c", "import lmms_eval.evaluator, filelock._api, pytablewriter"], env=env,
                           capture_output=True, text=True, timeout=300)
    if probe.returncode:
        pytest.skip("lmms-eval cannot run in this environment: " + probe.stderr.strip().splitlines()[-1])
    out = tmp_path / "lmms_out"
    cli = "import sys; from lmms_eval.cli.dispatch import main; sys.argv[0] = 'lmms-eval'; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", cli, "--model", "llava_jax", "--model_args",
                        f"pretrained={root / 'hf'}", "--tasks", "shapes_qa,shapes_choice", "--include_path",
                        str(root / "tasks"), "--batch_size", "8", "--output_path", str(out), "--log_samples"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())["results"]

    def samples(task):
        (f,) = out.glob(f"*/*_samples_{task}.jsonl")
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        return sorted(rows, key=lambda s: s["doc_id"])

    # free answers: lmms-eval's are those of our answer CLI (same batch size), and its score is ours
    ours = answer_cli.main(["--model", str(root / "hf"), "--questions", str(root / "data" / "eval.jsonl"),
                            "--image_folder", str(root / "data" / "images"), "--out", str(tmp_path / "a.jsonl"),
                            "--max_new_tokens", "6", "--batch_size", "8"])
    qa = samples("shapes_qa")
    assert len(qa) == len(questions) == len(ours)
    assert [s["filtered_resps"].strip() for s in qa] == [a["text"] for a in ours]
    our_acc = np.mean([score_answer(q["category"], a["text"], q["answer"]) for q, a in zip(questions, ours)])
    assert results["shapes_qa"]["shapes_acc,none"] == pytest.approx(our_acc, abs=1e-12)

    # multiple choice: lmms-eval's acc = our scorer on the choice with the lowest loss it logged
    mc = samples("shapes_choice")
    chosen = [q["choices"][int(np.argmin([float(v[0]) for v in s["filtered_resps"]]))] for q, s in zip(questions, mc)]
    mc_acc = np.mean([score_answer(q["category"], c, q["answer"]) for q, c in zip(questions, chosen)])
    assert results["shapes_choice"]["acc,none"] == pytest.approx(mc_acc, abs=1e-12)
    assert 0 < mc_acc < 1 and 0 < our_acc  # a random model: some right (e.g. counts of 1), not all


@pytest.mark.slow  # the lmms-eval CLI against a running server: 1.5-7 min on 2 cores (idle-busy)
def test_openai_compatible_against_our_server_scores_equal_ours(shapes, tmp_path):
    """docs/eval.md's alternative without the plugin: lmms-eval's own `openai_compatible` model (the
    official `openai` client inside lmms-eval) sends each question to `llava_jax.serve`; its answers
    are the answer CLI's, and its score is ours."""
    from serve_util import serving

    from llava_jax.demo.scoring import score_answer
    from llava_jax.eval import answer as answer_cli
    from llava_jax.serve.generator import ChatGenerator
    from llava_jax.serve.server import Limits

    root, questions, egg = shapes
    env = _env(egg)
    probe = subprocess.run([sys.executable, "-c", "import lmms_eval.evaluator, lmms_eval.models.simple.openai, "
                            "filelock._api, pytablewriter"], env=env, capture_output=True, text=True, timeout=300)
    if probe.returncode:
        pytest.skip("lmms-eval cannot run in this environment: " + probe.stderr.strip().splitlines()[-1])
    gen = ChatGenerator.from_pretrained(root / "hf", dtype="float32")
    out = tmp_path / "lmms_out"
    cli = "import sys; from lmms_eval.cli.dispatch import main; sys.argv[0] = 'lmms-eval'; sys.exit(main())"
    with serving(gen, limits=Limits(max_tokens=16, default_max_tokens=8)) as srv:
        host, port = srv.server_address[:2]
        r = subprocess.run([sys.executable, "-c", cli, "--model", "openai_compatible", "--model_args",
                            "model_version=hf,max_retries=1,num_concurrent=4", "--tasks", "shapes_qa",
                            "--include_path", str(root / "tasks"), "--output_path", str(out), "--log_samples"],
                           env={**env, "OPENAI_API_KEY": "EMPTY", "OPENAI_API_BASE": f"http://{host}:{port}/v1"},
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())["results"]
    (f,) = out.glob("*/*_samples_shapes_qa.jsonl")
    qa = sorted((json.loads(x) for x in f.read_text().splitlines() if x.strip()), key=lambda s: s["doc_id"])

    ours = answer_cli.main(["--model", str(root / "hf"), "--questions", str(root / "data" / "eval.jsonl"),
                            "--image_folder", str(root / "data" / "images"), "--out", str(tmp_path / "a.jsonl"),
                            "--max_new_tokens", "6", "--dtype", "float32"])
    assert len(qa) == len(questions) == len(ours)
    got = [s["filtered_resps"] for s in qa]
    got = [g[0] if isinstance(g, list) else g for g in got]
    assert not any("LMMS_EVAL_REQUEST_FAILED" in g for g in got), got
    assert [g.strip() for g in got] == [a["text"] for a in ours]
    our_acc = np.mean([score_answer(q["category"], a["text"], q["answer"]) for q, a in zip(questions, ours)])
    assert results["shapes_qa"]["shapes_acc,none"] == pytest.approx(our_acc, abs=1e-12)
    assert 0 < our_acc
