"""GGUF export (lamina/checkpoint/gguf_export.py): lamina's quantizers against gguf.quants, round trips
lamina -> GGUF -> lamina (exact for f32) and GGUF -> lamina -> GGUF (``keep``: bit-identical), refusals,
and the files run in real llama.cpp (node-llama-cpp's prebuilt CPU binaries, driven by
tests/checkpoint/llama_cpp_greedy.mjs) with lamina's greedy tokens.

node-llama-cpp is installed by ``bash scripts/setup.sh --test`` (or here, on first use) into
``$LAMINA_NODE_DIR`` (default ``~/.cache/lamina-node``); those tests skip only where Node.js or npm is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lamina
from lamina.checkpoint.gguf import read_gguf
from lamina.checkpoint.gguf_export import export_gguf, quantize
from lamina.config import ModelConfig
from lamina.errors import CheckpointError, ConfigError
from lamina.model.transformer import Transformer

pytestmark = pytest.mark.filterwarnings("ignore:activation='gelu' \\(exact\\):UserWarning")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers like 12 and 345 appear, and so do "
    "punctuation marks; questions? Answers! def main(): return 0\n"
) * 20


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained by lamina (as ``lamina demo`` trains one), with a chat template."""
    from lamina.tokenizer import Tokenizer

    return Tokenizer.train(
        [TEXT], vocab_size=300, show_progress=False, chat_template="{{ messages[0]['content'] }}"
    )


def tiny_model(tokenizer: Any, family: str, **overrides: Any) -> Transformer:
    """A random demo-shaped decoder: ``gpt2`` (learned positions, LayerNorm, GELU) or ``llama`` (RoPE,
    RMSNorm, SwiGLU, GQA). A larger init_std than training uses, so greedy choices have clear margins."""
    torch.manual_seed(0)
    base: dict[str, Any] = dict(
        vocab_size=320, max_seq_len=128, n_layers=2, d_model=64, n_heads=4, init_std=0.2
    )
    if family == "llama":
        base |= dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2,
                     tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6)  # fmt: skip
    else:
        base |= dict(activation="gelu_tanh")
    return Transformer(ModelConfig(**(base | overrides))).eval()


def logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# -- quantizers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantizers_write_the_bytes_gguf_quants_writes(quant: str) -> None:
    import gguf
    from gguf import quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 256)) * rng.uniform(1e-4, 4, (48, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block (d = 0)
    x[1, :32] = 0.5  # a constant block
    x[2, :32] = np.float32(0.49999997)  # roundf's classic trap
    x[3, :] = np.linspace(-3, 3, 256, dtype=np.float32)  # ties between levels
    x[4, :32] = np.float32(1e-30)  # subnormal scales
    qtype = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[quant]
    ref = quants.quantize(x, getattr(gguf.GGMLQuantizationType, qtype))
    mine = quantize(torch.from_numpy(x), quant)
    assert mine.shape == ref.shape
    assert mine.tobytes() == ref.tobytes()


def test_quantize_refuses_rows_that_are_not_whole_blocks() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize(np.zeros((2, 48), dtype=np.float32), "q8_0")


# -- round trips -------------------------------------------------------------------------------------------


class _Exports(dict):  # type: ignore[type-arg]
    """SmolLM2 exported on first use per quant type, once per session (shared with the llama.cpp tests)."""

    def __init__(self, model: Any, folder: Path) -> None:
        super().__init__()
        self.model, self.folder = model, folder

    def __missing__(self, quant: str) -> Path:
        self[quant] = export_gguf(self.model, self.folder / f"smollm2-{quant}.gguf", quant=quant)  # type: ignore[arg-type]
        return self[quant]


@pytest.fixture(scope="session")
def smollm2_exports(lamina_smollm2: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``smollm2_exports[quant]``: SmolLM2 as a GGUF file of that type, written when a test first asks."""
    return _Exports(lamina_smollm2, tmp_path_factory.mktemp("gguf_export"))


PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2, 198, 1, 520, 9531, 198]


def test_smollm2_f32_round_trip_gives_the_same_logits(lamina_smollm2: Any, smollm2_exports: dict) -> None:
    back = lamina.load(smollm2_exports["f32"])
    assert torch.equal(logits(back.model, PROMPT), logits(lamina_smollm2.model, PROMPT))
    assert back.tokenizer.encode("Hello, world! 123") == lamina_smollm2.tokenizer.encode("Hello, world! 123")
    assert back.tokenizer.chat_template == lamina_smollm2.tokenizer.chat_template
    assert back.generation.eos_token_ids == lamina_smollm2.generation.eos_token_ids
    assert back.model.config == lamina_smollm2.model.config


@pytest.mark.parametrize("quant,bound", [("f16", 0.01), ("q8_0", 0.05), ("q4_1", 0.3)])
def test_smollm2_quantized_round_trip_stays_within_the_quantization_error(
    lamina_smollm2: Any, smollm2_exports: dict, quant: str, bound: float
) -> None:
    ref = logits(lamina_smollm2.model, PROMPT)
    got = logits(lamina.load(smollm2_exports[quant]).model, PROMPT)
    rel = float((got - ref).norm() / ref.norm())  # measured: f16 8e-4, q8_0 1.7e-2, q4_1 6.8e-2
    print(f"{quant}: relative logit error {rel:.2e}, top-1 agreement "
          f"{float((got.argmax(-1) == ref.argmax(-1)).float().mean()):.2f}")  # fmt: skip
    assert 0 < rel < bound


def test_keep_re_exports_an_imported_gguf_bit_identical(smollm2_path: Path, smollm2_exports: dict) -> None:
    src, out = read_gguf(smollm2_path), read_gguf(smollm2_exports["keep"])
    assert list(out.tensors) == list(src.tensors)
    kinds = {src.tensors[n].qtype_name for n in src.tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= kinds  # SmolLM2's mix: Q4_1 blocks, a Q8_0 token embedding
    for name, info in src.tensors.items():
        assert (out.tensors[name].qtype, out.tensors[name].shape) == (info.qtype, info.shape), name
        assert np.array_equal(out.raw_tensor(name), src.raw_tensor(name)), name
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        "general.file_type",
    ):
        assert out.metadata[key] == src.metadata[key]


def test_keep_refuses_weights_changed_since_loading(bpe_tokenizer: Any, tmp_path: Path) -> None:
    q8 = export_gguf(
        tiny_model(bpe_tokenizer, "llama"), tmp_path / "q8.gguf", quant="q8_0", tokenizer=bpe_tokenizer
    )
    lm = lamina.load(q8)
    assert export_gguf(lm, tmp_path / "same.gguf", quant="keep").exists()
    with torch.no_grad():
        lm.model.blocks[1].mlp.up_proj.weight[0, 0] += 1.0  # as a merged adapter or fine-tuning would
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight.* changed"):
        export_gguf(lm, tmp_path / "x.gguf", quant="keep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf", "same.gguf"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_model_f32_round_trip_is_exact(bpe_tokenizer: Any, family: str, tmp_path: Path) -> None:
    model = tiny_model(bpe_tokenizer, family)
    path = export_gguf(model, tmp_path / "m.gguf", quant="f32", tokenizer=bpe_tokenizer)
    assert read_gguf(path).architecture == family
    back = lamina.load(path)
    ids = bpe_tokenizer.encode("def main(): return 12")
    assert torch.equal(logits(back.model, ids), logits(model, ids))
    assert back.tokenizer.encode(TEXT[:200]) == bpe_tokenizer.encode(TEXT[:200])
    assert back.tokenizer.chat_template == bpe_tokenizer.chat_template


def test_llama_with_head_dim_biases_and_linear_rope_scaling_round_trips(
    bpe_tokenizer: Any, tmp_path: Path
) -> None:
    model = tiny_model(bpe_tokenizer, "llama", head_dim=8, bias=True, rope_scaling="linear", rope_factor=2.0)
    path = export_gguf(model, tmp_path / "m.gguf", quant="f32", tokenizer=bpe_tokenizer)
    meta = read_gguf(path).metadata
    assert (meta["llama.attention.key_length"], meta["llama.rope.scaling.factor"]) == (8, 2.0)
    back = lamina.load(path)
    ids = bpe_tokenizer.encode("quick brown fox")
    assert torch.equal(logits(back.model, ids), logits(model, ids))


# -- refusals: one line, nothing left at the output path ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides,knob",
    [
        (dict(arch="encoder"), "arch='encoder'"),
        (dict(arch="encoder-decoder", pos_encoding="relative", norm="rmsnorm"), "arch='encoder-decoder'"),
        (dict(norm_placement="post"), "post-LN"),
        (dict(pos_encoding="sinusoidal"), "sinusoidal"),
        (dict(pos_encoding="alibi"), "alibi"),
        (dict(activation="relu"), "activation='relu'"),
        (dict(scale_embeddings=True), "scale_embeddings"),
    ],
)
def test_refuses_what_llama_cpp_cannot_express(
    bpe_tokenizer: Any, tmp_path: Path, overrides: dict, knob: str
) -> None:
    model = Transformer(ModelConfig(vocab_size=320, n_layers=1, d_model=32, n_heads=2, **overrides))
    with pytest.raises(CheckpointError) as e:
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert knob in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_model_without_a_tokenizer_and_an_existing_file(bpe_tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model(bpe_tokenizer, "gpt2")
    with pytest.raises(CheckpointError, match="without a tokenizer"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="was not loaded from a GGUF file"):
        export_gguf(model, tmp_path / "m.gguf", quant="keep", tokenizer=bpe_tokenizer)
    with pytest.raises(ConfigError, match="quant='q5_k' is not one of"):
        export_gguf(model, tmp_path / "m.gguf", quant="q5_k", tokenizer=bpe_tokenizer)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_a_lora_merged_model_exports_with_the_merged_weights(bpe_tokenizer: Any, tmp_path: Path) -> None:
    """convert --merge-lora --to gguf: the adapter is inside the exported weights; keep is refused then."""
    from lamina.checkpoint.convert import convert
    from lamina.checkpoint.lamina import save_checkpoint
    from lamina.checkpoint.peft import save_adapter
    from lamina.model.lora import LoraConfig, apply_lora, merge_lora

    base = tiny_model(bpe_tokenizer, "llama")
    src = save_checkpoint(tmp_path / "base", base, bpe_tokenizer)
    lora = apply_lora(
        tiny_model(bpe_tokenizer, "llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["all-linear"])
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # a trained adapter: the merged weights differ from the base
    adapter = save_adapter(lora, tmp_path / "adapter")
    out = convert(src, tmp_path / "merged.gguf", to="gguf", quant="f32", merge_lora=str(adapter))
    ids = bpe_tokenizer.encode("quick brown fox")
    merged = logits(merge_lora(lora, unload=True).eval(), ids)
    assert not torch.allclose(merged, logits(base, ids), atol=1e-3)
    assert torch.allclose(logits(lamina.load(out).model, ids), merged, atol=1e-5)
    unmerged = apply_lora(tiny_model(bpe_tokenizer, "llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="unmerged LoRA adapters"):
        export_gguf(unmerged, tmp_path / "u.gguf", tokenizer=bpe_tokenizer)
    assert not (tmp_path / "u.gguf").exists()
    gguf_src = convert(src, tmp_path / "base.gguf", to="gguf", quant="q8_0")
    with pytest.raises(CheckpointError, match="changed since it was read"):
        convert(gguf_src, tmp_path / "x.gguf", to="gguf", quant="keep", merge_lora=str(adapter))


def test_refuses_a_tokenizer_llama_cpp_cannot_hold(tmp_path: Path) -> None:
    from tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()  # word-level
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2))
    with pytest.raises(CheckpointError, match="byte-level BPE"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_writing_leaves_nothing(bpe_tokenizer: Any, tmp_path: Path, monkeypatch: Any) -> None:
    import gguf

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_model(bpe_tokenizer, "gpt2"), tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_writes_gguf(bpe_tokenizer: Any, tmp_path: Path, capsys: Any) -> None:
    from lamina.checkpoint.lamina import save_checkpoint
    from lamina.cli.main import main

    src = save_checkpoint(tmp_path / "src", tiny_model(bpe_tokenizer, "llama"), bpe_tokenizer)
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf", "--quant", "q8_0"]) == 0
    assert "wrote gguf file" in capsys.readouterr().out
    gf = read_gguf(tmp_path / "m.gguf")
    assert gf.tensors["blk.0.attn_q.weight"].qtype_name == "Q8_0"
    assert gf.tensors["blk.0.attn_norm.weight"].qtype_name == "F32"
    assert main(["convert", str(src), str(tmp_path / "x.gguf"), "--quant", "q8_0"]) == 1
    assert main(["convert", str(src), str(tmp_path / "y.gguf")]) == 1
    assert "add --to gguf" in capsys.readouterr().err


# -- real llama.cpp ------------------------------------------------------------------------------------------

NODE_LLAMA_CPP = "3.21.1"  # pinned: newer releases may fail to install here
SCRIPT = Path(__file__).with_name("llama_cpp_greedy.mjs")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "1, 2, 3, 4,",
]

Runner = Callable[..., dict[str, list[list[int]]]]


def _node_dir() -> Path:
    return Path(os.environ.get("LAMINA_NODE_DIR") or Path.home() / ".cache" / "lamina-node")


@pytest.fixture(scope="session")
def llama_cpp() -> Runner:
    """``run(gguf_path, greedy=[ids...], max_new_tokens=N, forced=[ids...])`` -> llama.cpp's token ids."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js/npm is not installed, so llama.cpp (node-llama-cpp) cannot run these checks")
    modules = _node_dir() / "node_modules"
    manifest = modules / "node-llama-cpp" / "package.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["version"] != NODE_LLAMA_CPP:
        packages = [f"node-llama-cpp@{NODE_LLAMA_CPP}"]
        if platform.system() == "Linux" and platform.machine() == "x86_64":  # the CPU build only, not CUDA's
            packages = ["--omit=optional", *packages, f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"]
        cmd = ["npm", "i", "-E", "--silent", "--prefix", str(_node_dir()), *packages]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed (run bash scripts/setup.sh --test): {done.stderr[-2000:]}")

    def run(
        path: Path, greedy: list[list[int]] = (), max_new_tokens: int = 0, forced: list[list[int]] = ()
    ) -> Any:  # type: ignore[assignment]
        jobs = path.with_suffix(".jobs.json")
        jobs.write_text(json.dumps({"greedy": greedy, "max_new_tokens": max_new_tokens, "forced": forced}))
        # llama.cpp's threads spin while they wait: more of them than free cores makes it crawl (250 s
        # instead of 11 s on a loaded 2-core machine), so it takes the thread limit torch is given here
        threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
        env = {**os.environ, "LAMINA_NODE_MODULES": str(modules), "LAMINA_LLAMA_THREADS": threads}
        done = subprocess.run(
            ["node", str(SCRIPT), str(path), str(jobs)], capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


def lamina_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by lamina: the argmax of the last position's logits, n times (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_smollm2_greedy_in_llama_cpp_equals_lamina(
    llama_cpp: Runner, lamina_smollm2: Any, smollm2_exports: dict, quant: str
) -> None:
    tok = lamina_smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    lm = lamina_smollm2 if quant == "f32" else lamina.load(smollm2_exports[quant])
    ours = [lamina_greedy(lm.model, p, 8) for p in prompts]
    theirs = llama_cpp(smollm2_exports[quant], greedy=prompts, max_new_tokens=8)["greedy"]
    assert theirs == ours


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_smollm2_quantized_top1_agrees_with_llama_cpp(
    llama_cpp: Runner, lamina_smollm2: Any, smollm2_exports: dict, quant: str
) -> None:
    text = argparse.__doc__ + json.__doc__  # real English prose and code from the standard library
    ids = lamina_smollm2.tokenizer.encode(text)[:256]
    assert len(ids) == 256
    with torch.no_grad():
        ours = lamina.load(smollm2_exports[quant]).model(torch.tensor([ids]))[0].argmax(-1).tolist()
    theirs = llama_cpp(smollm2_exports[quant], forced=[ids])["forced"][0]
    agreement = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ids)
    print(
        f"{quant}: teacher-forced top-1 agreement lamina vs llama.cpp {agreement:.3f} on {len(ids)} positions"
    )
    assert agreement >= 0.9


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_demo_sized_model_generates_the_same_greedy_tokens_in_llama_cpp(
    llama_cpp: Runner, bpe_tokenizer: Any, family: str, tmp_path: Path
) -> None:
    # lamina demo's shape (4 layers, d_model 256, 4 heads, context 128); gpt2 with demo's exact GELU
    shape = dict(n_layers=4, d_model=256, n_heads=4, init_std=0.05)
    model = tiny_model(bpe_tokenizer, family, **shape, **({"activation": "gelu"} if family == "gpt2" else {}))
    path = export_gguf(model, tmp_path / "demo.gguf", quant="f32", tokenizer=bpe_tokenizer)
    prompts = [bpe_tokenizer.encode(p) for p in ("def ", "import os\n", "class ", "    return ")]
    ours = [lamina_greedy(model, p, 12) for p in prompts]
    assert llama_cpp(path, greedy=prompts, max_new_tokens=12)["greedy"] == ours


@pytest.mark.parametrize("quant,type_size", [("q4_k", 144), ("q6_k", 210)])
def test_k_quants_write_the_bytes_of_llama_cpps_own_quantizers(
    llama_cpp: Runner, quant: str, type_size: int
) -> None:
    """gguf.quants has no K-quant quantizers: the reference is quantize_row_q4_K_ref / quantize_row_q6_K_ref
    in llama.cpp's own libggml-base, called through ctypes."""
    import ctypes

    lib_path = _node_dir() / "node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so"
    if not lib_path.is_file():
        pytest.skip(
            f"no prebuilt llama.cpp library for {platform.system()} {platform.machine()} ({lib_path})"
        )
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 512)) * rng.uniform(1e-4, 4, (64, 1))).astype(np.float32)
    x[0, :256] = 0  # an all-zero super-block
    x[1, :32] = 0  # an all-zero sub-block
    x[2] = np.linspace(-3, 3, 512, dtype=np.float32)  # ties
    x[3, :256] = 1.0  # constant
    x[4] = rng.standard_t(2, 512)  # heavy tails
    x[5] = np.abs(x[5])  # all positive (Q4_K's min clamps to 0)
    ref = np.zeros((64, 2 * type_size), np.uint8)
    getattr(lib, f"quantize_row_{quant[:2]}_K_ref")(
        x.ctypes.data_as(ctypes.c_void_p), ref.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size)
    )
    assert quantize(x, quant).tobytes() == ref.tobytes()


