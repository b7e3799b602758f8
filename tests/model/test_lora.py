"""LoRA adapters: exact trainable counts, gradients only in adapters, merge/unmerge, int8/int4 bases."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.generate.engine import greedy_decode
from lamina.model.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_trainable,
    expected_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from lamina.model.quant import Int4Linear, Int8Linear
from lamina.model.transformer import Transformer

D, H, KV, HD, FF, L = 64, 4, 2, 16, 96, 2


def _cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=101, max_seq_len=64, n_layers=L, d_model=D, n_heads=H, n_kv_heads=KV, d_ff=FF,
        activation="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(_cfg()).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))


def _lora(base: Transformer, **kw: object) -> Transformer:
    torch.manual_seed(2)
    return apply_lora(copy.deepcopy(base), LoraConfig(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("r", [1, 4, 16])
def test_trainable_count_is_r_times_in_plus_out_of_each_linear(base: Transformer, r: int) -> None:
    model = _lora(base, r=r, target_modules="all-linear")
    # independently of the model: q, k, v, o, gate, up, down of each block
    shapes = [(D, H * HD), (D, KV * HD), (D, KV * HD), (H * HD, D), (D, FF), (D, FF), (FF, D)]
    want = L * sum(r * (i + o) for i, o in shapes)
    trainable, total = count_trainable(model)
    print(f"r={r}: trainable {trainable} of {total}")
    assert trainable == want == expected_trainable(model)
    assert total == base.num_params() + want
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
    }


def test_targets_by_glob_and_errors(base: Transformer) -> None:
    model = _lora(base, target_modules=["attn.q_proj", "blocks.1.mlp.down_proj"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear)) == [
        "blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "blocks.1.mlp.down_proj"
    ]  # fmt: skip
    assert not isinstance(model.lm_head, LoraLinear)  # all-linear and globs leave the output head alone
    with pytest.raises(ConfigError, match="matches no linear layer"):
        _lora(base, target_modules=["attn.qq_proj"])
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(r=0)


def test_default_init_starts_as_the_base_and_gaussian_too(base: Transformer, ids: torch.Tensor) -> None:
    ref = base(ids)
    for init in (True, "gaussian"):
        assert torch.equal(_lora(base, init_lora_weights=init)(ids), ref)
    assert (_lora(base, init_lora_weights=False)(ids) - ref).abs().max() > 1e-3


def test_scaling_and_rslora() -> None:
    assert LoraConfig(r=16, lora_alpha=32).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_only_adapters_change_in_training(base: Transformer, ids: torch.Tensor) -> None:
    model = _lora(base, r=4, lora_dropout=0.1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_merge_unmerge_and_unload(base: Transformer, ids: torch.Tensor) -> None:
    model = _lora(base, r=4, init_lora_weights=False).eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        assert (model(ids) - adapted).abs().max() < 1e-5
        unmerge_lora(model)
        assert (model(ids) - adapted).abs().max() < 1e-5
        q = model.blocks[0].attn.q_proj
        assert (
            isinstance(q, LoraLinear)
            and (q.base_layer.weight - base.blocks[0].attn.q_proj.weight).abs().max() < 1e-6
        )
        merge_lora(model, unload=True)
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        assert model.state_dict().keys() == base.state_dict().keys()
        assert (model(ids) - adapted).abs().max() < 1e-5


def test_merged_copy_generates_as_the_adapted_model_and_follows_its_updates(
    base: Transformer, ids: torch.Tensor
) -> None:
    """``MergedCopy``: a plain model (no wrappers, no gradients) computing the adapted model's logits;
    ``refresh`` brings in-place updates (an adapter, a trainable norm) in without moving its storage, and
    copies only what changed."""
    from lamina.model.lora import MergedCopy

    model = _lora(base, r=4, init_lora_weights=False).eval()
    gen = MergedCopy(model)
    plain = gen.refresh()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules()) and plain is not model
    assert not plain.blocks[0].attn.q_proj.weight.requires_grad
    with torch.no_grad():
        assert (plain(ids) - model(ids)).abs().max() < 1e-5
        model.blocks[0].attn.q_proj.lora_B.weight.mul_(-2.0)
        model.final_norm.weight.add_(0.5)
        pointers = [t.data_ptr() for t in plain.parameters()]
        before = {n: t.clone() for n, t in plain.named_parameters()}
        assert (plain(ids) - model(ids)).abs().max() > 1e-3  # stale until refreshed
        gen.refresh()
        assert [t.data_ptr() for t in plain.parameters()] == pointers
        assert (plain(ids) - model(ids)).abs().max() < 1e-5
    changed = {n for n, t in plain.named_parameters() if not torch.equal(t, before[n])}
    assert changed == {"blocks.0.attn.q_proj.weight", "final_norm.weight"}
    fused = MergedCopy(model, fuse=True)  # q/k/v and gate/up as one linear each, refreshed into slices
    with torch.no_grad():
        assert fused.refresh().blocks[0].attn.qkv_proj is not None
        assert (fused.model(ids) - model(ids)).abs().max() < 1e-5
        model.blocks[1].attn.v_proj.lora_A.weight.mul_(3.0)
        model.blocks[1].mlp.up_proj.lora_B.weight.mul_(-1.0)
        assert (fused.refresh()(ids) - model(ids)).abs().max() < 1e-5
    # a compiled step traced from contiguous weights is never loaded for another layout (aot.step_key)
    from lamina.model.aot import step_key

    other = copy.deepcopy(plain)
    other.blocks[0].attn.q_proj.weight.data = other.blocks[0].attn.q_proj.weight.data.t().contiguous().t()
    assert step_key(other) != step_key(plain) == step_key(copy.deepcopy(plain))


def test_merged_copy_sees_replaced_tensors_adapter_flags_and_swapped_wrappers(
    base: Transformer, ids: torch.Tensor
) -> None:
    """``MergedCopy.refresh`` tells a change by tensor object, version, data pointer and dtype (a tensor
    put in through ``p.data = t`` keeps the parameter's id and version), and follows a LoRA layer's
    ``disabled`` flag and ``scaling`` and a wrapper swapped in after the copy was made."""
    from lamina.model.lora import MergedCopy, disable_adapters, wrap_linear

    model = _lora(base, r=4, init_lora_weights=False, target_modules=["attn.q_proj"]).eval()
    gen = MergedCopy(model, fuse=True)

    def gap() -> float:  # the copy's largest logit difference from the model's after a refresh
        with torch.no_grad():
            return float((gen.refresh()(ids) - model(ids)).abs().max())

    assert gap() < 1e-5
    q = model.blocks[0].attn.q_proj
    assert isinstance(q, LoraLinear)
    b, norm = q.lora_B.weight, model.final_norm.weight
    versions = (b._version, norm._version)
    b.data, norm.data = b.data * -2.0, norm.data + 0.5
    assert (b._version, norm._version) == versions  # the same objects, the same versions: new values
    assert gap() < 1e-5
    with disable_adapters(model):
        assert gap() < 1e-5
    assert gap() < 1e-5
    q.scaling *= 3.0
    assert gap() < 1e-5
    torch.manual_seed(3)
    wrap_linear(model, "blocks.1.attn.k_proj", LoraConfig(r=2, init_lora_weights=False))
    assert gap() < 1e-5


def test_state_dict_round_trip(base: Transformer, ids: torch.Tensor) -> None:
    a = _lora(base, r=4, init_lora_weights=False)
    b = _lora(base, r=4)
    load_lora_state_dict(b, lora_state_dict(a))
    assert torch.equal(a(ids), b(ids))
    with pytest.raises(ConfigError, match="do not match"):
        load_lora_state_dict(_lora(base, r=4, target_modules="q_proj"), lora_state_dict(a))


def test_kv_cache_decoding_unchanged(base: Transformer) -> None:
    """The engine decodes a LoRA model (adapters live) exactly as its merged copy."""
    model = _lora(base, r=4, init_lora_weights=False).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    live = greedy_decode(model, prompts, max_new_tokens=6)
    merged = greedy_decode(merge_lora(copy.deepcopy(model), unload=True), prompts, max_new_tokens=6)
    assert live == merged


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_base_backward_matches_dequantized_weights(
    base: Transformer, ids: torch.Tensor, fmt: str
) -> None:
    """QLoRA-style: the frozen base is int8/int4; the adapters' gradients equal those of a model whose
    bf16 base holds the same (dequantized) weights, so backward flows right through the quantized matmul."""
    q = _lora(base, r=4, init_lora_weights=False, base_weights=fmt)
    assert q.weight_format == fmt
    kinds = {type(m.base_layer) for m in q.modules() if isinstance(m, LoraLinear)}
    assert kinds == {Int8Linear if fmt == "int8" else Int4Linear}
    # reference: the same base as plain bf16 linears holding the dequantized weights
    ref = copy.deepcopy(q)
    for m in ref.modules():
        if isinstance(m, LoraLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False, dtype=torch.bfloat16)
            lin.weight.data.copy_(m.base_layer.dequantize())  # type: ignore[operator]
            lin.requires_grad_(False)
            m.base_layer = lin
    grads = []
    for model in (q, ref):
        model.train()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))  # type: ignore[union-attr]
    assert grads[0].abs().max() > 0
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 0.05, rel  # bf16 activations: the two paths round differently
    trainable, _ = count_trainable(q)
    assert trainable == expected_trainable(q)
    with pytest.raises(ConfigError, match="int8/int4 base"):
        merge_lora(q)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_head_passes_gradients_to_the_adapters(ids: torch.Tensor, fmt: str) -> None:
    """An untied head is quantized too and stays outside the adapters; on short rows its integer kernel
    has no derivative, yet the adapters below get the gradient of a head holding its dequantized weight."""
    torch.manual_seed(0)
    untied = Transformer(dataclasses.replace(_cfg(), tie_embeddings=False)).eval()
    q = _lora(untied, r=4, init_lora_weights=False, base_weights=fmt)
    assert isinstance(q.lm_head, Int8Linear | Int4Linear)
    ref = copy.deepcopy(q)
    head = nn.Linear(D, 101, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    head.weight.data.copy_(q.lm_head.dequantize())
    ref.lm_head = head
    grads = []
    for model in (q, ref):
        model.train()
        model.loss(ids[:, :5], ids[:, 1:6]).backward()  # 5 tokens a row: the head's integer kernel
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))  # type: ignore[union-attr]
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 0.05  # bf16 activations round differently


def test_fused_or_inference_only_model_refused(base: Transformer) -> None:
    from lamina.model.quant import convert_weights

    fused = convert_weights(copy.deepcopy(base), "bf16")
    with pytest.raises(ConfigError, match="fused"):
        apply_lora(fused, LoraConfig())
    w8a8 = convert_weights(copy.deepcopy(base), "w8a8", fuse=False)
    with pytest.raises(ConfigError, match=r"weights='w8a8' is an inference-only layout .* without weights="):
        apply_lora(w8a8, LoraConfig())


def test_config_from_text_as_flags_and_yaml_give_it() -> None:
    from lamina.fields import build

    cfg = build(
        LoraConfig, {"r": "16", "target_modules": "[q_proj, v_proj]", "init_lora_weights": "gaussian"}
    )
    assert (cfg.r, cfg.target_modules, cfg.init_lora_weights) == (16, ["q_proj", "v_proj"], "gaussian")
    assert build(
        LoraConfig, {"target_modules": "all-linear", "init_lora_weights": "false"}
    ).target_modules == ["all-linear"]
    with pytest.raises(ConfigError):
        build(LoraConfig, {"base_weights": "int3"})


def test_qlora_refuses_a_temp_folder_without_room_for_the_fp32_base(
    base: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp32 base is spilled to $TMPDIR before quantizing: a folder without room is named up front."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(ConfigError, match=r"QLoRA keeps the fp32 base on disk .* point TMPDIR"):
        _lora(base, r=4, base_weights="int8")
