"""Supervised fine-tuning on the one trainer (``finetune`` with ``task=sft``), on a tiny random chat model:
the run writes its counts, samples and checkpoints; a resumed run ends with exactly the uninterrupted
run's weights; frozen weights stay bit-identical; early stopping; a packed batch scores exactly as the
same conversations unpacked; all-dropped data stops before training."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from interrupting import assert_same_weights, losses  # tests/train/interrupting.py
from safetensors.torch import load_file
from tiny_chat import WORDS, tiny_lm

import lamina
from lamina.checkpoint.peft import load_adapter
from lamina.data.chat import ChatBatches, ChatData, encode_chats
from lamina.errors import ConfigError, DataError
from lamina.model.lora import LoraConfig, count_trainable, expected_trainable, lora_state_dict
from lamina.train.finetune import FinetuneRun, finetune
from lamina.train.objectives import sft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random chat model saved as a lamina checkpoint."""
    lm = tiny_lm(d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    return lamina.save_checkpoint(tmp_path_factory.mktemp("tiny") / "model", lm.model, tokenizer=lm.tokenizer)


def _conversation(rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORDS[:11], 3)
    return {"messages": [{"role": "user", "content": " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}  # fmt: skip


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 conversations (answer: the user's three words reversed), one line that is not JSON and one
    conversation without an answer."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    lines = [json.dumps(_conversation(rng)) for _ in range(48)]
    lines[5] = "{oops"
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "the cat"}]})
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tiny: Path, chat_file: Path, out: Path, **train: Any) -> FinetuneRun:
    return FinetuneRun.from_dict(
        {
            "task": {"task": "sft", "data": str(chat_file), "max_seq_len": 32, "val_fraction": 0.2},
            "init": str(tiny),
            "sft": {"samples": 2, "sample_max_new_tokens": 4},
            "train": {"out_dir": str(out), "max_steps": 8, "batch_size": 8, "lr": 3e-3, "eval_every": 4,
                      "save_every": 4, "log_every": 1, "progress": False, **train},
        }
    )  # fmt: skip


def test_run_writes_counts_samples_and_learns(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model, _, result = finetune(_run(tiny, chat_file, out, max_steps=16, eval_every=8))
    assert result.data["train_skipped"] + result.data["val_skipped"] == 2
    assert result.data["train_conversations"] + result.data["val_conversations"] == 46
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last < first
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [8, 8, 16, 16]
    assert {"where", "prompt", "reference", "output"} <= set(samples[0])
    assert samples[0]["prompt"].endswith("<|im_start|> assistant")
    run_yaml = (out / "run.yaml").read_text()
    assert "sft:" in run_yaml and "loss_on: assistant" in run_yaml
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["train_answer_tokens"] > 0
    assert (out / "curves.png").is_file() and (out / "best").is_dir() and (out / "last").is_dir()
    reloaded, _ = lamina.load_checkpoint(out / "last")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())