@pytest.mark.parametrize("quant", ["q4_k", "q6_k"])
def test_demo_sized_llama_as_k_quant_agrees_with_llama_cpp(
    llama_cpp: Runner, bpe_tokenizer: Any, tmp_path: Path, quant: str
) -> None:
    model = tiny_model(bpe_tokenizer, "llama", n_layers=4, d_model=256, n_heads=4, init_std=0.05)
    with pytest.warns(UserWarning, match=f"not whole {quant} blocks"):  # d_ff 704: ffn_down falls back
        path = export_gguf(model, tmp_path / "k.gguf", quant=quant, tokenizer=bpe_tokenizer)  # type: ignore[arg-type]
    tensors = read_gguf(path).tensors
    assert tensors["blk.0.attn_q.weight"].qtype_name == quant.upper()
    assert (
        tensors["blk.0.ffn_down.weight"].qtype_name == {"q4_k": "Q4_1", "q6_k": "Q8_0"}[quant]
    )  # as llama.cpp
    ids = bpe_tokenizer.encode(TEXT)[:96]
    with torch.no_grad():
        ours = lamina.load(path).model(torch.tensor([ids]))[0].argmax(-1).tolist()
    theirs = llama_cpp(path, forced=[ids])["forced"][0]
    agreement = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ids)
    print(f"{quant}: demo-sized llama, teacher-forced top-1 agreement with llama.cpp {agreement:.3f}")
    assert agreement >= 0.9
