"""``lamina finetune --task grpo`` end to end on a tiny chat model: the intended effect (a reward that is
easy to satisfy, the share of the word "red" in a completion, goes up clearly in 20 steps; the same run
with the reward's weight negated drives it down, so a flipped loss sign fails), the logs and samples, a
reward model and LoRA + KL + several iterations per generation through the CLI, and the one-line errors
for reward functions that do not import or return the wrong thing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tiny_chat import WORDS, tiny_lm

import lamina
from lamina.errors import ConfigError
from lamina.train.finetune import FinetuneRun, finetune
from lamina.train.grpo import GrpoConfig, RewardError, call_rewards, load_reward

REWARDS = """
def red(prompts, completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.split().count("red") / max(len(t.split()), 1) for t in texts]


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


def breaks(prompts, completions, **kwargs):
    raise ValueError("no score today")
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("grpo")
    lm = tiny_lm(d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for i in range(16):
        text = " ".join(rng.sample(WORDS[:8], 3))
        rows.append({"prompt": text if i % 2 else [{"role": "user", "content": text}], "topic": i})
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "rewards.py").write_text(REWARDS)
    return {
        "tiny": lamina.save_checkpoint(tmp / "model", lm.model, tokenizer=lm.tokenizer),
        "prompts": tmp / "prompts.jsonl",
        "rewards": tmp / "rewards.py",
    }


def _run(files: dict[str, Path], out: Path, weight: float = 1.0, steps: int = 20) -> FinetuneRun:
    grpo = {"reward_funcs": [f"{files['rewards']}:red"], "reward_weights": [weight], "num_generations": 4,
            "max_completion_length": 8}  # fmt: skip
    train = {"max_steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
             "out_dir": str(out), "progress": False, "seed": 0}  # fmt: skip
    return FinetuneRun.from_dict({"task": {"task": "grpo", "data": str(files["prompts"]), "max_seq_len": 64},
                                  "init": str(files["tiny"]), "grpo": grpo, "train": train})  # fmt: skip


