"""Exporting a quantized student: a plain HF folder on the grid, and a llama.cpp GGUF file (Q8_0 / Q4_0).

The GGUF follows llama.cpp's ``convert_hf_to_gguf.py`` for Llama (``LlamaModel``): tensor names ``token_embd``,
``blk.N.attn_q`` ... ``output_norm``, ``output`` (left out when the head is tied to the embeddings, which is how
readers know it is tied); the rows of ``q_proj`` / ``k_proj`` permuted from Hugging Face's rotate-half layout to
llama.cpp's interleaved one (``permute``; transformers' GGUF loader undoes it). Rows are permuted before
quantizing: a block lies inside a row, so the quantized rows are the same blocks, moved. The quantized layers are
packed by gguf-py's reference ``gguf.quants.quantize`` from the latent weights, whose dequantization equals the
fake-quant forward's weights bit for bit (:mod:`stillroom.compress.quant`, tested); the other tensors (embeddings,
head, norms) are written as F32, unchanged.

The tokenizer is written as llama.cpp's ``gpt2`` kind (byte-level BPE: tokens, token types, merges, special ids,
chat template); other kinds (sentencepiece, WordPiece, ...) are refused with :class:`GgufExportError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from stillroom.compress.quant import latent_copy, make_quant_aware, on_grid, quant_summary, quantized_layers
from stillroom.config.quantize import QuantizeConfig

Log = Callable[[str], None]

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types


class GgufExportError(ValueError):
    """The model or tokenizer cannot be written as a GGUF file (what and why are in the message)."""


def gguf_path(folder: Path) -> Path:
    """Where the GGUF of an exported folder goes: beside it, ``<folder>.gguf`` (``student`` -> ``student.gguf``)."""
    return folder.with_name(folder.name + ".gguf")


def export_model(model: nn.Module, cfg: QuantizeConfig) -> nn.Module:
    """The plain model ``student/`` holds: the grid weights (``hf`` in ``cfg.export``) or the latent ones."""
    return on_grid(model) if "hf" in cfg.export else latent_copy(model)


# ---------------------------------------------------------------- checks (before training)

def quant_aware_student(model: nn.Module, cfg: QuantizeConfig, tokenizer, *, log: Log = print) -> list[str]:
    """Make the student quantization-aware (in place) and check, before step 0, that it can be exported as
    ``cfg.export`` asks; returns the quantized layers' names."""
    names = make_quant_aware(model, cfg)
    summary = quant_summary(model)
    log(f"quantize: {summary['layers']} linear layers ({summary['weights'] / 1e6:.2f}M weights) train on the "
        f"{cfg.format} grid (fake-quant forward, straight-through gradient); embeddings and head full precision")
    if "gguf" in cfg.export:
        try:
            caveats = check_gguf_exportable(model, tokenizer)
        except GgufExportError as err:
            raise GgufExportError(f"student.quantize.export: {err}") from None
        for line in caveats:
            log(line)
    return names


def check_gguf_exportable(model: nn.Module, tokenizer) -> list[str]:
    """Raise :class:`GgufExportError` when ``model`` + ``tokenizer`` cannot be written as GGUF; returns caveats
    (lines for the log)."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise GgufExportError(f"GGUF export supports Llama-family models (model_type llama); this student is "
                              f"{getattr(config, 'model_type', type(model).__name__)!r}. Remove 'gguf' from "
                              "student.quantize.export (the HF folder is still written)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GgufExportError("GGUF export: this Llama has attention or MLP biases, which llama.cpp's llama "
                              "architecture does not read; remove 'gguf' from student.quantize.export")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GgufExportError(f"GGUF export writes plain RoPE; this model uses rope_type {rope.get('rope_type')!r}; "
                              "remove 'gguf' from student.quantize.export")
    return _tokenizer_state(tokenizer)[1]


def _tokenizer_state(tokenizer) -> tuple[dict, list[str], str]:
    """``(tokenizer.json as a dict, caveats, llama.cpp pre-tokenizer name)`` of a byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}. "
                              "Remove 'gguf' from student.quantize.export (the HF folder is still written)")
    state = json.loads(backend.to_str())
    kind = state["model"]["type"]
    pre = state.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kind != "BPE" or kinds[-1:] != ["ByteLevel"]:
        raise GgufExportError(f"GGUF export writes llama.cpp's `gpt2` (byte-level BPE) tokenizer; this tokenizer is "
                              f"{kind} with pre-tokenizer {kinds}, which is not written. Remove 'gguf' from "
                              "student.quantize.export (the HF folder is still written)")
    if kinds == ["ByteLevel"]:
        pre_name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        pre_name = "smollm"
    else:
        raise GgufExportError(f"GGUF export: the pre-tokenizer {kinds} has no llama.cpp name; remove 'gguf' from "
                              "student.quantize.export")
    caveats = []
    if state.get("normalizer"):
        caveats.append(f"gguf: the tokenizer's normalizer ({state['normalizer'].get('type')}) has no GGUF field; "
                       "readers of the GGUF tokenize without it")
    return state, caveats, pre_name


