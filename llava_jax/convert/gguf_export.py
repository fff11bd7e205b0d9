"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's writer):

* `<name>-<quant>.gguf`: the LLM, arch `llama`, in the layout llama.cpp's `convert_hf_to_gguf.py`
  writes for a LLaMA model: `token_embd`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,
  ffn_norm,ffn_gate,ffn_up,ffn_down}`, `output_norm`, `output` (names from gguf's own
  `TensorNameMap`), Q and K rows permuted from HF's rotate-half order to GGML's interleaved
  RoPE order as that converter does, the tokenizer as a `llama` (SentencePiece-style) vocabulary.
* `mmproj-<name>-f16.gguf`: the CLIP tower + projector, arch `clip`, in the layout of llama.cpp's
  LLaVA-1.5 path (`llava_surgery.py` + `convert_image_encoder_to_gguf.py`): the `clip.*` keys
  (`has_llava_projector`, `projector_type` mlp, `clip.vision.*` geometry, `feature_layer`,
  image mean/std, `use_gelu`), tensors `v.class_embd`, `v.patch_embd.weight`,
  `v.position_embd.weight`, `v.pre_ln`, `v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,
  ffn_down,ffn_up}` (that converter names CLIP's fc1 `ffn_down` and fc2 `ffn_up`; llama.cpp reads
  it so), `mm.0` / `mm.2` for the projector's two linears; the unused `post_layernorm` is left out.
  1-D tensors stay f32 and the patch convolution f16, as there.
* `Modelfile`: `FROM` both files, the vicuna_v1 prompt template and the stop string, for
  `ollama create NAME -f Modelfile`.

Quantization (LLM only; the mmproj stays f16): `f16`, `q8_0` and `q4_0` are written here
(gguf's numpy quantizers); `q4_K_M` has no Python quantizer, so the f16 file is handed to
llama.cpp's `llama-quantize` (found on PATH or through `$LLAMA_CPP_BIN`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np

from llava_jax.data.templates import chat_template_jinja

QUANTS = ("f16", "q8_0", "q4_0", "q4_K_M")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("GGUF export needs the gguf package: pip install -e '.[gguf]'") from e
    return gguf


# ------------------------------------------------------------------------------ names
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> GGML's interleaved RoPE rows (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llm_tensors(hf: dict[str, np.ndarray], cfg) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) of the LLM, from canonical llava-hf keys."""
    gguf = _gguf()
    t = cfg.text
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, t.num_layers)
    for key, arr in hf.items():
        if not key.startswith("language_model."):
            continue
        hf_key = key[len("language_model."):]
        if hf_key.endswith("self_attn.q_proj.weight"):
            arr = _permute(arr, t.num_heads)
        elif hf_key.endswith("self_attn.k_proj.weight"):
            arr = _permute(arr, t.num_kv_heads)
        name = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for LLM tensor {hf_key!r}")
        yield name, arr


_CLIP_RULES = [  # llava-hf key (after vision_tower.vision_model.) -> llama.cpp's LLaVA mmproj name
    (r"embeddings\.class_embedding", "v.class_embd"),
    (r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"pre_layrnorm\.(weight|bias)", r"v.pre_ln.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"v.blk.\1.attn_q.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"v.blk.\1.attn_k.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"v.blk.\1.attn_v.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"v.blk.\1.ln1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"v.blk.\1.ln2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
]


def mmproj_tensors(hf: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for key, arr in hf.items():
        if key.startswith("multi_modal_projector."):
            m = re.fullmatch(r"multi_modal_projector\.linear_(\d+)\.(weight|bias)", key)
            if not m:
                raise KeyError(f"no GGUF name for projector tensor {key!r}")
            # LLaVA's nn.Sequential indices: linear_1 -> 0, linear_2 -> 2 (GELU at 1), ...
            yield f"mm.{2 * (int(m.group(1)) - 1)}.{m.group(2)}", arr
        elif key.startswith("vision_tower.vision_model."):
            sub = key[len("vision_tower.vision_model."):]
            if sub.startswith("post_layernorm."):
                continue  # not used for LLaVA features; llama.cpp's converter drops it too
            for pat, repl in _CLIP_RULES:
                if re.fullmatch(pat, sub):
                    yield re.sub(pat, repl, sub), arr
                    break
            else:
                raise KeyError(f"no GGUF name for vision tensor {key!r}")


# ------------------------------------------------------------------------------ tokenizer
def _vocab(tokenizer, vocab_size: int):
    """(tokens, scores, types) for a `llama` GGUF vocabulary of `vocab_size` entries: from the
    SentencePiece model when the tokenizer has one, else from the fast tokenizer's vocabulary
    (BPE rank order as the score); byte pieces <0xNN> are BYTE, special tokens CONTROL, other
    added tokens USER_DEFINED, padding rows [PAD<i>] UNUSED."""
    gguf = _gguf()
    tt = gguf.TokenType
    n = len(tokenizer)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [tt.UNUSED] * vocab_size
    sp_file = getattr(tokenizer, "vocab_file", None)
    special = {int(i) for i in tokenizer.all_special_ids}
    added = {int(i) for i in tokenizer.get_added_vocab().values()}
    if sp_file and str(sp_file).endswith(".model") and Path(sp_file).exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        for i in range(sp.get_piece_size()):
            tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
            types[i] = (tt.UNKNOWN if sp.is_unknown(i) else tt.CONTROL if sp.is_control(i)
                        else tt.BYTE if sp.is_byte(i) else tt.UNUSED if sp.is_unused(i) else tt.NORMAL)
    for tok, i in tokenizer.get_vocab().items():
        if i >= vocab_size or types[i] != tt.UNUSED:
            continue
        tokens[i], scores[i] = tok, -float(i)
        types[i] = (tt.CONTROL if i in special else tt.USER_DEFINED if i in added
                    else tt.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", tok) else tt.NORMAL)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocabulary only {vocab_size}")
    return tokens, scores, types


# ------------------------------------------------------------------------------ writers
def _add(writer, name: str, arr: np.ndarray, quant: str):
    gguf = _gguf()
    if arr.ndim <= 1:
        writer.add_tensor(name, arr.astype(np.float32))
        return
    if quant in ("q8_0", "q4_0") and arr.shape[-1] % 32 == 0:
        qt = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        data = gguf.quants.quantize(arr.astype(np.float32), qt)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        return
    writer.add_tensor(name, arr.astype(np.float16))


def check_llm_supported(t) -> None:
    """Refuse LLMs this writer would get wrong, before any file is written. It writes llama.cpp's
    `llama` arch with a SentencePiece vocabulary: LLaMA / Vicuna, and Mistral without a window
    (llama.cpp converts MistralForCausalLM to that very arch). A sliding window has no key in the
    `llama` arch (llama.cpp would attend past it), Qwen2 is another arch (`qwen2`: q/k/v biases,
    a byte-level BPE vocabulary), and neither is written here."""
    if t.model_type == "qwen2":
        raise NotImplementedError("GGUF export of a Qwen2 LLM is not implemented (llama.cpp's 'qwen2' arch and "
                                  "BPE vocabulary); export a llava-hf dir (save_pretrained) instead")
    if t.sliding_window is not None:
        raise NotImplementedError(f"GGUF export of a sliding-window LLM ({t.model_type}, window {t.sliding_window}) "
                                  "is not implemented: llama.cpp's 'llama' arch attends to the whole context; "
                                  "export a llava-hf dir (save_pretrained) instead")
    if t.attention_bias or t.o_proj_bias or t.mlp_bias:
        raise NotImplementedError("GGUF export of an LLM with attention / MLP biases is not implemented")


def write_llm(path, cfg, hf: dict, tokenizer, quant: str = "f16", name: str = "llava-jax",
              template: str | None = "vicuna_v1"):
    gguf = _gguf()
    t = cfg.text
    check_llm_supported(t)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_rope_dimension_count(t.head_dim)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_rope_freq_base(float(t.rope.theta))
    if t.rope.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(t.rope.factor))
    elif t.rope.type != "default":
        raise NotImplementedError(f"GGUF export of rope type {t.rope.type!r} is not implemented")
    w.add_layer_norm_rms_eps(float(t.rms_norm_eps))
    w.add_vocab_size(t.vocab_size)
    tokens, scores, types = _vocab(tokenizer, t.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, tid in (("bos", t.bos_token_id), ("eos", t.eos_token_id), ("unk", tokenizer.unk_token_id),
                     ("pad", tokenizer.pad_token_id)):
        tid = tid[0] if isinstance(tid, (list, tuple)) else tid
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    jinja = chat_template_jinja(template) if template else None
    if jinja:
        w.add_chat_template(jinja)
    for tname, arr in llm_tensors(hf, cfg):
        _add(w, tname, arr, quant)
    _finish(w)


def write_mmproj(path, cfg, hf: dict, name: str = "llava-jax"):
    gguf = _gguf()
    from llava_jax.data.images import CLIP_MEAN, CLIP_STD

    v = cfg.vision
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_name(name)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", v.projection_dim)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.layer_norm_eps))
    w.add_uint32("clip.vision.block_count", v.num_layers)
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
    # hidden-state index (0 = embeddings) as that converter stores it: -k -> num_layers + 1 - k
    w.add_array("clip.vision.feature_layer", [int(i if i >= 0 else v.num_layers + i + 1) for i in layers])
    w.add_array("clip.vision.image_mean", [float(x) for x in CLIP_MEAN])
    w.add_array("clip.vision.image_std", [float(x) for x in CLIP_STD])
    w.add_bool("clip.use_gelu", v.hidden_act == "gelu")
    for tname, arr in mmproj_tensors(hf):
        if arr.ndim == 4 or (arr.ndim == 2 and tname.endswith(".weight")):
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            w.add_tensor(tname, arr.astype(np.float32))
    _finish(w)


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def modelfile(llm_file: str, mmproj_file: str, template: str = "vicuna_v1") -> str:
    """An Ollama Modelfile for the exported pair, its TEMPLATE (Go template) rendering `template`'s
    generation prompt (vicuna_v1: LLaVA-1.5's 'S USER: q ASSISTANT:'); a template of a shape this
    form does not cover (see `chat_template_jinja`) gets no TEMPLATE line."""
    from llava_jax.data.templates import get_template

    t = get_template(template)
    user, asst = t.roles
    head = f"FROM ./{llm_file}\nFROM ./{mmproj_file}\n"
    if chat_template_jinja(template) is None:
        return head + f"# no TEMPLATE: write one for llava-jax's {template!r} prompt format\nPARAMETER temperature 0\n"
    go = ("{{ if .System }}" + t.system_format.replace("{system}", "{{ .System }}") + "{{ end }}"
          + t.user_format.replace("{role}", user).replace("{content}", "{{ .Prompt }}")
          + t.assistant_prefix.replace("{role}", asst))
    stops = [x for x in (t.reply_suffix.strip(), t.user_format.split("{content}")[0].replace("{role}", user).strip()) if x]
    return (head + f'TEMPLATE """{go}"""\n' + (f'SYSTEM """{t.system}"""\n' if t.system else "")
            + "".join(f'PARAMETER stop "{x}"\n' for x in stops) + "PARAMETER temperature 0\n")


def export_gguf(model, tokenizer, out_dir, quant: str = "f16", name: str | None = None,
                template: str = "vicuna_v1") -> dict[str, Path]:
    """Write the LLM GGUF, the mmproj GGUF and the Modelfile into `out_dir`; returns their paths."""
    from llava_jax.convert.hf import hf_tensors

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    cfg = model.config
    check_llm_supported(cfg.text)
    if cfg.vision.is_siglip:
        raise NotImplementedError("the GGUF export writes llama.cpp's CLIP mmproj; a SigLIP tower is not supported")
    if cfg.projector_type not in ("mlp2x_gelu",):
        raise NotImplementedError(f"llama.cpp's LLaVA mmproj has a 2-layer MLP projector; this model's is "
                                  f"{cfg.projector_type!r}")
    if cfg.vision_feature_select_strategy != "default":
        raise NotImplementedError("llama.cpp's LLaVA drops the CLS feature (vision_feature_select_strategy default)")
    if cfg.is_anyres:  # the mmproj below would silently drop image_newline and the grid (docs/anyres.md)
        raise NotImplementedError("the GGUF export writes LLaVA-1.5's mmproj; LLaVA-NeXT AnyRes (image_grid_pinpoints, "
                                  "image_newline) is not supported yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or "llava-jax"
    hf = dict(hf_tensors(model, np.float32))
    mmproj = out / f"mmproj-{name}-f16.gguf"
    write_mmproj(mmproj, cfg, hf, name)
    llm = out / f"{name}-{quant}.gguf"
    if quant == "q4_K_M":
        f16 = out / f"{name}-f16.gguf"
        write_llm(f16, cfg, hf, tokenizer, "f16", name, template)
        _llama_quantize(f16, llm, "Q4_K_M")
    else:
        write_llm(llm, cfg, hf, tokenizer, quant, name, template)
    mf = out / "Modelfile"
    mf.write_text(modelfile(llm.name, mmproj.name, template), encoding="utf-8")
    return {"llm": llm, "mmproj": mmproj, "modelfile": mf}


def _llama_quantize(src: Path, dst: Path, qtype: str):
    exe = shutil.which("llama-quantize", path=os.environ.get("LLAMA_CPP_BIN") or None) or shutil.which("llama-quantize")
    if exe is None:
        raise FileNotFoundError(f"q4_K_M needs llama.cpp's llama-quantize (no Python quantizer exists for it): "
                                f"put it on PATH or set LLAMA_CPP_BIN to its folder; {src} (f16) is written")
    subprocess.run([exe, str(src), str(dst), qtype], check=True)


def describe(path) -> dict:
    """Architecture, key/value metadata names and {tensor: (shape, type)} of a GGUF file, read
    with gguf's own reader."""
    gguf = _gguf()
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"]
    return {"arch": bytes(arch.parts[arch.data[0]]).decode(), "keys": sorted(r.fields),
            "tensors": {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}}


