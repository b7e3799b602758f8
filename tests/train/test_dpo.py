"""Preference tuning equals TRL 1.16 (the pinned reference) on a tiny random Llama and a fixed batch:
DPO losses (sigmoid, IPO, hinge, robust), TRL's logged rewards and the gradient of one step; the reward
model's Bradley-Terry loss and gradient. Then ``lamina finetune --task dpo`` / ``--task reward`` end to
end on a tiny chat model, with and without LoRA, and exact resume."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from interrupting import assert_same_weights  # tests/train/interrupting.py
from tiny_chat import WORDS, tiny_lm, tiny_tokenizer

import lamina
from lamina.checkpoint.hf import config_from_hf, hf_state_dict_from_lamina, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model
from lamina.data.preference import Pair, PreferenceBatches
from lamina.errors import ConfigError, DataError
from lamina.model.lora import LoraConfig, apply_lora, disable_adapters
from lamina.model.transformer import Transformer
from lamina.train.finetune import FinetuneRun, finetune, with_task_head
from lamina.train.preference import DpoConfig, bradley_terry, dpo, dpo_loss, reference, sequence_logps

V, PAD = 101, 2
EXAMPLES = [  # token ids: a shared prompt, completions of different lengths (padding on both sides)
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [10, 1]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 1], "rejected_ids": [14, 15, 16, 1]},
    {"prompt_ids": [20, 21, 22, 23], "chosen_ids": [30, 31, 32, 33, 1], "rejected_ids": [40, 1]},
]


def _llama(seed: int, cls: Any = tf.LlamaForCausalLM, **kw: Any) -> Any:
    torch.manual_seed(seed)
    return cls(
        tf.LlamaConfig(
            vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0,
            eos_token_id=1, pad_token_id=PAD, **kw,
        )
    )  # fmt: skip


def _lamina(hf_model: Any, folder: Path) -> Transformer:
    hf_model.save_pretrained(folder)
    hf, sd = read_hf_folder(folder)
    cfg = config_from_hf(hf)
    return build_model(cfg, state_dict_from_hf(hf, sd, cfg))


def _hf_tokenizer() -> Any:
    """The tiny word-level tokenizer for TRL, its pad id PAD (the reward trainer pools the last non-pad)."""
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend, eos_token="<|im_end|>",
                                     pad_token="<|im_end|>")  # fmt: skip
    assert tok.pad_token_id == PAD
    return tok


def _pairs() -> list[Pair]:
    return [Pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], [True] * len(e["chosen_ids"]),
                 [True] * len(e["rejected_ids"]), f"row {i}") for i, e in enumerate(EXAMPLES)]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The policy and a different reference, as transformers models and as lamina models."""
    policy, ref = _llama(0), _llama(1)  # a reference unlike the policy: rewards far from 0
    tmp = tmp_path_factory.mktemp("dpo")
    return {
        "hf": policy,
        "hf_ref": ref,
        "lamina": _lamina(policy, tmp / "p"),
        "lamina_ref": _lamina(ref, tmp / "r"),
    }


def _trl_dpo(models: dict[str, Any], tmp: Path, loss: str, beta: float, ls: float) -> dict[str, Any]:
    """TRL's DPOTrainer loss, metrics and parameter gradients on EXAMPLES (its own collator)."""
    from datasets import Dataset
    from trl import DPOConfig as TrlDpoConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, ref = copy.deepcopy(models["hf"]), copy.deepcopy(models["hf_ref"])
    args = TrlDpoConfig(output_dir=str(tmp), loss_type=[loss], beta=beta, label_smoothing=ls, report_to=[],
                        use_cpu=True, bf16=False, precompute_ref_log_probs=False)  # fmt: skip
    ds = Dataset.from_dict({"prompt": ["the cat"], "chosen": [" sat"], "rejected": [" ran"]})
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=_hf_tokenizer()
    )
    inputs = DataCollatorForPreference(pad_token_id=PAD)(EXAMPLES)
    trainer.model.train()
    value = trainer.compute_loss(trainer.model, inputs)
    value.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return {"loss": float(value), "grads": grads, "metrics": metrics, "inputs": inputs}


