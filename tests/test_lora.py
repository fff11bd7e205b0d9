"""LoRA on the LLM against PEFT itself: a fresh adapter changes nothing; an adapter llava-jax
writes loads with `peft.PeftModel.from_pretrained` onto transformers' LLaVA with equal logits; an
adapter PEFT writes loads into llava-jax with equal logits; `merge` equals PEFT's
`merge_and_unload()` weight for weight. fp32 throughout; logits compared at real tokens,
max |diff| <= 1e-5 x max |logit| (RTOL), merged weights within 1e-6."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import llava_jax  # noqa: E402
from hf_util import make_batch, make_hf_llava, original_lora_dir, torch_logits  # noqa: E402
from llava_jax.convert import peft as lpeft  # noqa: E402
from llava_jax.convert.hf import CheckpointError, hf_tensors  # noqa: E402
from llava_jax.models.lora import LoraConfig  # noqa: E402
from llava_jax.models.params import path_str  # noqa: E402

RTOL = 1e-5
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def _rel_diff(ours, ref, mask):
    m = mask.astype(bool)
    print(f"max|diff| {np.abs(ours[m] - ref[m]).max():.3g} max|logit| {np.abs(ref[m]).max():.3g}")
    return float(np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max())


def _ours(model, hf):
    ids, mask, px = make_batch(hf)
    return np.asarray(model(ids, pixel_values=px, attention_mask=mask)), mask


def _randomize(model, seed):
    """Adapters that do something (a fresh B is zero)."""
    key = jax.random.key(seed)
    for name, var in sorted(nnx.state(model.llm.layers.lora, nnx.Param).items()):
        key, k = jax.random.split(key)
        getattr(model.llm.layers.lora, name).value = 0.2 * jax.random.normal(k, var.value.shape, var.value.dtype)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_llava("gqa_linear_rope_bias_full", seed=2).save_pretrained(d)  # GQA + biases: every layout case
    return d


def _hf():
    return make_hf_llava("gqa_linear_rope_bias_full", seed=2)


def test_fresh_adapter_is_a_no_op_and_leaves_the_base_alone(hf_dir):
    base = llava_jax.from_pretrained(hf_dir)
    ref, mask = _ours(base, _hf())
    model = lpeft.add_lora(llava_jax.from_pretrained(hf_dir), LoraConfig(rank=4, alpha=8))
    out, _ = _ours(model, _hf())
    assert np.array_equal(out, ref)
    a = np.asarray(model.llm.layers.lora.q_a.value)
    assert np.abs(a).max() <= 1 / np.sqrt(a.shape[1]) and a.std() > 0  # kaiming-uniform bound
    assert not np.asarray(model.llm.layers.lora.q_b.value).any()
    paths = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {f"llm/layers/lora/{n}_{ab}" for n in HF_NAMES for ab in "ab"} <= paths


@pytest.mark.parametrize("lora", [LoraConfig(rank=4, alpha=8),
                                  LoraConfig(rank=3, alpha=5, rslora=True, targets=(r"llm/layers/(q|v|down)_kernel",))],
                         ids=["all_linear", "rslora_qv_down"])
def test_saved_adapter_loads_in_peft_with_equal_logits(hf_dir, tmp_path, lora):
    model = _randomize(lpeft.add_lora(llava_jax.from_pretrained(hf_dir), lora), seed=1)
    ours, mask = _ours(model, _hf())
    lpeft.save_adapter(model, tmp_path / "adapter")
    hf = _hf()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    adapted = {n.split(".")[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert adapted == {HF_NAMES[n] for n in lora.modules}  # the language model's projections only
    assert not any("vision_tower" in n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert pm.peft_config["default"].use_rslora == lora.rslora
    ids, mask, px = make_batch(hf)
    ref = torch_logits(pm, ids, mask, px)
    plain = torch_logits(_hf(), ids, mask, px)
    assert _rel_diff(plain, ref, mask) > 1e-2  # the adapter matters
    assert _rel_diff(ours, ref, mask) <= RTOL


def _peft_adapter(out, seed, **kw):
    """An adapter written by PEFT itself, B random (init_lora_weights=False)."""
    hf = _hf()
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **kw)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(out)
    return pm


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
    # layer 1 only (PEFT refuses layers_to_transform beside a regex; names alone would also catch
    # the CLIP tower's q/v projections)
    dict(r=2, lora_alpha=3, use_rslora=True,
         target_modules=r".*language_model.*\.layers\.1\.(self_attn\.(q_proj|v_proj)|mlp\.up_proj)"),
], ids=["all_linear", "rslora_one_layer"])
def test_peft_adapter_loads_into_llava_jax_with_equal_logits(hf_dir, tmp_path, kw):
    pm = _peft_adapter(tmp_path / "adapter", seed=3, **kw)
    ids, mask, px = make_batch(pm)
    ref = torch_logits(pm, ids, mask, px)
    model = lpeft.load_adapter(llava_jax.from_pretrained(hf_dir), tmp_path / "adapter")
    assert model.config.lora.rank == kw["r"] and model.config.lora.rslora == kw.get("use_rslora", False)
    ours, _ = _ours(model, pm)
    assert _rel_diff(ours, ref, mask) <= RTOL
    if kw["r"] == 2:  # the layer PEFT left out carries zero adapters
        assert not np.asarray(model.llm.layers.lora.q_a.value[0]).any()
        assert np.asarray(model.llm.layers.lora.q_a.value[1]).any()


def test_merge_equals_peft_merge_and_unload(hf_dir, tmp_path):
    pm = _peft_adapter(tmp_path / "adapter", seed=4, r=4, lora_alpha=8, use_rslora=True,
                       target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    merged_hf = pm.merge_and_unload()
    merged_hf.save_pretrained(tmp_path / "hf_merged")
    model = lpeft.load_adapter(llava_jax.from_pretrained(hf_dir), tmp_path / "adapter")
    adapted, _ = _ours(model, merged_hf)
    # the export writes the model merged, the model itself is untouched
    llava_jax.save_pretrained(model, tmp_path / "ours_merged")
    assert model.config.lora is not None
    ours = dict(hf_tensors(lpeft.merge(model)))
    ref = dict(hf_tensors(llava_jax.from_pretrained(tmp_path / "hf_merged")))
    exported = dict(hf_tensors(llava_jax.from_pretrained(tmp_path / "ours_merged")))
    assert model.config.lora is None and model.llm.layers.lora is None
    assert set(ours) == set(ref) == set(exported)
    worst = max(float(np.abs(ours[k] - ref[k]).max()) for k in ref)
    print("merged weights max|diff|", worst)
    assert worst <= 1e-6, worst
    assert max(float(np.abs(exported[k] - ref[k]).max()) for k in ref) <= 1e-6
    # the merged model computes what the adapted one did
    after, mask = _ours(model, merged_hf)
    assert _rel_diff(after, adapted, mask) <= RTOL


def test_export_cli_merges_an_adapter_into_a_base_as_peft_merge_and_unload(hf_dir, tmp_path):
    """`python -m llava_jax.export --format hf --model BASE --adapter DIR --out OUT` writes the
    llava-hf directory PEFT's `merge_and_unload()` gives: transformers loads it with the same
    tensors (<= 1e-6 each). `--nomerge` is refused there, in one error line."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlavaForConditionalGeneration

    pm = _peft_adapter(tmp_path / "adapter", seed=8, r=4, lora_alpha=8,
                       target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    ref = pm.merge_and_unload().state_dict()
    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "llava_jax.export", "--format", "hf", "--model", str(hf_dir),
            "--adapter", str(tmp_path / "adapter")]
    p = subprocess.run(base + ["--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=repo, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(merged)" in p.stdout
    got = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    assert set(got) == set(ref)
    worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    print("export --adapter vs merge_and_unload, max|diff|", worst)
    assert worst <= 1e-6, worst
    p = subprocess.run(base + ["--nomerge", "--out", str(tmp_path / "out2")], capture_output=True, text=True,
                       cwd=repo, env=env, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --nomerge: --format=hf has no place")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("weights", ["adapter_model.bin", "adapter_model.safetensors"])
def test_adapter_of_the_original_llava_lora_script_loads_with_its_projector(tmp_path, weights):
    """A LoRA run of haotian-liu/LLaVA's train.py writes PEFT's keys on its LlavaLlamaForCausalLM
    (`base_model.model.model.layers.N...`; `adapter_model.bin` with the PEFT of its day) and the
    projector it trained, `named_parameters()` keys with requires_grad, to `non_lora_trainables.bin`
    (torch.save). Written so from a PEFT adapter, it computes what transformers + PEFT do with the
    trained projector, and the projector's weights are the file's."""
    name = "mha_default_rope"  # a projector with biases, as the original's mm_projector
    make_hf_llava(name, seed=6).save_pretrained(tmp_path / "base")
    hf = make_hf_llava(name, seed=6)
    torch.manual_seed(7)
    with torch.no_grad():  # the projector the LoRA run trained
        for p in hf.model.multi_modal_projector.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained = {k: v.detach().clone() for k, v in hf.model.multi_modal_projector.state_dict().items()}
    pm = peft.get_peft_model(hf, peft.LoraConfig(
        init_lora_weights=False, r=4, lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids, mask, px = make_batch(pm)
    ref = torch_logits(pm, ids, mask, px)
    d = original_lora_dir(tmp_path / "peft", tmp_path / "llava-v1.5-7b-lora", trained, weights)
    assert sorted(torch.load(d / "non_lora_trainables.bin")) == [
        f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]

    model = lpeft.load_adapter(llava_jax.from_pretrained(tmp_path / "base"), d)
    assert model.config.lora.rank == 4 and model.config.lora.modules == tuple(HF_NAMES)
    got = dict(hf_tensors(model, select=lambda p: p.startswith("projector/")))
    assert set(got) == {f"multi_modal_projector.{k}" for k in trained}
    for k, v in trained.items():
        np.testing.assert_array_equal(got[f"multi_modal_projector.{k}"], v.numpy(), err_msg=k)
    ours, _ = _ours(model, pm)
    assert _rel_diff(ours, ref, mask) <= RTOL
    # without the projector file: the base's projector, another model
    (d / "non_lora_trainables.bin").unlink()
    other, _ = _ours(lpeft.load_adapter(llava_jax.from_pretrained(tmp_path / "base"), d), pm)
    assert _rel_diff(other, ref, mask) > 1e-3


def test_unsupported_peft_settings_are_named(hf_dir, tmp_path):
    _peft_adapter(tmp_path / "a", seed=5, r=2, lora_alpha=4, target_modules=r".*vision_tower.*\.q_proj")
    with pytest.raises(CheckpointError, match="vision_tower"):
        lpeft.load_adapter(llava_jax.from_pretrained(hf_dir), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        lpeft.load_adapter(llava_jax.from_pretrained(hf_dir), tmp_path / "a")


def test_adapters_shard_like_their_kernels():
    from llava_jax import sharding as shd
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.models.llava import LlavaModel

    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                          image_size=16, patch_size=8),
                      text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=8),
                      image_token_id=63, lora=LoraConfig(rank=4, alpha=8))
    mesh = shd.make_mesh((2, 2, 2))
    _, state = shd.abstract_model(lambda: LlavaModel(cfg, rngs=None), mesh)
    spec = {path_str(p): v.value.sharding.spec for p, v in nnx.to_flat_state(state)}
    assert spec["llm/layers/lora/q_a"] == jax.sharding.PartitionSpec(None, "fsdp", None)
    # the rank (4) over fsdp (2) where no embed axis took fsdp already (`lora_rank` in the rules)
    assert spec["llm/layers/lora/q_b"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert spec["llm/layers/lora/down_a"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert spec["llm/layers/lora/down_b"] == jax.sharding.PartitionSpec(None, "fsdp", None)
    # a sharded model gets its adapters in those shardings, and runs
    graphdef, abstract = shd.abstract_model(lambda: LlavaModel(cfg.replace(lora=None), rngs=None), mesh)
    state = jax.device_put(nnx.state(LlavaModel(cfg.replace(lora=None), rngs=None)),  # zeros: quick
                           jax.tree.map(lambda x: x.sharding, abstract))
    model = lpeft.add_lora(nnx.merge(graphdef, state), cfg.lora)
    assert model.llm.layers.lora.q_a.value.sharding.spec == spec["llm/layers/lora/q_a"]
    kernel_sharding = model.llm.layers.q_kernel.value.sharding
    assert lpeft.merge(model).llm.layers.q_kernel.value.sharding == kernel_sharding
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.ones((2, 5), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()
