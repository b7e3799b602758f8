"""Every end-of-generation token a checkpoint names ends generation: GGUF eos/eot/eom ids, HF eos lists,
the chat template's end of turn; and the list survives lamina's own format and the HF export."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

import lamina
from lamina.checkpoint.eos import as_id_list, end_of_turn_id, eos_token_ids
from lamina.checkpoint.gguf import gguf_eos_token_ids, gguf_to_hf, read_gguf
from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.lamina import save_checkpoint
from lamina.config import GenerationConfig, ModelConfig
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


# -- the chat template's end of turn -------------------------------------------------------------------------

TEMPLATES = {  # template -> the token it closes an assistant turn with (None: none)
    "chatml": (CHATML, "<|im_end|>"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}",
        "<|eot_id|>",
    ),
    "gemma": (  # raises unless roles alternate from a user turn
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content | trim }}<end_of_turn>\n{% endfor %}",
        "<end_of_turn>",
    ),
    "assistant-first": (  # raises on a user turn first: the one-message probe answers
        "{% if messages[0].role != 'assistant' %}{{ raise_exception('assistant first') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}",
        "<|eot_id|>",
    ),
    "llama2": (  # a space, then the eos token
        "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content }} [/INST]"
        "{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}",
        "<|endoftext|>",
    ),
    "plain-text": ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}", None),
    "text-then-special": ("{% for m in messages %}{{ m.content }}\nEnd of turn<|im_end|>{% endfor %}", None),
    "drops-content": ("{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}", None),
    "always-raises": ("{{ raise_exception('no') }}", None),
}
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]  # fmt: skip


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    texts = ["the user said hello and the assistant answered", "End of turn: user, assistant."] * 20
    return Tokenizer.train(texts, vocab_size=300, special_tokens=SPECIALS, show_progress=False)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_end_of_turn_is_the_special_token_after_an_assistant_message(
    name: str, small_tokenizer: Tokenizer
) -> None:
    template, expected = TEMPLATES[name]
    small_tokenizer.chat_template = template
    want = None if expected is None else small_tokenizer.token_to_id(expected)
    assert end_of_turn_id(small_tokenizer) == want
    ids = eos_token_ids(tokenizer=small_tokenizer)
    assert ids == list(dict.fromkeys([small_tokenizer.token_to_id("<|endoftext|>"), *as_id_list(want)]))


def test_no_template_no_end_of_turn(small_tokenizer: Tokenizer) -> None:
    small_tokenizer.chat_template = None
    assert end_of_turn_id(small_tokenizer) is None
    assert eos_token_ids(None, 7, [7, 9], tokenizer=small_tokenizer) == [7, 9, 0]


def test_id_lists_as_files_hold_them() -> None:
    assert [as_id_list(v) for v in (None, 3, [3, 4], (5,), True, "2")] == [[], [3], [3, 4], [5], [], []]
    assert eos_token_ids([2, 0], 0, None, [1, 2]) == [2, 0, 1]
    meta = {
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.eom_token_id": 0,
    }
    assert gguf_eos_token_ids(meta) == [0, 2]


# -- GGUF files rewritten by the gguf package ------------------------------------------------------------------

D, FF, HEADS, KV_HEADS = 16, 32, 2, 1


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path: Path) -> dict[str, Any]:
    """SmolLM2's GGUF metadata (its tokenizer: ids 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>)."""
    return read_gguf(smollm2_path).metadata


