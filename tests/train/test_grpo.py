"""GRPO's advantages, loss, KL and gradient equal TRL 1.16's GRPOTrainer on fixed completions and rewards
(generation replaced by the fixed completions; two reward functions with weights; loss_type, scale_rewards,
beta and epsilon set explicitly) on a tiny random Llama, lamina's copy loaded from the same folder."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_dpo import _hf_tokenizer, _lamina, _llama  # tests/train/test_dpo.py

from lamina.checkpoint.hf import hf_state_dict_from_lamina
from lamina.train.grpo import group_advantages, grpo_loss

G = 4
R1 = [0.1, 0.5, 0.9, 0.3, 1.0, 1.0, 0.0, 0.2]
R2 = [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
WEIGHTS = [1.0, 0.5]
PROMPTS = [[5, 6, 7]] * G + [[11, 12]] * G
COMPLETIONS = [
    [8, 9, 1],
    [10, 1],
    [13, 14, 15, 16],
    [3, 1],
    [20, 21, 1],
    [22, 1],
    [23, 24, 25, 26, 27, 1],
    [28, 1],
]
BETA, EPS, MAX_LEN = 0.04, 0.2, 6


@pytest.fixture(scope="module", params=["grpo", "bnpo"])
def trl_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    tmp = tmp_path_factory.mktemp("grpo")
    _llama(0).save_pretrained(tmp / "policy")
    ref = _llama(1)  # a reference unlike the policy: the KL term is not zero

    def f1(completions: list[Any], **kw: Any) -> list[float]:
        return R1[: len(completions)]

    def f2(completions: list[Any], **kw: Any) -> list[float]:
        return R2[: len(completions)]

    args = GRPOConfig(
        output_dir=str(tmp / "out"), report_to=[], use_cpu=True, bf16=False, num_generations=G,
        per_device_train_batch_size=len(R1), beta=BETA, loss_type=request.param, scale_rewards="group",
        reward_weights=WEIGHTS, max_completion_length=MAX_LEN, epsilon=EPS, use_bias_correction_kl=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(tmp / "policy"), reward_funcs=[f1, f2], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog"]}),
                          processing_class=_hf_tokenizer())  # fmt: skip
    add_fused_lm_head(ref)
    trainer.ref_model = ref.eval()
    trainer._generate = lambda prompts: (PROMPTS, COMPLETIONS, None, ["x"] * len(R1), None, {}, None, None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": "the cat"}] * G + [{"prompt": "a dog"}] * G)
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    kl = trainer._metrics["train"]["kl"][-1]
    return {"loss_type": request.param, "out": out, "loss": float(loss), "kl": kl, "grads": grads,
            "policy": _lamina(_llama(0), tmp / "p2"), "ref": _lamina(_llama(1), tmp / "r2")}  # fmt: skip


def _completion_logps(model: torch.nn.Module, out: dict[str, Any]) -> torch.Tensor:
    """Per-token log-probs (B, Tc) of the completion tokens after the (left-padded) prompts."""
    x = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    tc = out["completion_ids"].shape[1]
    logits = model(x, attention_mask=mask)[:, -tc - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_advantages_equal_trl(trl_run: dict[str, Any]) -> None:
    rewards = torch.tensor([R1, R2]).T
    ours = group_advantages(rewards, G, "group", torch.tensor(WEIGHTS))
    assert torch.allclose(ours, trl_run["out"]["advantages"], atol=1e-6)
    assert ours.abs().max() > 0.5


def test_loss_kl_and_gradient_equal_trl(trl_run: dict[str, Any]) -> None:
    out = trl_run["out"]
    model = copy.deepcopy(trl_run["policy"]).train()
    logps = _completion_logps(model, out)
    with torch.no_grad():
        ref_logps = _completion_logps(trl_run["ref"], out)
    assert torch.allclose(ref_logps * out["completion_mask"], out["ref_per_token_logps"] * out["completion_mask"],
                          atol=1e-5)  # fmt: skip
    loss, metrics = grpo_loss(logps, out["advantages"], out["completion_mask"], None, ref_logps, BETA, EPS,
                              loss_type=trl_run["loss_type"], max_completion_length=MAX_LEN)  # fmt: skip
    loss.backward()
    assert abs(float(loss) - trl_run["loss"]) < 1e-5
    assert abs(metrics["kl"] - trl_run["kl"]) < 1e-5 and metrics["kl"] > 1e-3
    grads = hf_state_dict_from_lamina({n: p.grad for n, p in model.named_parameters()}, model.config)
    for name, g in trl_run["grads"].items():
        bad = (grads[name] - g).abs().amax(-1).nonzero().flatten().tolist() if g.dim() > 1 else []
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), (
            name,
            bad[:10],
            (grads[name] - g).abs().max(),
        )


def test_clipping_and_batch_scaling() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-1.0, -0.5]])  # ratios e^0.5 (clipped for A > 0) and e^-0.5 (A < 0)
    loss, m = grpo_loss(logps, torch.tensor([1.0, -1.0]), torch.ones(2, 2), old, epsilon=0.2)
    assert m["clip_ratio"] == 0.5
    assert torch.isclose(loss, torch.tensor((-(1.2 + 1.0) / 2 + (0.8 + 1.0) / 2) / 2))
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), 2, "batch")
    assert torch.allclose(
        adv, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / (torch.tensor([1.0, 2.0, 3.0, 5.0]).std() + 1e-4)
    )