def test_resume_is_exact(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    finetune(_run(tiny, chat_file, ref))
    out = tmp_path / "out"
    finetune(_run(tiny, chat_file, out))
    # as if stopped after step 4: only the step-4 checkpoint is left
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    shutil.rmtree(out / "last")
    finetune(_run(tiny, chat_file, out), resume=True)
    assert_same_weights(out / "last", ref / "last")
    steps = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == [4, 4, 8, 8]  # the resumed run's samples replace none and repeat none


def test_frozen_weights_stay_bit_identical(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    before, _ = lamina.load_checkpoint(tiny)
    model, _, _ = finetune(_run(tiny, chat_file, tmp_path / "out", max_steps=3, freeze=["0", "tok_emb.*"]))
    old, new = before.state_dict(), model.state_dict()
    frozen = [k for k in old if k.startswith(("blocks.0.", "tok_emb."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not torch.equal(old["blocks.1.attn.q_proj.weight"], new["blocks.1.attn.q_proj.weight"])


def test_early_stopping_on_validation_loss(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    run = _run(tiny, chat_file, tmp_path / "out", max_steps=40, eval_every=2, early_stopping_patience=2,
               early_stopping_min_delta=10.0)  # fmt: skip
    _, _, result = finetune(run)
    assert result.stopped_early and result.steps == 6  # best at step 2, no better at 4 and 6


def test_every_example_dropped_stops_before_training(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"text": "x"}\n')
    out = tmp_path / "out"
    run = _run(tiny, path, out)
    run.task.val_data = str(path)
    with pytest.raises(
        DataError, match=r"every training conversation was dropped \(3 skipped; first: bad.jsonl "
    ):
        finetune(run)
    assert not out.exists()


def test_packed_batch_scores_as_unpacked(tiny: Path, chat_file: Path) -> None:
    model, _ = lamina.load_checkpoint(tiny)
    tok = lamina.load_tokenizer(str(tiny))
    rng = random.Random(1)
    data = ChatData([_conversation(rng)["messages"] for _ in range(6)], [f"row {i}" for i in range(6)])
    examples = encode_chats(tok, data, 64).examples
    objective = sft()
    with torch.no_grad():
        loss, n = objective(model, next(ChatBatches(examples, 6, 64, 0).eval_batches()))
        packed = next(ChatBatches(examples, 6, 64, 0, packing=True).eval_batches())
        assert packed["input_ids"].shape[0] < 6
        packed_loss, packed_n = objective(model, packed)
    assert packed_n == n
    assert torch.allclose(packed_loss, loss, atol=1e-5)


def _lora_run(tiny: Path, chat_file: Path, out: Path, **train: Any) -> FinetuneRun:
    run = _run(tiny, chat_file, out, **train)
    run.lora = LoraConfig(r=4, lora_alpha=8, target_modules=["all-linear"])
    return run


def test_lora_trains_only_adapters_saves_peft_and_resumes_exactly(
    tiny: Path, chat_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = lamina.load_checkpoint(tiny)
    ref = tmp_path / "ref"
    model, _, result = finetune(_lora_run(tiny, chat_file, ref))
    trained, total = count_trainable(model)
    # r (in + out) per adapted linear: 2 blocks x (q, k, v, o: 32 -> 32; gate, up, down: 32 <-> 64)
    assert trained == expected_trainable(model) == 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 64))
    assert f"{trained:,} of {total:,} parameters train" in capsys.readouterr().err
    assert f"{trained:,} of {total:,}" in result.summary()
    # the base weights are bit-identical; the adapters moved and are saved in PEFT's files
    last, _ = lamina.load_checkpoint(ref / "last")
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in base.state_dict().items())
    assert (ref / "last" / "adapter" / "adapter_config.json").is_file()
    adapted = load_adapter(last, ref / "last" / "adapter")
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        assert torch.equal(adapted.eval()(ids), model.eval()(ids))
        assert not torch.equal(base.eval()(ids), model(ids))
    # exact resume, as for full fine-tuning
    out = tmp_path / "out"
    _stopped_at_step_4(ref, out)
    finetune(_lora_run(tiny, chat_file, out), resume=True)
    _assert_same_run(out, ref)


def _stopped_at_step_4(ref: Path, out: Path) -> None:
    """OUT: the run in REF as if stopped after step 4 (only the step-4 checkpoint is left)."""
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    shutil.rmtree(out / "last")


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def _assert_same_run(out: Path, ref: Path) -> None:
    """The adapter, the step-8 training state (optimizer, scheduler, RNG, adapters) and every logged loss
    of OUT are bit-identical to REF's."""
    a = load_file(str(out / "last" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "last" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = "checkpoints/step-00000008/train_state/state.pt"
    sa = dict(_leaves(torch.load(out / state, weights_only=True)))
    sb = dict(_leaves(torch.load(ref / state, weights_only=True)))
    assert sa.keys() == sb.keys() and any(".optimizer.state." in k for k in sa)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], k
    assert losses(out) == losses(ref) and [s for s, _ in losses(out)] == list(range(1, 9))


def _base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors other than the adapters, each storage once (tied weights)."""
    seen, total = set(), 0
    for k, t in model.state_dict().items():
        if ".lora_" not in k and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def test_qlora_trains_adapters_over_an_int4_base(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    """QLoRA (Dettmers et al. 2023): the frozen base in lamina's int4 format, fp32 adapters on top. The
    held-out loss falls; the base takes under a third of the fp32 base's bytes; the checkpoint holds the
    fp32 base bit for bit and an adapter with the keys, shapes and config of a LoRA run over fp32."""
    gpu = _lora_run(tiny, chat_file, tmp_path / "gpu", device="cuda")
    assert gpu.lora is not None
    gpu.lora.base_weights = "int4"
    with pytest.raises(ConfigError, match=r"train\.device cpu"):  # the int4 kernels are CPU kernels
        finetune(gpu)
    fp_run = _lora_run(tiny, chat_file, tmp_path / "fp", max_steps=2)
    fp_model, _, _ = finetune(fp_run)
    q_run = _lora_run(tiny, chat_file, tmp_path / "q", lr=1e-2, eval_every=1)
    assert q_run.lora is not None
    q_run.lora.base_weights = "int4"
    q_run.sft.samples = 0
    q_model, _, result = finetune(q_run)
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.05  # steps 1 -> 8
    assert any("QLoRA: the frozen base in int4" in n for n in result.notes)
    assert _base_bytes(q_model) < _base_bytes(fp_model) / 3
    # the checkpoint: the fp32 base as it was, and a PEFT adapter like the fp32 LoRA's
    base, _ = lamina.load_checkpoint(tiny)
    last, _ = lamina.load_checkpoint(tmp_path / "q" / "last")
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in base.state_dict().items())
    qa = load_file(str(tmp_path / "q" / "last" / "adapter" / "adapter_model.safetensors"))
    fa = load_file(str(tmp_path / "fp" / "last" / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in qa.items()} == {k: v.shape for k, v in fa.items()}
    assert not any(torch.equal(qa[k], fa[k]) for k in qa if "lora_B" in k)  # trained, not copied
    configs = [
        json.loads((tmp_path / d / "last" / "adapter" / "adapter_config.json").read_text())
        for d in ("q", "fp")
    ]
    assert configs[0] == configs[1]
    # loaded on the fp32 base, the adapter is the QLoRA model's (exactly)
    adapted = load_adapter(last, tmp_path / "q" / "last" / "adapter")
    for name, t in lora_state_dict(q_model).items():
        assert torch.equal(lora_state_dict(adapted)[name], t), name


@pytest.mark.parametrize("base_weights", ["int8", "int4"])
def test_qlora_resumes_exactly(tiny: Path, chat_file: Path, tmp_path: Path, base_weights: str) -> None:
    """A QLoRA run stopped after step 4 and resumed ends with the uninterrupted run's adapter, optimizer
    state and losses, bit for bit (the quantized base is rebuilt from the fp32 one the same way)."""

    def run(out: Path) -> FinetuneRun:
        r = _lora_run(tiny, chat_file, out)
        assert r.lora is not None
        r.lora.base_weights = base_weights  # type: ignore[assignment]
        r.sft.samples = 0
        return r

    ref, out = tmp_path / "ref", tmp_path / "out"
    finetune(run(ref))
    _stopped_at_step_4(ref, out)
    _, _, result = finetune(run(out), resume=True)
    assert any(f"QLoRA: the frozen base in {base_weights}" in n for n in result.notes)
    _assert_same_run(out, ref)
