#!/usr/bin/env python3
"""Speed of the reference: tptt 0.12.1 (PyTorch, float32, CPU) on a plain Hugging Face model
folder with TPTT injected, as `tptt bench` measures our engine. Called by `tptt bench` (baseline
(c)); runs on its own too:

    /work/pyref/bin/python scripts/bench/reference_bench.py MODEL_DIR --threads 2 [--json] [--quick]

The model is built offline as scripts/smollm2/injected_reference.py builds it:
`tptt.TpttConfig(base_model_name=MODEL_DIR, operator_mode=MODE, mag_weight=MAG, lora_config=None)`
+ `tptt.TpttModel(config)` (every decoder self_attn wrapped in LiZAttention, max_chunk_size 64,
no window, float32), with a stand-in config for google/gemma-3-270m (TpttConfig's default base)
in a temporary HF cache.

Measured with torch.set_num_threads(THREADS), greedy, EOS disabled, the linear cache reset before
every call; every call is made once untimed first (PyTorch's first call of a shape is several
times slower), then best of `--repeats` runs (3; 2 with --quick):
  prefill_tok_s  512 / time of generate(512-token prompt, max_new_tokens=1) (the reference's
                 cached-generation prefill plus one sampled token), best run
  decode_tok_s   1 / median time between consecutive new tokens' logits (a logits processor
                 stamps them) in generate(128-token prompt, max_new_tokens=1+N), N = 32 (16
                 quick), over all runs; decode_tok_s_mean_per_run gives N / sum per run
OMP_WAIT_POLICY defaults to PASSIVE (see below: spin-waiting collapses on a shared machine).
Prompts are random token ids (seeded). Prints one JSON object on stdout with --json, else lines.

Exit status 3: the Python stack (torch, transformers, tptt) is not importable; 2: bad arguments
or model folder; anything else: a failure while measuring.
"""

import argparse
import json
import os
import resource
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path


def fail(code: int, msg: str):
    print(f"reference_bench: {msg}", file=sys.stderr)
    sys.exit(code)


def stand_in_hf_home() -> str:
    """A temporary HF cache holding only the config of tptt's default base (never downloaded)."""
    home = tempfile.mkdtemp(prefix="tptt-bench-hf-")
    snap = Path(home, "hub", "models--google--gemma-3-270m")
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256,
        "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "vocab_size": 262144,
        "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0, "rope_scaling": None,
        "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2,
        "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"}))
    return home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--operator-mode", default="delta_product")
    ap.add_argument("--mag-weight", type=float, default=0.125)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    ap.add_argument("--history", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (32; 16 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs after one untimed warm-up (3; 2 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n_dec = args.decode_tokens or (16 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.threads < 1 or n_dec < 1 or repeats < 1 or args.prefill < 1 or args.history < 1:
        fail(2, "--threads, --decode-tokens, --repeats, --prefill and --history must be >= 1")
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        fail(2, f"{model_dir} has no config.json: not a Hugging Face model folder")

    hf_home = stand_in_hf_home()
    os.environ.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
                      CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.threads),
                      MKL_NUM_THREADS=str(args.threads))
    # OpenMP's default spin-waiting makes torch 10-20x slower whenever another process wants one
    # of the cores (measured here: generate(128 + 4) 17-48 s instead of 1.6-2.5 s at load 5 on 2
    # cores); passive waiting keeps the reference at its real speed on a shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import importlib.metadata
        import torch
        import transformers
        import tptt
        from transformers import LogitsProcessorList
    except ImportError as e:
        shutil.rmtree(hf_home, ignore_errors=True)
        fail(3, f"the reference stack is not importable with {sys.executable}: {e}")

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "tptt": importlib.metadata.version("tptt")}
    torch.set_num_threads(args.threads)
    log = lambda msg: print(f"reference_bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    try:
        t0 = time.perf_counter()
        config = tptt.TpttConfig(base_model_name=str(model_dir), operator_mode=args.operator_mode,
                                 mag_weight=args.mag_weight, lora_config=None,
                                 use_linear_checkpoint=False)
        model = tptt.TpttModel(config).eval()
        load_s = time.perf_counter() - t0
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        if dtypes != ["torch.float32"]:
            fail(2, f"expected a float32 model, got {dtypes}")
        vocab = model.tptt_model.config.vocab_size
        n_liza = sum(type(m).__name__ == "LiZAttention" for m in model.tptt_model.modules())
        log(f"loaded in {load_s:.1f}s ({n_liza} LiZA layers, {args.threads} threads, torch {torch.__version__})")

        gen = torch.Generator().manual_seed(0)
        prefill_ids = torch.randint(0, vocab, (1, args.prefill), generator=gen)
        hist_ids = torch.randint(0, vocab, (1, args.history), generator=gen)

        class Stamp:
            """A logits processor that only records when each new token's logits are ready."""

            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        @torch.no_grad()
        def timed_generate(ids: torch.Tensor, new: int):
            """(total seconds, per-step seconds between consecutive tokens' logits)."""
            model.linear_cache.reset()
            stamp = Stamp()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([stamp]))
            dt = time.perf_counter() - t
            assert out.shape[1] == ids.shape[1] + new and len(stamp.times) == new, (out.shape, len(stamp.times))
            return dt, [b - a for a, b in zip(stamp.times, stamp.times[1:])]

        # PyTorch's first call of a shape is several times slower (kernel selection, allocator
        # growth), so each call is made once untimed first. The machine may be shared: prefill is
        # the best of `repeats`; decode is the median step over all repeats (robust to spikes).
        timed_generate(prefill_ids, 1)
        timed_generate(hist_ids, 1 + n_dec)
        prefill_runs = []
        steps = []
        decode_runs = []
        for _ in range(repeats):
            prefill_runs.append(timed_generate(prefill_ids, 1)[0])
            _, st = timed_generate(hist_ids, 1 + n_dec)
            steps.extend(st)
            decode_runs.append(len(st) / sum(st))
        prefill_s = min(prefill_runs)
        step_s = statistics.median(steps)
        log(f"prefill {args.prefill}: best {prefill_s:.2f}s of {[round(x, 2) for x in prefill_runs]}")
        log(f"decode after {args.history}: median step {step_s:.3f}s; mean tok/s per run {[round(x, 2) for x in decode_runs]}")
    finally:
        shutil.rmtree(hf_home, ignore_errors=True)

    res = {
        "implementation": "tptt (PyTorch reference)",
        "versions": versions,
        "model_dir": str(model_dir),
        "operator_mode": args.operator_mode,
        "mag_weight": args.mag_weight,
        "dtype": "float32",
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_s": load_s,
        "prefill_tokens": args.prefill,
        "prefill_s": prefill_s,
        "prefill_tok_s": args.prefill / prefill_s,
        "decode_history": args.history,
        "decode_tokens": n_dec,
        "decode_step_median_s": step_s,
        "decode_tok_s": 1.0 / step_s,
        "decode_tok_s_mean_per_run": decode_runs,
        "prefill_runs_s": prefill_runs,
        "repeats": repeats,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
