"""PEFT adapter files: lamina's adapters load in PEFT with the same logits, PEFT's load in lamina, merges
agree with ``merge_and_unload``, on tiny random Llama and GPT-2 models exported by ``transformers``."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft  # the test extra installs it: a missing reference fails, never skips
import pytest
import torch
import transformers as tf

import lamina
from lamina.checkpoint.convert import convert
from lamina.checkpoint.hf import hf_state_dict_from_lamina
from lamina.checkpoint.peft import hf_module_name, load_adapter, load_with_adapter, save_adapter
from lamina.cli.main import main
from lamina.errors import CheckpointError, ConfigError
from lamina.model.lora import LoraConfig, LoraLinear, apply_lora, lora_layers, lora_state_dict, merge_lora
from lamina.model.transformer import Transformer

V = 101


def _llama() -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0,
            eos_token_id=1, pad_token_id=2,
        )
    )  # fmt: skip


def _gpt2() -> tf.PreTrainedModel:
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    )


FAMILIES: dict[str, Callable[[], tf.PreTrainedModel]] = {"llama": _llama, "gpt2": _gpt2}
PEFT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=list(FAMILIES))
def base(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Transformer]:
    """(family, HF folder, the lamina model loaded from it)."""
    family = request.param
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(family) / "hf"
    FAMILIES[family]().save_pretrained(folder)
    return family, folder, lamina.load(folder).model


def _hf(family: str, folder: Path) -> tf.PreTrainedModel:
    return type(FAMILIES[family]()).from_pretrained(folder).eval()


def _lamina_lora(model: Transformer, **kw: object) -> Transformer:
    torch.manual_seed(1)
    return apply_lora(
        copy.deepcopy(model), LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("targets", ["all-linear", "partial"])
def test_lamina_adapter_loads_in_peft(
    base: tuple[str, Path, Transformer], tmp_path: Path, targets: str
) -> None:
    family, folder, model = base
    if targets == "partial":  # some modules of some blocks: PEFT gets a regex of exact module names
        pick = ["blocks.1.mlp.down_proj", "attn.o_proj"] + (
            ["attn.[qkv]_proj"] if family == "gpt2" else ["q_proj"]
        )
        ours = _lamina_lora(model, target_modules=pick, use_rslora=True)
    else:
        ours = _lamina_lora(model)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(folder)
    theirs = peft.PeftModel.from_pretrained(_hf(family, folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        mine, ref, plain = ours(IDS), theirs(IDS).logits, model(IDS)
    assert (mine - plain).abs().max() > 1e-3  # the adapter does change the logits
    assert (mine - ref).abs().max() < 1e-5
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
        for n, _ in theirs.named_modules()
        if n.endswith(".lora_A.default")
    }
    assert adapted == {
        hf_module_name(n, model.config) for n in lora_layers(ours)
    }  # PEFT adapts exactly these


def test_peft_adapter_loads_in_lamina_and_merges_alike(
    base: tuple[str, Path, Transformer], tmp_path: Path
) -> None:
    family, folder, model = base
    torch.manual_seed(2)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False, use_rslora=True, target_modules=PEFT_TARGETS[family],
        fan_in_fan_out=family == "gpt2",
    )  # fmt: skip
    theirs = peft.get_peft_model(_hf(family, folder), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(model), tmp_path / "peft")
    assert all(isinstance(m, LoraLinear) for m in lora_layers(ours).values()) and lora_layers(ours)
    with torch.no_grad():
        assert (ours(IDS) - model(IDS)).abs().max() > 1e-3
        assert (ours(IDS) - theirs(IDS).logits).abs().max() < 1e-5
        merged_ref = theirs.merge_and_unload().state_dict()
        merged = hf_state_dict_from_lamina(merge_lora(ours, unload=True).state_dict(), ours.config)
    assert merged.keys() <= merged_ref.keys()
    assert max((merged[k] - merged_ref[k]).abs().max().item() for k in merged) < 1e-6


def test_resave_replaces_and_bad_folders_are_named(
    base: tuple[str, Path, Transformer], tmp_path: Path
) -> None:
    family, _, model = base
    ours = _lamina_lora(model)
    save_adapter(ours, tmp_path / "a")
    save_adapter(ours, tmp_path / "a")  # an adapter folder is replaced
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_adapter(copy.deepcopy(model), tmp_path)
    with pytest.raises(ConfigError, match="already has LoRA"):
        load_adapter(ours, tmp_path / "a")
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "b")
    other = Transformer(model.config.__class__(**{**vars(model.config), "d_ff": model.config.d_ff * 2}))
    with pytest.raises(CheckpointError, match="another base"):
        load_adapter(other, tmp_path / "a")
    if family == "gpt2":
        with pytest.raises(CheckpointError, match="c_attn"):
            save_adapter(_lamina_lora(model, target_modules="q_proj"), tmp_path / "c")


def test_load_with_adapter_and_convert_merge_lora(
    base: tuple[str, Path, Transformer], tmp_path: Path
) -> None:
    family, folder, model = base
    ours = _lamina_lora(model)
    save_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        want = ours(IDS)
        lm = load_with_adapter(folder, tmp_path / "adapter")
        assert not lora_layers(lm.model) and (lm.model(IDS) - want).abs().max() < 1e-5
        convert(folder, tmp_path / "lam", merge_lora=str(tmp_path / "adapter"))
        assert (lamina.load(tmp_path / "lam").model(IDS) - want).abs().max() < 1e-5
        assert (
            main(
                [
                    "convert",
                    str(folder),
                    "--merge-lora",
                    str(tmp_path / "adapter"),
                    "--out",
                    str(tmp_path / "hf2"),
                    "--to",
                    "hf",
                ]
            )
            == 0
        )
        assert (_hf(family, tmp_path / "hf2")(IDS).logits - want).abs().max() < 1e-5


def test_other_families_are_refused(tmp_path: Path) -> None:
    bert = lamina.ModelConfig(
        arch="encoder", vocab_size=V, n_layers=1, d_model=32, n_heads=4, norm="layernorm", norm_placement="post",
        emb_norm=True, pos_encoding="learned", bias=True, activation="gelu", head="none", type_vocab_size=2,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="Llama and GPT-2"):
        save_adapter(_lamina_lora(Transformer(bert)), tmp_path / "x")


def test_qlora_adapter_saves_and_loads_on_the_full_precision_base(
    base: tuple[str, Path, Transformer], tmp_path: Path
) -> None:
    """Trained over an int8 base, an adapter is an ordinary PEFT adapter: it loads on the fp32 base."""
    _, _, model = base
    q = _lamina_lora(model, base_weights="int8")
    save_adapter(q, tmp_path / "q")
    full = load_adapter(copy.deepcopy(model), tmp_path / "q")
    ours, theirs = lora_state_dict(q), lora_state_dict(full)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_peft_reward_adapter_with_score_head_loads(tmp_path: Path) -> None:
    """A PEFT SEQ_CLS adapter (LoRA on every linear layer + the ``score`` head in modules_to_save) made on
    transformers' LlamaForSequenceClassification loads on the same lamina reward model (head=regress;
    lamina's head bias, which transformers' score lacks, at zero) and scores within 1e-6 of PEFT."""
    from lamina.checkpoint.hf import hf_config_from_lamina
    from lamina.config import ModelConfig
    from lamina.train.finetune import with_task_head

    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    body = Transformer(cfg)
    hf_cfg = {k: v for k, v in hf_config_from_lamina(cfg).items() if k != "architectures"}
    hf = tf.LlamaForSequenceClassification(tf.LlamaConfig(**hf_cfg, num_labels=1, pad_token_id=0))
    weights = hf_state_dict_from_lamina(body.state_dict(), cfg)
    assert hf.load_state_dict(weights, strict=False).missing_keys == ["score.weight"]
    theirs = peft.get_peft_model(
        hf, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path / "rm")
    ours = with_task_head(body, "regress", None)
    with torch.no_grad():
        ours.task_head.classifier.bias.zero_()
    load_adapter(ours, tmp_path / "rm")
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 10]])
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits.squeeze(-1)
        got = ours.eval()(ids).squeeze(-1)
    assert (got - want).abs().max() < 1e-6 and want.abs().min() > 0


def test_a_module_peft_cannot_save_whole_is_refused_before_training(
    base: tuple[str, Path, Transformer],
) -> None:
    """GPT-2's q_proj is one third of PEFT's c_attn: saved whole it would overwrite k and v. The refusal
    comes from check_savable (run before training), not from the first checkpoint."""
    from lamina.checkpoint.peft import check_savable

    family, _, model = base
    whole = "blocks.0.attn.q_proj"
    lora = _lamina_lora(model, modules_to_save=[whole], target_modules=["blocks.0.mlp.*"])
    if family == "gpt2":
        with pytest.raises(CheckpointError, match=r"part of PEFT's transformer\.h\.0\.attn\.c_attn"):
            check_savable(lora)
    else:
        check_savable(lora)  # Llama's q_proj is a module of its own


def test_load_with_adapter_compiles_the_merged_model_as_load_does(
    base: tuple[str, Path, Transformer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile=True`` on the merged model takes ``lamina.load``'s path: the compiled decode step
    (``lamina.model.aot``; recorded here, not compiled) where it covers the model, else torch.compile."""
    from lamina.model import aot

    _, folder, model = base
    save_adapter(_lamina_lora(model), tmp_path / "adapter")
    seen: list[Transformer] = []
    monkeypatch.setattr(aot, "attach_decode_step", lambda net, *args, **kwargs: seen.append(net))
    net = load_with_adapter(folder, tmp_path / "adapter", weights="fp32", compile=True).model
    if aot.supported(net) is None:
        assert seen == [net] and net._compiled_call_impl is None
    else:
        assert not seen and net._compiled_call_impl is not None
