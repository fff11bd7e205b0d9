"""The GGUF export run by llama.cpp itself (slow): a tiny random llava-hf model exported with
`export_checkpoint`, loaded by llama.cpp's own multimodal tools, compared with llava-jax on the same
prompts and images. Needs the cached llama.cpp build (`python -m llava_jax.tools.llamacpp`, at
`$LLAVA_JAX_LLAMACPP` or ~/.cache/llava_jax/llama.cpp/<version>); skips without it, never builds.

* Image embedding (f16 mmproj): `llama-mtmd-debug -p encode --image rainbow -n 16` runs the tower +
  projector on a synthetic 16x16 input fed as pixel values (no preprocessing) and prints the
  projected features (the first and last 3 values of each of the 4 rows, and the sum over all);
  llava-jax's `encode_images` on the same pixel values must agree within 2% of the largest
  magnitude (f16 weights and f16 matmul inputs in ggml, GELU's tanh form in its projector).
* Greedy tokens: llama-mtmd-cli with the PNG (16x16: the tower's resolution, so neither side
  resamples, pads or crops; both only normalise with CLIP's mean/std) and "<__media__>\\n" + the
  question through the GGUF's chat template (vicuna_v1, written by the exporter). The prompt ids
  llama.cpp builds (its tokenizer on the template's text around the image) must equal
  llava-jax's, and for f16 the greedy continuation must equal llava-jax's (float32) byte for
  byte: llama-mtmd-cli prints the pieces of the tokens it samples; they are compared with the
  pieces of llava-jax's token ids. For q8_0 / q4_0 the agreement is measured as the share of
  llava-jax's tokens reproduced before the first difference.

The model's tokenizer is built with `legacy=True`: after an image, llama.cpp tokenizes the rest
of the prompt as a new SentencePiece text (a leading "▁"), as the original LLaVA's
`tokenizer_image_token` did; a `legacy=False` fast tokenizer continues without it, so its prompts
differ from llama.cpp's by that one token (docs/export.md).
"""
import numpy as np
import pytest

from llava_jax.tools import llamacpp
from shapes_model import make_shapes_model

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e '.[gguf]')")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    llamacpp.bin_dir() is None, reason=f"no llama.cpp build under {llamacpp.cache_dir()} (build it with "
    "`python -m llava_jax.tools.llamacpp`; tests never download)")]

N_NEW = 24
QUANTS = ("f16", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llava_jax.convert.gguf_export import export_checkpoint
    from llava_jax.serve.generator import ChatGenerator

    root = tmp_path_factory.mktemp("llamacpp")
    questions, _ = make_shapes_model(root, num_eval=4, legacy=True)
    files = {q: export_checkpoint(str(root / "gguf"), model_dir=str(root / "hf"), quant=q) for q in QUANTS}
    gen = ChatGenerator.from_pretrained(root / "hf", template="vicuna_v1")
    return root, questions, files, gen


def _jax_greedy(gen, image_path, text):
    from llava_jax.data.images import load_image
    from llava_jax.serve.engine import SamplingParams

    enc = gen.encode([{"role": "user", "content": [{"type": "image", "image": load_image(image_path)},
                                                   {"type": "text", "text": text}]}])
    toks = gen.engine.generate([enc.ids], images=[enc.images], params=SamplingParams(max_new_tokens=N_NEW),
                               eos_ids=gen.eos_ids)[0]
    return enc, [int(t) for t in toks]


def _piece_bytes(tokenizer, i: int) -> bytes:
    """A token's bytes as llama.cpp prints a SentencePiece token: "▁" -> space, <0xNN> -> the byte."""
    p = tokenizer.convert_ids_to_tokens(i)
    if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
        return bytes([int(p[3:5], 16)])
    return p.replace("\u2581", " ").encode()


def _agreed(tokenizer, toks, printed: bytes) -> int:
    """How many of llava-jax's tokens llama.cpp's printed text reproduces before they differ."""
    pos = 0
    for k, t in enumerate(toks):
        b = _piece_bytes(tokenizer, t)
        if printed[pos:pos + len(b)] != b:
            return k
        pos += len(b)
    return len(toks)


def _generated(stdout: str) -> bytes:
    return stdout.rstrip("\n").encode()


def test_image_embedding_f16(setup):
    import jax.numpy as jnp

    root, _, files, gen = setup
    _, log = llamacpp.run_debug_encode(files["f16"]["llm"], files["f16"]["mmproj"], "rainbow", 16)
    cfg = gen.model.config
    n_tok, dim = cfg.num_image_tokens, cfg.text.hidden_size
    out = [t for t in llamacpp.debug_tensors(log) if t["ne"][:2] == [dim, n_tok]]
    assert out, "llama-mtmd-debug printed no [hidden, tokens] tensor"
    got = out[-1]  # the projector's last op
    ref = np.asarray(gen.model.encode_images(jnp.asarray(llamacpp.rainbow(16)[None])))[0]  # [tokens, dim]
    assert len(got["rows"]) == n_tok
    tol = 0.02 * np.abs(ref).max()
    for r, row in enumerate(got["rows"]):
        cols = list(range(3)) + list(range(dim - 3, dim))
        vals = [v for v in row if v is not None]
        np.testing.assert_allclose(vals, ref[r, cols], atol=tol, err_msg=f"row {r}")
    assert abs(got["sum"] - ref.sum()) <= tol * np.sqrt(ref.size)
    print(f"\nimage embedding: max |llama.cpp - llava-jax| over the printed values "
          f"{max(abs(v - ref[r, c]) for r, row in enumerate(got['rows']) for c, v in zip(cols, [v for v in row if v is not None])):.4f}"
          f", max |ref| {np.abs(ref).max():.3f}, sum {got['sum']:.4f} vs {ref.sum():.4f}")


def test_prompt_ids_and_greedy_tokens(setup):
    import jinja2

    root, questions, files, gen = setup
    tok = gen.tokenizer
    r = gguf.GGUFReader(str(files["f16"]["llm"]))
    tpl = jinja2.Environment().from_string(r.fields["tokenizer.chat_template"].contents())
    n_img = gen.model.config.num_image_tokens
    rates = {q: [0, 0] for q in QUANTS}
    for q in questions:
        image = root / "data" / "images" / q["image"]
        enc, toks = _jax_greedy(gen, image, q["text"])
        prompt = llamacpp.MEDIA + "\n" + q["text"]
        text = tpl.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert text.replace(llamacpp.MEDIA, "<image>") == enc.text
        before, after = text.split(llamacpp.MEDIA)
        cpp_ids = (llamacpp.tokenize(files["f16"]["llm"], before, bos=True) + [gen.model.config.image_token_id] * n_img
                   + llamacpp.tokenize(files["f16"]["llm"], after, bos=False))
        assert cpp_ids == enc.ids, (tok.convert_ids_to_tokens(cpp_ids), tok.convert_ids_to_tokens(enc.ids))
        for quant in QUANTS:
            out, _ = llamacpp.mtmd_generate(files[quant]["llm"], files[quant]["mmproj"], image, prompt, N_NEW)
            printed = _generated(out)
            k = _agreed(tok, toks, printed)
            rates[quant][0] += k
            rates[quant][1] += len(toks)
            if quant == "f16":
                want = b"".join(_piece_bytes(tok, t) for t in toks)
                assert printed == want, (q["text"], printed, want)
    summary = ", ".join(f"{k} {a}/{n} ({a / n:.0%})" for k, (a, n) in rates.items())
    print(f"\ngreedy tokens reproduced by llama.cpp before the first difference: {summary}")
    assert rates["f16"][0] == rates["f16"][1]