def _hf_grads(model: Transformer) -> dict[str, torch.Tensor]:
    """lamina's gradients under transformers' parameter names."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return hf_state_dict_from_lamina(grads, model.config)


@pytest.mark.parametrize(("loss", "beta", "ls"), [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0),
                                                   ("robust", 0.2, 0.1)])  # fmt: skip
def test_dpo_equals_trl(models: dict[str, Any], tmp_path: Path, loss: str, beta: float, ls: float) -> None:
    ref = _trl_dpo(models, tmp_path, loss, beta, ls)
    batch = PreferenceBatches(_pairs(), len(EXAMPLES), seed=0, pad_id=PAD).collate(range(len(EXAMPLES)))
    for k in ("input_ids", "attention_mask", "completion_mask"):  # the same layout as TRL's collator
        assert torch.equal(batch[k], ref["inputs"][k]), k
    model = copy.deepcopy(models["lamina"]).train()
    cfg = DpoConfig(loss=loss, beta=beta, label_smoothing=ls)  # type: ignore[arg-type]
    value, n = dpo(cfg, reference(models["lamina_ref"], lora=False))(model, batch)
    value.backward()
    assert n == len(EXAMPLES)
    assert abs(float(value) - ref["loss"]) < 1e-5
    with torch.no_grad():
        logps = sequence_logps(model(batch["input_ids"], attention_mask=batch["attention_mask"]),
                               batch["input_ids"], batch["completion_mask"])  # fmt: skip
        ref_logps = reference(models["lamina_ref"], lora=False)(batch)
    _, rewards = dpo_loss(logps, ref_logps, batch["completion_mask"].sum(1), cfg)
    from lamina.train.preference import reward_metrics

    ours = reward_metrics(rewards["chosen"], rewards["rejected"])
    assert set(ours) == set(ref["metrics"])
    for k, v in ref["metrics"].items():
        assert abs(ours[k] - v) < 1e-5, k
    assert abs(ours["rewards/margins"]) > 1e-3  # the check can fail: policy and reference differ
    grads = _hf_grads(model)
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4


def test_conservative_dpo_and_simpo_formulas() -> None:
    """cDPO's label smoothing and SimPO, from their papers (TRL 1.16 keeps neither in DPOTrainer)."""
    logps = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # chosen (2), rejected (2)
    ref = torch.tensor([-3.5, -4.0, -4.5, -2.5])
    lengths = torch.tensor([3, 5, 2, 4])
    lsig = torch.nn.functional.logsigmoid
    loss, rw = dpo_loss(logps, ref, lengths, DpoConfig(beta=0.1, label_smoothing=0.2))
    d = torch.tensor([(-3.0 + 3.5) - (-4.0 + 4.5), (-5.0 + 4.0) - (-2.0 + 2.5)])
    assert torch.allclose(loss, -0.8 * lsig(0.1 * d) - 0.2 * lsig(-0.1 * d))
    assert torch.allclose(rw["chosen"], 0.1 * torch.tensor([0.5, -1.0]))
    loss, rw = dpo_loss(logps, None, lengths, DpoConfig(loss="simpo", beta=2.0, simpo_gamma=0.5))
    z = 2.0 * (torch.tensor([-3.0 / 3, -5.0 / 5]) - torch.tensor([-4.0 / 2, -2.0 / 4])) - 0.5
    assert torch.allclose(loss, -lsig(z))


