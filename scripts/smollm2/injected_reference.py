#!/usr/bin/env python3
"""Reference outputs of SmolLM2 with TPTT injected by the Python package tptt 0.12.1 (no LoRA).

Run (offline, CPU, from the repository root):

    /work/pyref/bin/python scripts/smollm2/injected_reference.py MODEL_DIR
    e.g. MODEL_DIR = models/smollm2-135m-instruct

Needs torch 2.7.1, transformers 4.52.4, peft 0.15.2, tptt 0.12.1. For each setting below the
model is built in memory with `tptt.TpttConfig(base_model_name=MODEL_DIR, operator_mode=...,
mag_weight=0.125, lora_config=None)` + `tptt.TpttModel(config)` (base weights unchanged, every
decoder self_attn wrapped in LiZAttention; max_chunk_size 64, no window, float32) and records into
tests/fixtures/smollm2/injected_reference.safetensors:

    ids                    int64 [37]        prompt ids, copied from reference.safetensors `ids`
    <mode>.logits          f32   [4, vocab]  last 4 rows of one use_cache=False forward of ids
    <mode>.gen_ids         int64 [12]        model.generate(..., do_sample=False), eos disabled
                                             (tptt's cached generation; linear_cache reset first)
    <mode>.recompute_ids   int64 [12]        greedy, one full use_cache=False forward per step

and the decoded texts + versions into injected_reference.json next to it. TpttConfig() may load
the config of google/gemma-3-270m (its default base_model_name): a stand-in config for it is put
into a temporary HF cache (as tests/fixtures/tiny/generate.py does).
"""

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="tptt-smollm2-hf-")
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
_snap = Path(_HF_HOME, "hub", "models--google--gemma-3-270m")
(_snap / "refs").mkdir(parents=True)
(_snap / "refs" / "main").write_text("0" * 40)
(_snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
(_snap / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps({
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256,
    "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "vocab_size": 262144, "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 512,
    "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "torch_dtype": "bfloat16"}))

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import tptt  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MODES = {"delta_product": dict(mag_weight=0.125), "delta_rule": dict(mag_weight=0.125)}
N_NEW = 12
OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "smollm2"


@torch.no_grad()
def record(model_dir: str, mode: str, opts: dict, ids: torch.Tensor):
    config = tptt.TpttConfig(base_model_name=model_dir, operator_mode=mode, lora_config=None,
                             use_linear_checkpoint=False, **opts)
    model = tptt.TpttModel(config).eval()
    assert model.config.max_chunk_size == 64 and model.config.max_self_attn_length is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    base = model.tptt_model
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    n_liza = sum(type(m).__name__ == "LiZAttention" for m in base.modules())
    assert n_liza == base.config.num_hidden_layers, n_liza

    model.linear_cache.reset()
    logits = model(input_ids=ids[None], use_cache=False).logits[0, -4:].float().contiguous()

    model.linear_cache.reset()
    seq = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                         max_new_tokens=N_NEW, do_sample=False, eos_token_id=None)[0]
    assert torch.equal(seq[: len(ids)], ids) and len(seq) == len(ids) + N_NEW
    gen_ids = seq[len(ids):].clone()

    seq = ids.clone()
    for _ in range(N_NEW):
        model.linear_cache.reset()
        nxt = model(input_ids=seq[None], use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1)])
    recompute_ids = seq[len(ids):].clone()
    assert recompute_ids[0] == logits[-1].argmax()
    return logits, gen_ids.to(torch.int64), recompute_ids.to(torch.int64)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: injected_reference.py MODEL_DIR")
    model_dir = sys.argv[1]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": importlib.metadata.version("peft"), "tptt": importlib.metadata.version("tptt")}
    if versions["transformers"] != "4.52.4" or versions["tptt"] != "0.12.1":
        sys.exit(f"tptt 0.12.1 with transformers 4.52.4 is required, got {versions}")
    ids = load_file(str(OUT / "reference.safetensors"))["ids"].to(torch.int64)
    assert ids.shape == (37,), ids.shape
    tok = AutoTokenizer.from_pretrained(model_dir)

    tensors = {"ids": ids}
    info = {"versions": versions, "model_dir": model_dir, "prompt": tok.decode(ids),
            "settings": {}}
    for mode, opts in MODES.items():
        logits, gen_ids, recompute_ids = record(model_dir, mode, opts, ids)
        tensors.update({f"{mode}.logits": logits, f"{mode}.gen_ids": gen_ids,
                        f"{mode}.recompute_ids": recompute_ids})
        info["settings"][mode] = {
            "operator_mode": mode, **opts, "lora_config": None, "max_chunk_size": 64,
            "max_self_attn_length": None, "dtype": "float32",
            "gen_ids": gen_ids.tolist(), "gen_text": tok.decode(gen_ids, skip_special_tokens=False),
            "recompute_ids": recompute_ids.tolist(),
            "recompute_text": tok.decode(recompute_ids, skip_special_tokens=False),
        }
        print(mode, json.dumps(info["settings"][mode], ensure_ascii=False), flush=True)

    save_file(tensors, str(OUT / "injected_reference.safetensors"), metadata={"format": "pt"})
    with open(OUT / "injected_reference.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    for name in ("injected_reference.safetensors", "injected_reference.json"):
        print(name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
