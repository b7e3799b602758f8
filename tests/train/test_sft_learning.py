"""SFT teaches SmolLM2 (real weights, offline) an answer format it does not follow: questions about
standard-library functions answered as one JSON object (``lamina.data.stdlib_sft``). The short version of
the README's run: untrained, under 10% of held-out answers are in the shape; after a short LoRA SFT on
the top blocks, at least half are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lamina.data.stdlib_sft import follows_shape, stdlib_sft, write_jsonl
from lamina.generate.engine import greedy_decode
from lamina.train.finetune import FinetuneRun, finetune

N_TRAIN, N_HELD_OUT, STEPS, MAX_NEW = 64, 16, 16, 64


@pytest.mark.slow
def test_sft_teaches_the_json_shape(lamina_smollm2: Any, tmp_path: Path) -> None:
    train, held_out = stdlib_sft(N_TRAIN, N_HELD_OUT, seed=0)
    tok = lamina_smollm2.tokenizer
    prompts = [tok.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True) for c in held_out]
    # untrained, the answers are prose: a reply in the shape is one JSON object, so it starts with "{",
    # and the first 8 greedy tokens (those of the full answer) settle that (none of 16 do; 3 s, not 12)
    with torch.no_grad():
        before = greedy_decode(lamina_smollm2.model.eval(), prompts, 8, tok.eos_token_ids)
    braced_before = sum(tok.decode(o, skip_special_tokens=True).lstrip().startswith("{") for o in before)
    assert braced_before < 0.1 * N_HELD_OUT

    run = FinetuneRun.from_dict(
        {
            "task": {"task": "sft", "data": str(write_jsonl(tmp_path / "train.jsonl", train)),
                     "val_data": str(write_jsonl(tmp_path / "held_out.jsonl", held_out)), "max_seq_len": 128},
            "init": "smollm2",
            "sft": {"samples": N_HELD_OUT, "sample_max_new_tokens": MAX_NEW},
            "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["blocks.2[2-9].*"]},
            "train": {"out_dir": str(tmp_path / "run"), "max_steps": STEPS, "batch_size": 4, "lr": 2e-3,
                      "schedule": "constant", "warmup_steps": 0, "eval_every": STEPS, "eval_batches": 1,
                      "progress": False},
        }
    )  # fmt: skip
    finetune(run)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    shaped_after = sum(follows_shape(s["output"]) for s in samples if s["step"] == STEPS)
    assert shaped_after >= 0.5 * N_HELD_OUT, [s["output"] for s in samples]
