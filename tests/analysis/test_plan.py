"""``lamina plan``: a suggested config of about the optimal size, the parameter formula equal to the
config's own count, counts with suffixes, one budget at a time, and the CLI report."""

from __future__ import annotations

import pytest
import torch

from lamina.analysis.plan import PlanConfig, _llama_params, _llama_shape, parse_count, plan, suggest_config
from lamina.config import ModelConfig
from lamina.errors import ConfigError


@pytest.mark.parametrize(("n_layers", "d_model"), [(2, 128), (30, 576), (12, 832), (80, 8192), (5, 1280)])
def test_parameter_formula_equals_the_config(n_layers: int, d_model: int) -> None:
    cfg = ModelConfig.preset("llama-tiny", **_llama_shape(n_layers, d_model, 49152))
    assert _llama_params(n_layers, d_model, 49152) == cfg.n_params


@pytest.mark.parametrize("params", [20e6, 135e6, 1.3e9, 70e9])
def test_suggested_config_has_the_size(params: float) -> None:
    cfg = suggest_config(params, 49152, 2048, 64.0)
    assert cfg.n_params == pytest.approx(params, rel=0.10)
    assert cfg.d_model % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0  # type: ignore[operator]
    with pytest.raises(ConfigError, match="embeddings alone"):
        suggest_config(1e5, 49152, 2048, 64.0)


def test_counts_and_budget_choice() -> None:
    assert parse_count("70B") == 70e9 and parse_count("135M") == 135e6 and parse_count("2.5e9") == 2.5e9
    with pytest.raises(ValueError, match="not a count"):
        parse_count("70X")
    with pytest.raises(ConfigError, match="exactly one of"):
        plan(PlanConfig(flops=1e20, params=1e6))
    with pytest.raises(ConfigError, match="exactly one of"):
        plan(PlanConfig())


def test_hours_use_the_throughput() -> None:
    p = plan(PlanConfig(hours=10, devices=2, flops_per_second=1e12, vocab_size=256))
    assert p.flops == pytest.approx(10 * 3600 * 2e12)
    assert "h x 2 device(s)" in p.text()


def test_cli_report(capsys: pytest.CaptureFixture[str]) -> None:
    from lamina.cli.main import main

    assert main(["plan", "--flops", "5.76e23"]) == 0
    out = capsys.readouterr().out
    for name in ("chinchilla-1", "chinchilla-2", "chinchilla-3", "besiroglu", "kaplan"):
        assert name in out
    assert "--model.n_layers" in out and "KV cache" in out
    assert main(["plan", "--params", "135M"]) == 0
    assert "135M parameters" in capsys.readouterr().out


@pytest.mark.parametrize("tie", [True, False])
def test_weight_bytes_match_converted_models(tie: bool) -> None:
    import copy

    from lamina.analysis.plan import FORMATS, weight_bytes
    from lamina.model.quant import PackedLinear, convert_weights
    from lamina.model.transformer import Transformer

    cfg = ModelConfig.preset("llama-tiny", vocab_size=2048, n_layers=2, d_model=128, n_heads=4, n_kv_heads=2,
                             tie_embeddings=tie)  # fmt: skip
    base = Transformer(cfg)
    for fmt in FORMATS:
        model = convert_weights(copy.deepcopy(base), fmt)
        seen: set[int] = set()
        total = 0
        for t in [*model.parameters(), *model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        # fp32's prepacked linears hold their weight as an opaque oneDNN tensor (no parameter, no buffer)
        total += sum(
            4 * m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear)
        )
        assert weight_bytes(cfg, fmt) == pytest.approx(total, rel=0.02), fmt


def _measured_peak(cfg: ModelConfig, batch: int, opt: str, checkpointing: bool) -> int:
    """Peak bytes of the second fp32 training step (optimizer states exist), by torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.activation_checkpointing = checkpointing
    params = model.parameters()
    optim = (
        torch.optim.AdamW(params, lr=1e-3)
        if opt == "adamw"
        else torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    )
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        optim.step()
        optim.zero_grad()

    step()
    tracker = MemTracker()
    tracker.track_external(model, optim)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.parametrize(
    ("shape", "opt", "checkpointing"),
    [((2, 128, 2048, True), "adamw", False), ((2, 128, 2048, True), "sgd", True),
     ((4, 256, 2048, True), "adamw", True), ((3, 384, 8192, False), "adamw", False)],
)  # fmt: skip
def test_training_memory_within_15_percent_of_measured(shape: tuple, opt: str, checkpointing: bool) -> None:
    from lamina.analysis.plan import training_memory

    n_layers, d_model, vocab, tie = shape
    cfg = ModelConfig.preset("llama-tiny", n_layers=n_layers, d_model=d_model, n_heads=d_model // 32,
                             n_kv_heads=d_model // 64, vocab_size=vocab, max_seq_len=64, tie_embeddings=tie)  # fmt: skip
    want = _measured_peak(cfg, 4, opt, checkpointing)
    got = training_memory(cfg, 4, 64, opt, checkpointing).peak
    assert got == pytest.approx(want, rel=0.15)