def test_reward_loss_equals_trl(models: dict[str, Any], tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference as RewardCollator

    hf = _llama(3, tf.LlamaForSequenceClassification, num_labels=1)
    torch.manual_seed(4)
    with torch.no_grad():
        hf.score.weight.normal_(0, 0.5)  # a head that separates rows
    lam = _llama(3)  # the same body as a causal LM, for lamina's import
    lam.model.load_state_dict(hf.model.state_dict())
    model = with_task_head(_lamina(lam, tmp_path / "rm"), "regress", None).train()
    with torch.no_grad():
        model.task_head.classifier.weight.copy_(hf.score.weight)
        model.task_head.classifier.bias.zero_()
    args = TrlRewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                           center_rewards_coefficient=None)  # fmt: skip
    ds = Dataset.from_dict({"chosen": ["the cat"], "rejected": ["a dog"]})
    trainer = RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=_hf_tokenizer())
    pairs = _pairs()
    for p, m in zip(pairs, (0.0, 0.5, -0.25), strict=True):
        p.margin = m
    batch = PreferenceBatches(pairs, len(pairs), seed=0, pad_id=PAD).collate(range(len(pairs)))
    inputs = RewardCollator(pad_token_id=PAD)(
        [
            {"chosen_ids": p.prompt + p.chosen, "rejected_ids": p.prompt + p.rejected, "margin": p.margin}
            for p in pairs
        ]
    )
    for k in ("input_ids", "attention_mask", "margin"):
        assert torch.equal(batch[k], inputs[k]), k
    hf.train()
    ref = trainer.compute_loss(hf, dict(inputs))
    ref.backward()
    value, n = bradley_terry()(model, batch)
    value.backward()
    assert n == len(pairs) and abs(float(value) - float(ref)) < 1e-5
    assert torch.allclose(model.task_head.classifier.weight.grad, hf.score.weight.grad, atol=1e-5)
    assert torch.allclose(model.tok_emb.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-5)


def test_disable_adapters_gives_the_base(models: dict[str, Any]) -> None:
    model = copy.deepcopy(models["lamina"]).eval()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LoraConfig(r=4, init_lora_weights=False))  # adapters that change the output
        adapted = model(x)
        with disable_adapters(model):
            off = model(x)
        again = model(x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.equal(off, base) and torch.equal(again, adapted)


# ----------------------------------------------------------------------------------- finetune end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = tiny_lm(d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    return lamina.save_checkpoint(tmp_path_factory.mktemp("tiny") / "model", lm.model, tokenizer=lm.tokenizer)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs where the chosen answer ends with "red", the rejected with "blue"; strings and messages."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = []
    for i in range(40):
        words = rng.sample(WORDS[:8], 3)
        prompt: Any = " ".join(words)
        chosen: Any = " ".join(reversed(words)) + " red"
        rejected: Any = " ".join(reversed(words)) + " blue"
        if i % 2:
            prompt = [{"role": "user", "content": prompt}]
            chosen, rejected = (
                [{"role": "assistant", "content": chosen}],
                [{"role": "assistant", "content": rejected}],
            )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tiny: Path, prefs: Path, out: Path, task: str, **sections: Any) -> FinetuneRun:
    train = {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "eval_every": 3, "save_every": 3, "log_every": 1,
             "out_dir": str(out), "progress": False, "seed": 0, **sections.pop("train", {})}  # fmt: skip
    return FinetuneRun.from_dict({"task": {"task": task, "data": str(prefs), "max_seq_len": 48},
                                  "init": str(tiny), "train": train, **sections})  # fmt: skip


def _evals(out: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_finetune_dpo_learns_and_resumes(tiny: Path, prefs: Path, tmp_path: Path, lora: bool) -> None:
    extra: dict[str, Any] = {"lora": {"r": 4, "lora_alpha": 8}} if lora else {}
    run = _run(tiny, prefs, tmp_path / "a", "dpo", dpo={"beta": 0.5}, **extra)
    model, _, result = finetune(run)
    evals = _evals(tmp_path / "a")
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(evals[-1])
    assert evals[-1]["rewards/margins"] > 0.05 and evals[-1]["rewards/accuracies"] >= 0.75
    assert result.val_losses[-1][1] < 0.6931  # below log 2, the loss where policy == reference
    if lora:
        assert (tmp_path / "a" / "last" / "adapter" / "adapter_config.json").is_file()
    # interrupted after step 3 (its checkpoint kept, the rest removed), resumed: the same weights
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-00000006")
    shutil.rmtree(b / "last")
    (b / "metrics.jsonl").write_text("")
    resumed, _, _ = finetune(_run(tiny, prefs, b, "dpo", dpo={"beta": 0.5}, **extra), resume=True)
    sa, sb = model.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys() and (not lora or any("lora_B" in k for k in sa))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert_same_weights(tmp_path / "a" / "last", b / "last")


def test_finetune_dpo_precompute_ref_matches(tiny: Path, prefs: Path, tmp_path: Path) -> None:
    a, _, _ = finetune(_run(tiny, prefs, tmp_path / "a", "dpo", train={"max_steps": 3}))
    b, _, _ = finetune(
        _run(tiny, prefs, tmp_path / "b", "dpo", train={"max_steps": 3}, dpo={"precompute_ref": True})
    )
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), n


