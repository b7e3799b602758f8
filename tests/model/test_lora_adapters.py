"""Using LoRA adapters for inference: ``--lora`` on generate / chat (unmerged by default, as PEFT and vLLM
run them; ``--merge-lora`` merges) against PEFT's own outputs, and several adapters over one base in one
batch (``MultiLoraLinear``): each row gets exactly what its adapter gives alone."""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path
from typing import Any

import peft  # the test extra installs it: a missing reference fails, never skips
import pytest
import torch
import transformers as tf
from tiny_chat import tiny_tokenizer

import lamina
from lamina.checkpoint.convert import convert
from lamina.checkpoint.peft import add_serving_adapter, load_adapter, load_with_adapter
from lamina.cli.main import main
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Engine
from lamina.model.lora import LoraLinear, MultiLoraLinear, lora_layers, multi_lora_layers, select_adapters
from lamina.model.quant import Int8Linear

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random HF Llama with the word-level chat tokenizer ("hf") and two adapters PEFT wrote:
    "a" (r=4, every linear layer) and "b" (r=2, rsLoRA, q/v only)."""
    root = tmp_path_factory.mktemp("lora_adapters")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=tok.eos_token_id, pad_token_id=0, tie_word_embeddings=False,
        )
    )  # fmt: skip
    hf.save_pretrained(root / "hf")
    tok.save(root / "hf")
    for name, seed, kw in [
        ("a", 1, {"r": 4, "lora_alpha": 8, "target_modules": ALL}),
        ("b", 2, {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}),
    ]:
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(init_lora_weights=False, **kw)  # type: ignore[arg-type]
        model = peft.get_peft_model(tf.LlamaForCausalLM.from_pretrained(root / "hf"), cfg)
        with torch.no_grad():  # smaller updates: the adapted models still say different things
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)
        model.save_pretrained(root / name)
    return {"hf": root / "hf", "a": root / "a", "b": root / "b"}


def _peft(folders: dict[str, Path], adapter: str) -> Any:
    base = tf.LlamaForCausalLM.from_pretrained(folders["hf"])
    return peft.PeftModel.from_pretrained(base, folders[adapter]).eval()


IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 3]])


def test_unmerged_and_merged_adapters_give_pefts_logits(folders: dict[str, Path], tmp_path: Path) -> None:
    ref = _peft(folders, "a")
    unmerged = load_with_adapter(folders["hf"], folders["a"], merge=False).model
    merged = load_with_adapter(folders["hf"], folders["a"]).model
    assert lora_layers(unmerged) and not lora_layers(merged)
    with torch.no_grad():
        want, base = ref(IDS).logits, lamina.load(folders["hf"]).model(IDS)
        assert (want - base).abs().max() > 1e-2  # the adapter changes the logits
        assert (unmerged(IDS) - want).abs().max() < 1e-5
        assert (merged(IDS) - want).abs().max() < 1e-5
    # a lamina LoRA checkpoint folder (base weights + adapter/) names its adapter too
    shutil.copytree(folders["a"], tmp_path / "ckpt" / "adapter")
    again = load_with_adapter(folders["hf"], tmp_path / "ckpt", merge=False).model
    with torch.no_grad():
        assert (again(IDS) - want).abs().max() < 1e-5
    # unmerged over an int8 base (QLoRA-style inference): the adapter stays in fp32 beside the int8 weights
    q = load_with_adapter(folders["hf"], folders["a"], weights="int8", merge=False).model
    layer = q.get_submodule("blocks.0.attn.q_proj")
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Int8Linear)
    with torch.no_grad():
        assert (q(IDS).float() - want).abs().max() < 0.05


def test_a_merged_adapter_takes_torchs_dtype_names(folders: dict[str, Path]) -> None:
    # before: any dtype but "fp32" and "bf16" cast the merged model to fp16 ("bfloat16", even "float32")
    for name, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32), ("fp16", torch.float16)):
        net = load_with_adapter(folders["hf"], folders["a"], dtype=name).model  # type: ignore[arg-type]
        assert next(net.parameters()).dtype == want, name


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None) -> str:
    if stdin is not None:
        import sys

        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        assert main(argv) == 0
    finally:
        if stdin is not None:
            sys.stdin = old
    return capsys.readouterr().out


def test_generate_and_chat_take_lora(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hf, a = str(folders["hf"]), str(folders["a"])
    tok = tiny_tokenizer()
    prompt = "the cat sat on"
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = _peft(folders, "a").generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id
        )
    want = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    flags = ["--raw", "--max-new-tokens", "6", "--quiet"]
    text = _run(["generate", hf, prompt, *flags, "--lora", a], capsys)
    assert text.strip() == want.strip()
    assert _run(["generate", hf, prompt, *flags, "--lora", a, "--merge-lora"], capsys) == text
    assert _run(["generate", hf, prompt, *flags], capsys) != text  # the base says something else
    ckpt = tmp_path / "ckpt"  # a lamina LoRA checkpoint (base weights + adapter/) decodes with its adapter
    convert(folders["hf"], ckpt)
    shutil.copytree(folders["a"], ckpt / "adapter")
    assert _run(["generate", str(ckpt), prompt, *flags], capsys) == text
    # serving or converting it must not silently drop the adapter (its top-level weights are the base)
    from lamina.cli.generate import load_from_args
    from lamina.cli.main import build_parser

    args = build_parser("serve").parse_args(["serve", str(ckpt)])
    with pytest.raises(ConfigError, match="--lora-modules NAME="):
        load_from_args(args, str(ckpt), lora=True, adaptable=True)
    with pytest.raises(ConfigError, match="--merge-lora"):
        convert(ckpt, tmp_path / "out")
    merged = convert(ckpt, tmp_path / "merged", merge_lora=str(ckpt / "adapter"))
    assert _run(["generate", str(merged), prompt, *flags], capsys) == text
    chat = ["chat", hf, "--temperature", "0", "--max-new-tokens", "5", "--lora", a]
    reply = _run(chat, capsys, stdin="hello world\n")
    assert reply and _run([*chat, "--merge-lora"], capsys, stdin="hello world\n") == reply
    assert main(["generate", hf, prompt, "--merge-lora"]) != 0
    assert "give --lora too" in capsys.readouterr().err


@pytest.fixture(scope="module")
def multi(folders: dict[str, Path]) -> dict[int, Any]:
    """The base with both adapters for per-row use (key 0), and each adapter alone, unmerged (1, 2)."""
    model = lamina.load(folders["hf"]).model
    assert add_serving_adapter(model, "a", folders["a"]) == 1
    assert add_serving_adapter(model, "b", folders["b"]) == 2
    return {
        0: model,
        1: load_with_adapter(folders["hf"], folders["a"], merge=False).model,
        2: load_with_adapter(folders["hf"], folders["b"], merge=False).model,
    }


def test_rows_of_one_batch_use_their_own_adapters(multi: dict[int, Any], folders: dict[str, Path]) -> None:
    model = multi[0]
    layers = multi_lora_layers(model)
    assert len(layers) == 2 * 7  # a adapts every linear of both blocks; b only q/v, which a also adapts
    ids = torch.cat([IDS, IDS[:1]])  # rows: adapter 1, the base, adapter 2
    with torch.no_grad():
        with select_adapters(layers, [1, 0, 2]):
            mixed = model(ids)
        plain = model(ids)  # outside select_adapters: the base
        base = lamina.load(folders["hf"]).model(ids)
        assert torch.equal(plain, base)
        assert (mixed[0] - multi[1](ids[:1])[0]).abs().max() < 1e-6
        assert torch.equal(mixed[1], base[1])
        assert (mixed[2] - multi[2](ids[2:])[0]).abs().max() < 1e-6
        assert (mixed[2] - base[2]).abs().max() > 1e-2


def test_a_mixed_batch_gives_each_request_its_alone_result(multi: dict[int, Any]) -> None:
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 3], [4, 5, 4, 5], [5, 6, 7, 8, 9, 10, 11], [12]]
    adapters = [0, 1, 2, 1, 0, 2]
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    sampled = GenerationConfig(temperature=0.8, seed=3, max_new_tokens=10, ignore_eos=True)
    beams = GenerationConfig(num_beams=3, max_new_tokens=6)
    configs = [greedy, greedy, sampled, beams, sampled, greedy]

    def alone(p: list[int], k: int, cfg: GenerationConfig) -> list[int]:
        e = Engine(multi[k], max_batch_size=2)
        (s,) = e.submit(p, cfg)
        while e.has_work():
            e.step()
        return s.tokens

    engine = Engine(multi[0], max_batch_size=16)
    seqs = [engine.submit(p, c, adapter=k)[0] for p, k, c in zip(prompts, adapters, configs, strict=True)]
    while engine.has_work():
        engine.step()
    want = [alone(p, k, c) for p, k, c in zip(prompts, adapters, configs, strict=True)]
    assert [s.tokens for s in seqs] == want
    assert len({tuple(alone(prompts[1], k, greedy)) for k in (0, 1, 2)}) == 3  # the adapters differ
    with pytest.raises(ConfigError, match="adapter=3"):
        engine.submit([3], greedy, adapter=3)


def test_adapters_that_cannot_go_together_are_refused(
    multi: dict[int, Any], folders: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="already has LoRA"):
        load_adapter(multi[0], folders["a"])
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        add_serving_adapter(multi[1], "x", folders["b"])
    fresh = lamina.load(folders["hf"]).model
    add_serving_adapter(fresh, "a", folders["a"])
    with pytest.raises(ConfigError, match="named 'a'"):
        add_serving_adapter(fresh, "a", folders["b"])
    fused = lamina.load(folders["hf"], weights="int8").model
    with pytest.raises(ConfigError, match="fused"):
        add_serving_adapter(fused, "a", folders["a"])
    layer = copy.deepcopy(fresh.get_submodule("blocks.0.attn.q_proj"))
    assert isinstance(layer, MultiLoraLinear)
    with pytest.raises(ConfigError, match="another base"):
        layer.add_adapter(5, torch.zeros(2, 3), torch.zeros(48, 2), 1.0)
