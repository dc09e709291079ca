#!/usr/bin/env python3
"""Write transformers reference data for the converted SmolLM2 folder.

Usage: reference.py MODEL_DIR OUT_FILE
   e.g. reference.py models/smollm2-135m-instruct tests/fixtures/smollm2/reference.safetensors

Writes OUT_FILE (safetensors) and the same path with the suffix .json:

  reference.safetensors
    ids               int64 [n]        chat prompt ids (AutoTokenizer + apply_chat_template)
    logits            f32   [4, vocab] logits of the LAST 4 positions of one full forward of `ids`
    logits_positions  int64 [4]        which positions those rows are (n-4 .. n-1)
    greedy_ids        int64 [16]       16 greedy new tokens (argmax, full forward per step,
                                       NOT stopped at eos)
  reference.json
    prompt messages, rendered chat templates, tokenizer cases, the greedy answer, versions.

Needs torch + transformers (4.52.4 was used for the committed fixtures).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import tokenizers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?"},
]
TRICKY = [
    "Hello world",
    " leading space",
    "digits 12345",
    "émoji 🙂 ok",
    "<|im_start|>user\nhi<|im_end|>",
]
N_LOGIT_ROWS = 4
N_GREEDY = 16


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: reference.py MODEL_DIR OUT_FILE")
    model_dir, out_file = Path(sys.argv[1]), Path(sys.argv[2])
    out_json = out_file.with_suffix(".json")
    out_file.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    rendered_prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    rendered_conv = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = list(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True))
    conv_ids = list(tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))
    assert ids == tok(rendered_prompt, add_special_tokens=False)["input_ids"]

    n = len(ids)
    positions = list(range(n - N_LOGIT_ROWS, n))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [n, vocab]
        last_logits = logits[positions].float().numpy()

        # greedy: one full (cache-free) forward per step, never stopping at eos
        seq = list(ids)
        greedy, margins = [], []
        for _ in range(N_GREEDY):
            row = model(torch.tensor([seq])).logits[0, -1]
            top2 = torch.topk(row, 2)
            nxt = int(top2.indices[0])
            greedy.append(nxt)
            margins.append(float(top2.values[0] - top2.values[1]))
            seq.append(nxt)

        # cross-check against transformers' own generate() (with KV cache)
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, n, dtype=torch.long),
                             max_new_tokens=N_GREEDY, do_sample=False)[0, n:].tolist()
    if gen != greedy[: len(gen)]:
        sys.exit(f"error: generate() {gen} disagrees with the manual greedy loop {greedy}")
    assert greedy[0] == int(np.argmax(last_logits[-1]))

    eos = tok.eos_token_id
    answer_ids = greedy[: greedy.index(eos)] if eos in greedy else greedy
    answer = tok.decode(answer_ids, skip_special_tokens=True)
    if "Paris" not in answer:
        sys.exit(f"error: expected the answer to mention Paris, got {answer!r}")

    save_file(
        {
            "ids": np.array(ids, dtype=np.int64),
            "logits": np.ascontiguousarray(last_logits, dtype=np.float32),
            "logits_positions": np.array(positions, dtype=np.int64),
            "greedy_ids": np.array(greedy, dtype=np.int64),
        },
        str(out_file),
        metadata={"format": "pt"},
    )

    tokenizer_cases = []
    for s in TRICKY:
        enc = tok(s, add_special_tokens=False)
        tokenizer_cases.append({
            "text": s,
            "ids": enc["input_ids"],
            "tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
            "decoded": tok.decode(enc["input_ids"], skip_special_tokens=False),
        })

    ref = {
        "model_dir_files_sha256": {
            name: sha256(model_dir / name)
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "prompt_messages": PROMPT,
        "rendered_prompt": rendered_prompt,
        "conversation_messages": CONVERSATION,
        "rendered_conversation": rendered_conv,
        "conversation_ids": conv_ids,
        "ids": ids,
        "logits_positions": positions,
        "logits_note": "rows of reference.safetensors `logits`; row i is the next-token distribution after ids[:positions[i]+1]",
        "tokenizer_cases": tokenizer_cases,
        "tokenizer_cases_note": "ids from tokenizer(text, add_special_tokens=False); special tokens in text ARE recognised",
        "greedy_ids": greedy,
        "greedy_top2_margins": margins,
        "greedy_note": "argmax of a full forward per step, 16 steps, not stopped at eos",
        "eos_token_id": eos,
        "answer_ids": answer_ids,
        "answer_text": answer,
        "greedy_text_with_specials": tok.decode(greedy, skip_special_tokens=False),
    }
    text = json.dumps(ref, indent=2, ensure_ascii=False)
    # keep number lists (ids, margins) on one line
    text = re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    assert json.loads(text) == ref
    with open(out_json, "w", encoding="utf-8") as f:
        f.write(text + "\n")

    print(f"ids ({n}): {ids}")
    print(f"greedy: {greedy}")
    print(f"answer: {answer!r}")
    print(f"wrote {out_file} ({out_file.stat().st_size} bytes) and {out_json} ({out_json.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