def test_finetune_reward_model(tiny: Path, prefs: Path, tmp_path: Path) -> None:
    run = _run(tiny, prefs, tmp_path / "rm", "reward", train={"max_steps": 12, "eval_every": 6})
    model, _, _ = finetune(run)
    evals = _evals(tmp_path / "rm")
    assert "accuracy" in evals[-1] and evals[-1]["accuracy"] >= 0.75
    assert model.config.head == "regress" and model.config.n_labels == 1
    loaded = lamina.load(str(tmp_path / "rm" / "last"))
    assert loaded.model.config.head == "regress"


def test_finetune_reward_model_with_lora(tiny: Path, prefs: Path, tmp_path: Path) -> None:
    """LoRA on a reward model: adapters train and the scalar head trains in full (PEFT's modules_to_save,
    as PEFT's SEQ_CLS does); the adapter folder holds the head as PEFT saves it (``score``), the checkpoint
    loads as the trained model, and a resumed run ends with exactly the same adapter and head."""
    from safetensors.torch import load_file

    from lamina.checkpoint.peft import load_adapter
    from lamina.model.lora import count_trainable, expected_trainable
    from lamina.train.preference import load_reward_model, reward_scores

    lora = {"r": 4, "lora_alpha": 8}
    out = tmp_path / "rm"
    model, _, _ = finetune(
        _run(tiny, prefs, out, "reward", train={"max_steps": 12, "eval_every": 6}, lora=lora)
    )
    assert _evals(out)[-1]["accuracy"] >= 0.75
    trained, _ = count_trainable(model)
    assert trained == expected_trainable(model) == 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 64)) + 32 + 1
    adapter = out / "last" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    head = model.task_head.classifier
    assert torch.equal(tensors["base_model.model.score.weight"], head.weight.detach())
    assert torch.equal(tensors["base_model.model.score.bias"], head.bias.detach())
    # the adapter on a fresh reward model (another head) gives the trained model's scores exactly
    torch.manual_seed(1)
    fresh = with_task_head(lamina.load_checkpoint(tiny)[0], "regress", None)
    assert not torch.equal(fresh.task_head.classifier.weight, head.weight)
    ids = torch.tensor([[1, 5, 6, 7, 2], [3, 4, 5, 6, 2]])
    with torch.no_grad():
        assert torch.equal(load_adapter(fresh, adapter).eval()(ids), model.eval()(ids))
    # the checkpoint scores as the trained model (adapter merged: float rounding)
    prompts, completions = ["the cat sat", "a dog ran"], ["sat cat the red", "ran dog a blue"]
    lm = lamina.load(str(out / "last"))
    lm.model = model
    want = reward_scores(lm, prompts, completions)
    got = reward_scores(load_reward_model(str(out / "last")), prompts, completions)
    assert got == pytest.approx(want, abs=1e-5) and want[0] > want[1]
    # resumed from step 6: the same adapter and head
    b = tmp_path / "b"
    shutil.copytree(out, b)
    shutil.rmtree(b / "checkpoints" / "step-00000012")
    shutil.rmtree(b / "last")
    finetune(_run(tiny, prefs, b, "reward", train={"max_steps": 12, "eval_every": 6}, lora=lora), resume=True)
    resumed = load_file(str(b / "last" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == tensors.keys() and all(torch.equal(resumed[k], tensors[k]) for k in tensors)
    # QLoRA: over an int8 base the head stays fp32 and trains; the checkpoint holds it as trained
    q = tmp_path / "q"
    q_lora = {**lora, "base_weights": "int8"}
    qm, _, _ = finetune(_run(tiny, prefs, q, "reward", train={"max_steps": 2, "eval_every": 2}, lora=q_lora))
    qhead = qm.task_head.classifier
    assert qhead.weight.dtype == torch.float32 and qhead.weight.requires_grad
    saved = load_file(str(q / "last" / "model.safetensors"))
    assert torch.equal(saved["task_head.classifier.weight"], qhead.weight.detach())
    q_tensors = load_file(str(q / "last" / "adapter" / "adapter_model.safetensors"))
    assert torch.equal(q_tensors["base_model.model.score.weight"], qhead.weight.detach())


def test_modules_to_save_refused_for_dpo_and_kept_with_the_reward_head(
    tiny: Path, prefs: Path, tmp_path: Path
) -> None:
    """DPO's reference is the policy with its adapters off, which cannot switch whole modules back: a
    modules_to_save run is refused. A reward run's own modules_to_save keeps the score head trainable."""
    from lamina.train.preference import REWARD_HEAD

    lora = {"r": 4, "lora_alpha": 8, "modules_to_save": ["final_norm"]}
    with pytest.raises(ConfigError, match="modules_to_save trains whole modules, but task=dpo"):
        finetune(_run(tiny, prefs, tmp_path / "d", "dpo", lora=lora))
    model, _, _ = finetune(_run(tiny, prefs, tmp_path / "r", "reward", lora=lora, train={"max_steps": 1}))
    head = model.get_submodule(REWARD_HEAD)
    assert all(p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in model.final_norm.parameters())


def test_bad_pairs_named(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "the cat", "chosen": "sat", "rejected": "sat"},
        {"prompt": "the cat", "chosen": "", "rejected": "ran"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl line 1: chosen equals rejected"):
        finetune(_run(tiny, path, tmp_path / "out", "dpo"))
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        DpoConfig(beta=0)


def test_cli_reward_and_dpo(
    tiny: Path, prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lamina.cli.main import main

    common = ["--data", str(prefs), "--init", str(tiny), "--task.max_seq_len", "48", "--train.max_steps", "2",
              "--train.batch_size", "4", "--train.eval_every", "2", "--train.progress", "false"]  # fmt: skip
    assert main(["finetune", "--task", "reward", *common, "--out", str(tmp_path / "rm")]) == 0
    assert main(["finetune", "--task", "dpo", *common, "--dpo.loss", "ipo", "--dpo.beta", "0.5",
                 "--lora.r", "2", "--out", str(tmp_path / "dpo")]) == 0  # fmt: skip
    run = (tmp_path / "dpo" / "run.yaml").read_text()
    assert "loss: ipo" in run and "beta: 0.5" in run and "lora:" in run
    assert "rewards/margins" in _evals(tmp_path / "dpo")[-1] and "accuracy" in _evals(tmp_path / "rm")[-1]
    assert main(["finetune", "--task", "dpo", *common, "--dpo.beta", "0", "--out", str(tmp_path / "x")]) != 0
    assert "dpo.beta=0.0 must be positive" in capsys.readouterr().err


def test_precomputed_reference_follows_the_runs_precision(
    tiny: Path, prefs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dpo.precompute_ref computes in the precision the trainer decided (lamina.train.precision.run_precision),
    not one of its own: a run that started in fp32 (auto without native bf16) and resumes where bf16 is
    native keeps fp32, its precomputed reference too."""
    import lamina.train.preference as preference

    finetune(_run(tiny, prefs, tmp_path, "dpo", train={"max_steps": 1}))  # auto: fp32 (conftest), recorded
    autocast: list[bool] = []
    real = preference.reference

    def spied(model: Any, lora: bool) -> Any:
        ref = real(model, lora)

        def call(batch: Any) -> Any:
            autocast.append(torch.is_autocast_enabled("cpu"))
            return ref(batch)

        return call

    monkeypatch.setattr(preference, "reference", spied)
    monkeypatch.setenv("LAMINA_NATIVE_BF16", "1")
    run = _run(tiny, prefs, tmp_path, "dpo", train={"max_steps": 2}, dpo={"precompute_ref": True})
    finetune(run, resume=True)
    assert autocast and not any(autocast)