def _records(out: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def _red(out: Path) -> list[float]:
    return [r["rewards/red/mean"] for r in _records(out)]


@pytest.mark.slow
def test_grpo_raises_the_reward(files: dict[str, Path], tmp_path: Path) -> None:
    finetune(_run(files, tmp_path / "up"))
    up = _red(tmp_path / "up")
    assert len(up) == 20
    first, last = sum(up[:5]) / 5, sum(up[-5:]) / 5
    assert last - first > 0.2, up  # measured: 0.10 -> 0.66
    rec = _records(tmp_path / "up")[-1]
    # one record per step, written by the trainer's MetricsLog: the loss and the GRPO values together
    assert {"reward", "reward_std", "completions/mean_length", "clip_ratio", "loss", "grad_norm"} <= set(rec)
    samples = [json.loads(line) for line in (tmp_path / "up" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 21)) and {"completion", "reward"} <= set(samples[0])
    assert (tmp_path / "up" / "rewards.png").stat().st_size > 1000  # the curve, in the run folder
    # the reward negated: the policy moves away from "red" (a flipped loss sign would raise it)
    finetune(_run(files, tmp_path / "down", weight=-1.0, steps=10))
    down = _red(tmp_path / "down")
    assert sum(down[-3:]) / 3 < min(first, 0.1) and down[-1] < up[9] - 0.1, down


def test_grpo_cli_reward_model_lora_kl(files: dict[str, Path], tmp_path: Path) -> None:
    """A reward model (trained for 2 steps) next to a function, weights, LoRA (the reference: the base with
    adapters off), beta > 0 and 2 iterations per generation, through the CLI."""
    from lamina.cli.main import main

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": w, "chosen": "red red", "rejected": "blue"}) + "\n"
                             for w in WORDS[:8]))  # fmt: skip
    common = ["--init", str(files["tiny"]), "--task.max_seq_len", "48", "--train.max_steps", "2",
              "--train.batch_size", "4", "--train.progress", "false"]  # fmt: skip
    assert (
        main(["finetune", "--task", "reward", "--data", str(prefs), *common, "--out", str(tmp_path / "rm")])
        == 0
    )
    rm = str(tmp_path / "rm" / "last")
    assert main(["finetune", "--task", "grpo", "--data", str(files["prompts"]), *common,
                 "--grpo.reward_funcs", f"[{files['rewards']}:red, {rm}]", "--grpo.reward_weights", "[1.0, 0.5]",
                 "--grpo.num_generations", "2", "--grpo.max_completion_length", "6", "--grpo.beta", "0.1",
                 "--grpo.num_iterations", "2", "--lora.r", "2", "--train.log_every", "1",
                 "--out", str(tmp_path / "g")]) == 0  # fmt: skip
    recs = _records(tmp_path / "g")
    assert [r["step"] for r in recs] == [1, 2] and {
        "rewards/red/mean",
        "rewards/rm/mean",
        "kl",
        "loss",
    } <= set(recs[0])
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: the policy is the reference
    assert (tmp_path / "g" / "last" / "adapter" / "adapter_config.json").is_file()
    assert "reward_funcs:" in (tmp_path / "g" / "run.yaml").read_text()
    # the same reward model scores a JSONL file from the CLI (lamina score), as the GRPO reward does
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "completion": "red red"}) + "\n"
                     + json.dumps({"prompt": [{"role": "user", "content": "the cat"}], "completion": "blue"}) + "\n")  # fmt: skip
    assert main(["score", rm, "--input", str(pairs), "--out", str(tmp_path / "s.jsonl")]) == 0
    scores = [json.loads(line)["score"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    expected = load_reward(rm)(prompts=["the cat", "the cat"], completions=["red red", "blue"])
    assert scores == pytest.approx(expected, abs=1e-6) and scores[0] != scores[1]
    assert main(["score", str(files["tiny"]), "--input", str(pairs)]) == 1  # not a reward model: one line


def test_reward_errors_name_the_function(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'nosuchmodule' does not import .*fix: give module:function"):
        load_reward("nosuchmodule:score")
    with pytest.raises(ConfigError, match=r"has no function 'nope'"):
        load_reward(f"{files['rewards']}:nope")
    with pytest.raises(ConfigError, match=r"neither module:function .* not a model"):
        load_reward(str(tmp_path / "no_model_here"))
    fns = {n: load_reward(f"{files['rewards']}:{n}") for n in ("wrong_length", "breaks")}
    with pytest.raises(RewardError, match=r"'w' returned 1 values for 2 completions; fix: return one float"):
        call_rewards([("w", fns["wrong_length"])], ["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"'b' raised ValueError: no score today; fix the function"):
        call_rewards([("b", fns["breaks"])], ["p"], ["a"])
    with pytest.raises(RewardError, match=r"returned nan for completion 0"):
        call_rewards([("n", lambda prompts, completions, **kw: [float("nan")])], ["p"], ["a"])
    scores = call_rewards([("ok", lambda prompts, completions, **kw: [None, 2])], ["p", "p"], ["a", "b"])
    assert scores.isnan()[0, 0] and scores[1, 0] == 2.0  # None: not applicable (TRL)
    with pytest.raises(ConfigError, match=r"2 weights for 1 reward_funcs"):
        GrpoConfig(reward_funcs=["m:f"], reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"batch_size=6 completions do not split into groups of"):
        run = _run(files, tmp_path / "x", steps=1)
        run.train.batch_size = 6
        finetune(run)
    run = _run(files, tmp_path / "y", steps=1)
    run.grpo.reward_funcs = [f"{files['rewards']}:breaks"]
    with pytest.raises(RewardError, match="breaks"):
        finetune(run)


def test_grpo_resume_is_exact(files: dict[str, Path], tmp_path: Path) -> None:
    """Interrupted after step 2 of 4 (2 micro-batches a step, beta > 0), resumed: the same weights (the
    generation of step 3 is made again from the same policy and the same seeds)."""
    import shutil

    import torch

    def run(out: Path) -> FinetuneRun:
        r = _run(files, out, steps=4)
        r.train.batch_size, r.train.grad_accum_steps, r.train.save_every = 8, 2, 2
        r.grpo.beta = 0.1
        return r

    a, _, _ = finetune(run(tmp_path / "a"))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-00000004")
    shutil.rmtree(b / "last")
    resumed, _, _ = finetune(run(b), resume=True)
    for (name, x), y in zip(a.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert [r["step"] for r in _records(b)] == [1, 2, 3, 4]

    def samples(folder: Path) -> list[str]:
        return (folder / "samples.jsonl").read_text().splitlines()

    assert samples(b) == samples(tmp_path / "a")  # steps 3-4 once, not again after those of the first run


def test_unscorable_completions_follow_trl() -> None:
    """A completion no reward applies to (every reward None) is left out of the logged reward, its std and
    the group baseline, and gets advantage 0; a partly None row counts None as 0 (nansum), as TRL 1.16."""
    import torch

    from lamina.train.grpo import group_advantages, reward_totals

    nan = float("nan")
    rewards = torch.tensor([[1.0, nan], [nan, nan], [0.0, 2.0], [3.0, 1.0]])
    weights = torch.tensor([1.0, 0.5])
    total = reward_totals(rewards, weights)
    assert total[0] == 1.0 and total.isnan()[1] and total[2] == 1.0 and total[3] == 3.5
    assert float(torch.nanmean(total)) == pytest.approx((1.0 + 1.0 + 3.5) / 3)  # not / 4 with a 0
    adv = group_advantages(rewards, 4, "group", weights)
    kept = torch.tensor([1.0, 1.0, 3.5])
    expected = (kept - kept.mean()) / (kept.std() + 1e-4)
    assert adv[1] == 0.0 and torch.allclose(adv[[0, 2, 3]], expected)


@pytest.mark.slow
def test_grpo_shortens_smollm2_answers(smollm2_path: Path, tmp_path: Path) -> None:
    """The short version of the README's SmolLM2 run (real weights, offline): 4 steps of LoRA GRPO at a
    high lr on ``lamina.data.grpo_tasks`` (closeness to a 6-token answer), then 4 seeded samples for each
    of the 16 prompts. Measured (1 thread, train.seed 1337 / 1): their mean reward 0.63 / 0.46, the base
    model's (adapters off, the same seeds) 0.055; with lr = 0 the weights do not move, so the bar fails.
    ~22 s CPU."""
    import torch

    from lamina.config import GenerationConfig
    from lamina.data.grpo_tasks import THINGS, length_target, write_prompts
    from lamina.data.preference import encode_prompt
    from lamina.generate.engine import generate_ids

    run = FinetuneRun.from_dict({
        "task": {"task": "grpo", "data": str(write_prompts(tmp_path / "prompts.jsonl")), "max_seq_len": 64},
        "init": str(smollm2_path), "lora": {"r": 16, "target_modules": ["blocks.2[2-9].*"]},
        "grpo": {"reward_funcs": ["lamina.data.grpo_tasks:length_target"], "num_generations": 4,
                 "max_completion_length": 12},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1.5e-2, "schedule": "constant", "warmup_steps": 0,
                  "log_every": 1, "precision": "fp32", "out_dir": str(tmp_path / "run"), "progress": False},
    })  # fmt: skip
    model, tok, _ = finetune(run)
    assert _records(tmp_path / "run")[0]["reward"] < 0.25  # step 1 samples the base: answers past 12 tokens
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"Name a {t}."}]) for t in THINGS]
    cfg = GenerationConfig(n=4, temperature=1.0, max_new_tokens=12, seed=7)
    with torch.no_grad():
        seqs = generate_ids(model.eval(), prompts, cfg, tok.eos_token_ids)
    ids = [s.tokens + ([s.stop_token] if s.stop_token is not None else []) for s in seqs]
    mean = sum(length_target([], [None] * len(ids), ids)) / len(ids)
    assert mean >= 0.3, [tok.decode(s.tokens) for s in seqs]  # the base: 0.055


@pytest.mark.slow
def test_two_processes_log_and_train_as_one(files: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 processes x 4 prompts' completions = one process with 2 micro-batches (the same prompts
    and seeds): the same weights, and the same logged rewards, std and lengths (each process's completions
    gathered, as TRL), KL and clip ratio."""
    import os
    import subprocess
    import sys

    import torch
    import yaml
    from safetensors.torch import load_file

    def run(out: Path) -> FinetuneRun:
        r = _run(files, out, steps=2)
        r.train.batch_size, r.grpo.beta, r.train.precision = 8, 0.1, "fp32"
        return r

    one = run(tmp_path / "one")
    one.train.grad_accum_steps = 2
    finetune(one)
    two = run(tmp_path / "two")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(lamina.__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lamina",
           "finetune", "--config", str(tmp_path / "two.yaml")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    keys = ("reward", "reward_std", "rewards/red/std", "completions/mean_length", "kl", "clip_ratio", "loss")
    got = [r[k] for r in _records(tmp_path / "two") for k in keys]
    assert len(got) == 2 * len(keys)
    assert got == pytest.approx([r[k] for r in _records(tmp_path / "one") for k in keys], abs=1e-5)
    a, b = (load_file(str(tmp_path / d / "last" / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_step_one_in_bf16_has_ratio_one_and_no_kl(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora: bool
) -> None:
    """The old and reference log-probs are computed in the run's precision, as the policy's in the loss: at
    step 1 (policy = old = reference: a frozen copy, or the adapters off) the ratio is exactly 1 and the KL
    exactly 0 in bf16 too (they were fp32 next to the loss's bf16: KL ~1e-3)."""
    import lamina.train.grpo as grpo_module

    seen: list[tuple[float, float]] = []
    real = grpo_module.grpo_loss

    def spy(logps: Any, adv: Any, mask: Any, old: Any, ref: Any, *args: Any, **kwargs: Any) -> Any:
        m = mask.bool()
        d = logps.detach()
        seen.append((float((d - old)[m].abs().max()), float((d - ref)[m].abs().max())))
        return real(logps, adv, mask, old, ref, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    run = _run(files, tmp_path / "run", steps=1)
    run.train.batch_size, run.grpo.beta, run.grpo.num_iterations, run.train.precision = 8, 0.1, 2, "bf16"
    if lora:
        run.lora = FinetuneRun.from_dict({**run.to_dict(), "lora": {"r": 2}}).lora
    finetune(run)
    assert seen == [(0.0, 0.0)]
    assert _records(tmp_path / "run")[0]["kl"] == 0.0


def test_compile_generation_decodes_through_the_attached_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``grpo.compile_generation``: generation runs on the policy's ``MergedCopy`` (refreshed before each
    generation: an optimizer's in-place update reaches it); its decode step (``lamina.model.aot``; a
    counting stand-in here, which runs the eager step: compiling takes minutes) is attached once, at the
    first generation, and runs every one-token step of the generations (never the prompt, never
    training); the completions equal the eager engine's for the same seed, and their texts the engine's
    streamed ones; a model the step does not cover generates eagerly, with one line on stderr."""
    import torch

    import lamina.checkpoint.load as load_module
    from lamina.model import aot
    from lamina.model.transformer import DECODE_STEP
    from lamina.train.grpo import GenerationBatches

    lm = tiny_lm(d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    model, tok = lm.model.train(), lm.tokenizer
    prompts = [f"{WORDS[i]} {WORDS[i + 1]}" for i in range(4)]
    ids = [tok.encode(p) for p in prompts]
    seen: list[tuple[int, bool]] = []  # (tokens per row, training) of each call of the step

    bound: list[dict[str, torch.Tensor]] = []  # what each generation binds as the step's packed weights

    class Runner:
        def load_constants(self, constants: dict[str, torch.Tensor], **kw: Any) -> None:
            bound.append(dict(constants))

    class Step:
        def __init__(self, net: Any) -> None:
            self.net, self.runner = net, Runner()

        def applies(self, x: torch.Tensor, cache: Any) -> bool:
            return cache is not None and x.shape[1] == 1 and not torch.is_grad_enabled()

        def __call__(self, x: torch.Tensor, cache: Any) -> Any:
            seen.append((x.shape[1], model.training or self.net.training))
            with aot.decode_step_off(self.net):
                return self.net(x, cache=cache)

    attached: list[Any] = []

    def attach(net: Any) -> None:
        attached.append(net)
        net.__dict__.setdefault("_inference_copies", {})[DECODE_STEP] = Step(net)

    monkeypatch.setattr(load_module, "attach_decode_step_or_warn", attach)

    def source(compile_generation: bool) -> GenerationBatches:
        cfg = GrpoConfig(reward_funcs=["zero"], num_generations=4, max_completion_length=6, samples=0,
                         compile_generation=compile_generation)  # fmt: skip
        zero = ("zero", lambda completions, **kw: [0.0] * len(completions))
        return GenerationBatches(model, tok, prompts, ids, [{}] * 4, cfg, [zero], None, 8, 1, 0, tmp_path,
                                 [tok.eos_token_id])  # fmt: skip

    eager = [source(False).batch(i)["input_ids"] for i in range(2)]
    assert not attached and not seen
    compiled = source(True)
    got = [compiled.batch(i)["input_ids"] for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(eager, got, strict=True))
    assert attached == [compiled._copy.model] and attached[0] is not model
    assert seen and all(s == (1, False) for s in seen)
    assert model.training  # restored after generating
    model(torch.tensor([ids[0]])).sum().backward()  # training's forward: not the step
    assert all(s == (1, False) for s in seen)
    # the texts the rewards get: as the engine streams them
    from lamina.config import GenerationConfig
    from lamina.generate.engine import generate_ids
    from lamina.train.grpo import completion_text

    cfg = GenerationConfig(n=4, temperature=1.0, max_new_tokens=6, seed=3)
    with torch.no_grad():
        streamed = generate_ids(model.eval(), ids, cfg, [tok.eos_token_id], tokenizer=tok)
    model.train()
    per_prompt = [p for p in ids for _ in range(4)]
    assert [completion_text(tok, p, s.tokens) for p, s in zip(per_prompt, streamed, strict=True)] == [
        s.text for s in streamed
    ]
    # the copy's linears: oneDNN's linear on prepacked weights in the compiled step, bound at each generation
    from lamina.model.aot import StepLinear
    from lamina.model.layers import packed_linear

    copy = compiled._copy.model
    linears = {n for n, m in copy.named_modules() if isinstance(m, StepLinear)}
    assert linears and not any(type(m) is torch.nn.Linear for m in copy.modules())
    assert len(bound) == 2 and set(bound[0]) == {f"model.{n}.packed" for n in linears}
    x = torch.randn(3, 1, copy.lm_head.in_features)
    got = packed_linear(x, bound[-1]["model.lm_head.packed"], None)
    assert (got - torch.nn.functional.linear(x, model.lm_head.weight)).abs().max() < 1e-5
    with torch.no_grad():  # an optimizer's in-place step: the next generation samples from it
        model.lm_head.weight.mul_(0.5)
    compiled.generating_model()
    assert torch.equal(copy.lm_head.weight, model.lm_head.weight)
    repacked = {k for k, t in bound[-1].items() if t is not bound[-2][k]}
    assert "model.lm_head.packed" in repacked and len(repacked) < len(linears)  # only what changed
    got = packed_linear(x, bound[-1]["model.lm_head.packed"], None)
    assert (got - torch.nn.functional.linear(x, model.lm_head.weight)).abs().max() < 1e-5

    monkeypatch.setattr(aot, "supported", lambda net: "LoRA")
    source(True).batch(0)
    assert attached == [copy] and "generating eagerly (LoRA)" in capsys.readouterr().err