# ---------------------------------------------------------------- tokenizer metadata

def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """The tokens in id order (padded to the model's vocabulary with ``[PAD<id>]``, as llama.cpp pads) and their
    llama.cpp types: special tokens CONTROL, other added tokens USER_DEFINED, padding UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or any(i >= vocab_size for i in by_id):
        raise GgufExportError(f"GGUF export: the tokenizer has {len(by_id)} tokens, more than the model's "
                              f"{vocab_size}-row embedding")
    special = set(tokenizer.all_special_ids)
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(CONTROL if i in special or added.get(i) else USER_DEFINED if i in added else NORMAL)
    return tokens, types


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    state, _, pre_name = _tokenizer_state(tokenizer)
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
             "pad": writer.add_pad_token_id}[name](int(token_id))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- tensors

def _permute(weight_oi: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from rotate-half to interleaved order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight_oi.shape
    return weight_oi.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; error for anything unknown."""
    module, _, kind = hf_name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise GgufExportError(f"GGUF export: no llama.cpp tensor name for {hf_name}; remove 'gguf' from "
                          "student.quantize.export")


def _add_tensors(writer, model: nn.Module) -> None:
    import gguf

    config = model.config
    formats = {f"{n}.weight": m.quant_format for n, m in quantized_layers(model).items()}
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: readers take the head from token_embd
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            array = _permute(array, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, config.num_attention_heads, config.num_key_value_heads)
        target = _gguf_name(name)
        if name in formats:
            qtype = qtypes[formats[name]]
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, np.ascontiguousarray(array, dtype=np.float32))


def _add_architecture(writer, model: nn.Module, fmt: str | None) -> None:
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    writer.add_name(str(getattr(c, "_name_or_path", "") or "stillroom student"))
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    file_types = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types.get(fmt, gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model: nn.Module, tokenizer, path: Path, *, log: Log = print) -> Path:
    """Write quant-aware ``model`` (its :class:`~stillroom.compress.quant.FakeQuantLinear` layers in their
    format, the rest F32) and ``tokenizer`` to ``path`` as GGUF (temp file, then renamed)."""
    import gguf

    for line in check_gguf_exportable(model, tokenizer):
        log(line)
    formats = sorted({m.quant_format for m in quantized_layers(model).values()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    _add_architecture(writer, model, formats[0] if len(formats) == 1 else None)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    _add_tensors(writer, model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    log(f"gguf: wrote {path} ({'/'.join(formats) or 'f32'} linear layers, {path.stat().st_size / 1e6:.1f} MB)")
    return path


# ---------------------------------------------------------------- post-training quantization of a folder

def save_folder(model: nn.Module, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """``model`` (plain) + ``tokenizer`` as an HF folder, written beside and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / "stillroom.json").write_text(json.dumps(extra))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def quantize_folder(folder: str | Path, cfg: QuantizeConfig, out: str | Path, *, overwrite: bool = False,
                    log: Log = print) -> Path:
    """Round-to-nearest post-training quantization (PTQ, no training) of the HF folder ``folder`` onto
    ``cfg.format``'s grid: ``out`` (an HF folder, as ``cfg.export`` says) and, with ``gguf``, ``<out>.gguf``.
    The HF folder is written first; a model or tokenizer GGUF cannot describe raises :class:`GgufExportError`
    after it. Returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(folder).expanduser(), Path(out).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; give an HF model folder to quantize")
    if (out.exists() or gguf_path(out).exists()) and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    names = make_quant_aware(model, cfg)
    log(f"quantize: {len(names)} linear layers of {src} to {cfg.format} (round to nearest)")
    save_folder(export_model(model, cfg), tokenizer, out, {"quantize": cfg.model_dump(), "source": str(src)})
    log(f"quantize: wrote {out}")
    if "gguf" in cfg.export:
        write_gguf(model, tokenizer, gguf_path(out), log=log)
    return out