def _write_gguf(path: Path, meta: Mapping[str, Any], ids: Mapping[str, int], template: bool) -> Path:
    """A one-layer Llama GGUF with SmolLM2's tokenizer, random tiny weights and the given special ids
    (keys "bos", "eos", "eot", "eom"); the chat template only when ``template``."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_add_bos_token(False)
    for key, value in ids.items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    if template:
        w.add_chat_template(meta["tokenizer.chat_template"])
    vocab, hd = len(meta["tokenizer.ggml.tokens"]), D // HEADS
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (KV_HEADS * hd, D),
              "blk.0.attn_v.weight": (KV_HEADS * hd, D), "blk.0.attn_output.weight": (D, D),
              "blk.0.ffn_gate.weight": (FF, D), "blk.0.ffn_up.weight": (FF, D), "blk.0.ffn_down.weight": (D, FF)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LLAMA3_LAYOUT = {"bos": 1, "eos": 0, "eot": 2}  # eos <|endoftext|>, eot <|im_end|>


@pytest.mark.parametrize(
    ("ids", "template", "expected"),
    [
        (LLAMA3_LAYOUT, True, [0, 2]),  # the file: eos [0] alone let chat replies run on
        (LLAMA3_LAYOUT, False, [0, 2]),  # the eot key alone
        ({"bos": 1, "eos": 0}, True, [0, 2]),  # the template's end of turn alone
        ({"bos": 1, "eos": 0, "eom": 5}, False, [0, 5]),  # end of message (after a tool call)
        ({"bos": 1, "eos": 2}, True, [2]),  # SmolLM2's own layout: one id, once
    ],
)
def test_gguf_end_of_generation_ids(
    ids: dict[str, int], template: bool, expected: list[int], smollm2_meta: dict[str, Any], tmp_path: Path
) -> None:
    path = _write_gguf(tmp_path / "m.gguf", smollm2_meta, ids, template)
    lm = lamina.load(path)
    assert lm.generation.eos_token_ids == expected
    config, _ = gguf_to_hf(read_gguf(path))  # the HF config holds the GGUF ids as Llama-3's config.json does
    assert as_id_list(config["eos_token_id"]) == gguf_eos_token_ids(read_gguf(path).metadata)


def test_gguf_eos_list_survives_lamina_and_hf_folders(smollm2_meta: dict[str, Any], tmp_path: Path) -> None:
    import transformers as tf

    lm = lamina.load(_write_gguf(tmp_path / "m.gguf", smollm2_meta, LLAMA3_LAYOUT, template=True))
    assert lm.generation.eos_token_ids == [0, 2]
    save_checkpoint(tmp_path / "lamina", lm.model, lm.tokenizer, lm.generation)
    assert lamina.load(tmp_path / "lamina").generation.eos_token_ids == [0, 2]
    export_hf(tmp_path / "hf", lm.model, lm.tokenizer, lm.generation)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert tf.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [0, 2]
    assert lamina.load(tmp_path / "hf").generation.eos_token_ids == [0, 2]


# -- HF folders and lamina folders -----------------------------------------------------------------------------


def _tiny_llama(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny", vocab_size=vocab, max_seq_len=32)).eval()


def test_hf_generation_config_eos_list_all_stop(tmp_path: Path) -> None:
    export_hf(tmp_path / "hf", _tiny_llama(101), generation=GenerationConfig(eos_token_ids=[3]))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7, 9]}))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"eos_token_id": [3, 11, 500]}))
    # every id of both files, in order; 500 is past the 101-token embedding and cannot be generated
    assert lamina.load(tmp_path / "hf").generation.eos_token_ids == [3, 7, 9, 11]


def test_hf_folder_adds_the_template_end_of_turn(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    small_tokenizer.chat_template = CHATML
    export_hf(tmp_path / "hf", _tiny_llama(300), small_tokenizer)
    im_end = small_tokenizer.token_to_id("<|im_end|>")
    assert lamina.load(tmp_path / "hf").generation.eos_token_ids == [0, im_end]


def test_lamina_folder_round_trips_the_list_and_adds_the_end_of_turn(
    small_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    small_tokenizer.chat_template = CHATML
    save_checkpoint(tmp_path / "a", _tiny_llama(300), small_tokenizer, GenerationConfig(eos_token_ids=[5, 0]))
    im_end = small_tokenizer.token_to_id("<|im_end|>")
    assert lamina.load(tmp_path / "a").generation.eos_token_ids == [5, 0, im_end]
    save_checkpoint(tmp_path / "b", _tiny_llama(300), None, GenerationConfig(eos_token_ids=[4, 9]))
    assert lamina.load(tmp_path / "b").generation.eos_token_ids == [4, 9]


def test_generation_config_json_that_is_not_an_object_is_a_clear_error(tmp_path: Path) -> None:
    export_hf(tmp_path / "hf", _tiny_llama(101))
    (tmp_path / "hf" / "generation_config.json").write_text("[1, 2")
    with pytest.raises(lamina.CheckpointError, match=r"generation_config\.json"):
        lamina.load(tmp_path / "hf")
