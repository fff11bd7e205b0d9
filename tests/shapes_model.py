"""A shapes-world eval set and a tiny random llava-hf model whose tokenizer knows its words
(built offline, about 10 s): shared by the evaluation end-to-end tests."""
from pathlib import Path

from llava_jax.demo import dataset
from llava_jax.eval.report import read_jsonl


def make_shapes_model(root: Path, num_eval: int = 5, seed: int = 3, legacy: bool = False):
    """-> (questions, annotations); writes root/data (eval.jsonl, images/) and root/hf."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import llava_jax
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.data.tokenize import add_llava_special_tokens, load_tokenizer
    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM
    from llava_jax.models.llava import LlavaModel

    dataset.generate(root / "data", num_train=0, num_eval=num_eval, seed=seed, image_size=16)
    questions = read_jsonl(root / "data" / "eval.jsonl")
    anns = read_jsonl(root / "data" / "eval_annotations.jsonl")
    texts = [SYSTEM + " USER: ASSISTANT:"] * 20 + [q["text"] + " " + q["answer"] for q in questions]
    texts += [c for a in anns for c in a["captions"]]
    build_llama_tokenizer(texts, root / "tok", vocab_size=320, legacy=legacy)
    tok = load_tokenizer(root / "tok")
    ids = add_llava_special_tokens(tok)
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=16,
                            patch_size=8),
        text=TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=512),
        image_token_id=ids.image_token_id, vision_feature_layer=-1)
    # random params from numpy: an eager/jitted init compiles one random op per shape (~20 s on CPU)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape).astype(s.dtype)), abstract)
    llava_jax.save_pretrained(nnx.merge(graphdef, state), root / "hf", tokenizer=tok)
    return questions, anns
