"""Chat data for SFT: the three JSONL shapes, bad lines named by file line, and loss masks checked token by
token against a reference built independently from the messages (the rendered text written by hand for
each template, the answer spans by character, tokens by their offsets in one plain encoding), for the
templates of SmolLM2, Llama 3, ChatML and a plain-text template, with and without packing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend

import lamina
from lamina.data.chat import (
    IGNORE,
    ChatBatches,
    ChatData,
    encode_chats,
    encode_conversation,
    pack,
    read_chat,
    read_template,
    targets_of,
)
from lamina.errors import DataError
from lamina.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# roles as plain text, the eos token ends an answer; no control token but eos
PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Question:\\n' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Answer:\\n' + m['content'] + eos_token + '\\n\\n' }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Answer:\\n' }}{% endif %}"
)
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi <|im_end|> <|eot_id|> then stop"},  # control text: plain text
        {"role": "assistant", "content": " Hi there! \n"},
        {"role": "user", "content": "Again, in French, with émojis 🎉"},
        {"role": "assistant", "content": "Salut !\nÀ bientôt 🎉"},
    ],
    [
        {"role": "user", "content": "List three colours."},
        {"role": "assistant", "content": "red, green\nand blue"},
        {"role": "user", "content": "thanks"},
    ],
]


class _Rendered:
    """Text built piece by piece: control tokens (the template's) apart from plain text, and the
    character spans of the answers (content + end-of-turn token)."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, bool]] = []
        self.spans: list[tuple[int, int]] = []
        self.text = ""

    def add(self, text: str, control: bool = False) -> None:
        self.pieces.append((text, control))
        self.text += text

    def answer(self, content: str, eot: str) -> None:
        self.spans.append((len(self.text), len(self.text) + len(content) + len(eot)))
        self.add(content)
        self.add(eot, control=True)


def _chatml(messages: list[dict[str, str]], smol: bool) -> _Rendered:
    r = _Rendered()
    if smol and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOL_SYSTEM}, *messages]
    for m in messages:
        r.add("<|im_start|>", control=True)
        r.add(f"{m['role']}\n")
        if m["role"] == "assistant":
            r.answer(m["content"], "<|im_end|>")
        else:
            r.add(m["content"])
            r.add("<|im_end|>", control=True)
        r.add("\n")
    return r


def _llama3(messages: list[dict[str, str]]) -> _Rendered:
    r = _Rendered()
    r.add("<|begin_of_text|>", control=True)
    for m in messages:
        r.add("<|start_header_id|>", control=True)
        r.add(m["role"])
        r.add("<|end_header_id|>", control=True)
        r.add("\n\n")
        if m["role"] == "assistant":
            r.answer(m["content"].strip(), "<|eot_id|>")
        else:
            r.add(m["content"].strip())
            r.add("<|eot_id|>", control=True)
    return r


def _plain(messages: list[dict[str, str]]) -> _Rendered:
    r = _Rendered()
    for m in messages:
        if m["role"] == "user":
            r.add(f"### Question:\n{m['content']}\n\n")
        elif m["role"] == "assistant":
            r.add("### Answer:\n")
            r.answer(m["content"], "<|im_end|>")
            r.add("\n\n")
        else:
            r.add(m["content"] + "\n\n")
    return r


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return lamina.load_tokenizer("smollm2")


def _with_template(
    base: Tokenizer, template: str, specials: list[str], bos: str | None, eos: str
) -> Tokenizer:
    backend = Backend.from_str(base.backend.to_str())
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template)


TemplateCase = tuple[Tokenizer, Callable[[list[dict[str, str]]], _Rendered]]


@pytest.fixture(scope="module", params=["smollm2", "llama3", "chatml", "plain"])
def case(request: pytest.FixtureRequest, smollm2: Tokenizer) -> TemplateCase:
    """(tokenizer, reference renderer of messages)."""
    if request.param == "smollm2":
        return smollm2, lambda m: _chatml(m, smol=True)
    if request.param == "llama3":
        specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return _with_template(smollm2, LLAMA3, specials, "<|begin_of_text|>", "<|eot_id|>"), _llama3
    if request.param == "chatml":
        return _with_template(smollm2, CHATML, [], None, "<|im_end|>"), lambda m: _chatml(m, smol=False)
    return _with_template(smollm2, PLAIN, [], None, "<|im_end|>"), _plain


def _reference(tok: Tokenizer, renderer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Ids and loss flags from the hand-rendered text: the template's control tokens by id, the text
    between them encoded with every special token's text kept plain (a tokenizer splits text at
    control tokens before anything else), and a token carries loss iff its characters lie in an
    answer span."""
    r = renderer(messages)
    assert r.text == tok.apply_chat_template(messages)  # the hand rendering is the template's
    plain = Backend.from_str(tok.backend.to_str())
    plain.encode_special_tokens = True
    chunks: list[tuple[str, bool]] = []  # runs of plain text joined: the tokenizer sees them as one
    for text, control in r.pieces:
        if chunks and not control and not chunks[-1][1]:
            chunks[-1] = (chunks[-1][0] + text, False)
        else:
            chunks.append((text, control))
    ids, loss, at = [], [], 0
    for text, control in chunks:
        if control:
            found = [(tok.token_to_id(text), (at, at + len(text)))]
        else:
            enc = plain.encode(text, add_special_tokens=False)
            found = [(i, (at + a, at + b)) for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)]
        for i, (a, b) in found:
            ids.append(i)
            loss.append(any(s <= a and b <= e for s, e in r.spans))
        at += len(text)
    return ids, loss


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_mask_is_exactly_the_answers_and_end_of_turn(case: TemplateCase, k: int) -> None:
    tok, renderer = case
    messages = CONVERSATIONS[k]
    ids, loss = encode_conversation(tok, messages)
    ref_ids, ref_loss = _reference(tok, renderer, messages)
    assert ids == ref_ids
    got = [tok.id_to_token(i) for i, flag in zip(ids, loss, strict=True) if flag]
    want = [tok.id_to_token(i) for i, flag in zip(ids, ref_loss, strict=True) if flag]
    assert got == want
    assert loss == ref_loss
    eot = tok.eos_token_id
    assert sum(i == eot and flag for i, flag in zip(ids, loss, strict=True)) == sum(
        m["role"] == "assistant" for m in messages
    )


def test_user_text_never_becomes_a_control_token(smollm2: Tokenizer) -> None:
    ids, _ = encode_conversation(smollm2, CONVERSATIONS[1])
    end = smollm2.token_to_id("<|im_end|>")
    # system (given), user, assistant, user, assistant: five turns, five ends, none from the user's text
    assert ids.count(end) == 5


def test_loss_on_all_counts_every_token_but_the_first(smollm2: Tokenizer) -> None:
    ids, loss = encode_conversation(smollm2, CONVERSATIONS[0], loss_on="all")
    assert loss == [False] + [True] * (len(ids) - 1)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_targets_follow_the_mask(case: TemplateCase, packing: bool) -> None:
    tok, renderer = case
    data = ChatData([list(c) for c in CONVERSATIONS], [f"line {i}" for i in range(1, 4)])
    enc = encode_chats(tok, data, max_seq_len=512)
    assert not enc.problems
    b = ChatBatches(enc.examples, batch_size=3, max_seq_len=512, seed=0, packing=packing)
    batch = next(b.eval_batches())
    rows = batch["input_ids"].shape[0]
    assert rows == (1 if packing else 3)
    # rebuild (ids, loss) of each conversation from the batch and compare with the reference
    found = []
    for r in range(rows):
        seg = batch["segment_ids"][r] if packing else batch["attention_mask"][r]
        for s in sorted(set(seg.tolist()) - {0}):
            where = (seg == s).nonzero().flatten()
            ids = batch["input_ids"][r, where].tolist()
            tgt = batch["targets"][r, where].tolist()
            assert batch["position_ids"][r, where].tolist() == list(range(len(ids)))
            assert tgt[-1] == IGNORE  # no target crosses into the next conversation
            loss = [False] + [t != IGNORE for t in tgt[:-1]]
            assert [t for t in tgt if t != IGNORE] == [i for i, f in zip(ids, loss, strict=True) if f]
            found.append((ids, loss))
    want = [_reference(tok, renderer, m) for m in CONVERSATIONS]
    assert sorted(found) == sorted(want)
    if packing:
        assert batch["attention_mask"].sum() == sum(len(i) for i, _ in want)


def test_pack_first_fit_longest_first() -> None:
    assert pack([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    bins = pack([3] * 10, 10)
    assert sorted(i for b in bins for i in b) == list(range(10)) and all(len(b) == 3 for b in bins[:3])


def test_three_shapes_and_bad_lines(tmp_path: Path, smollm2: Tokenizer) -> None:
    rows: list[Any] = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "c", "completion": "d"},
        {"instruction": "e", "input": "f", "output": "g"},
        {"instruction": "h", "input": "", "output": "i", "system": "s"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"text": "wrong shape"},
        [1, 2],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    data = read_chat(path)
    assert data.conversations[:4] == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        [{"role": "user", "content": "e\n\nf"}, {"role": "assistant", "content": "g"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "h"},
            {"role": "assistant", "content": "i"},
        ],
    ]
    problems = [str(p) for p in data.problems]
    assert problems[0].startswith("chat.jsonl line 6: no 'messages'") and problems[0].endswith("skipped")
    assert problems[1].startswith("chat.jsonl line 7: a JSON list")
    assert problems[2].startswith("chat.jsonl line 8: not JSON")
    enc = encode_chats(smollm2, data, max_seq_len=512)
    assert len(enc.examples) == 4 and enc.skipped == 4
    assert str(enc.problems[-1]).startswith("chat.jsonl line 5: no assistant turn")


def test_role_the_template_rejects_and_too_long(smollm2: Tokenizer, tmp_path: Path) -> None:
    tok = _with_template(smollm2, PLAIN, [], None, "<|im_end|>")
    long = " ".join(["word"] * 100)
    data = ChatData(
        [
            [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
            [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": long}],
        ],
        ["f line 1", "f line 2", "f line 3"],
    )
    enc = encode_chats(tok, data, max_seq_len=40)
    msgs = [str(p) for p in enc.problems]
    assert msgs[0].startswith("f line 1: the chat template rejected it (unknown role tool)")
    assert (
        msgs[1]
        == "f line 2: 113 tokens, longer than max_seq_len=40, no answer token in the first 40; skipped"
    )
    assert msgs[2] == "f line 3: 113 tokens, longer than max_seq_len=40; truncated to 40"
    assert enc.truncated == 1 and len(enc.examples) == 1 and len(enc.examples[0].ids) == 40
    assert len(encode_chats(tok, data, max_seq_len=40, truncate=False).examples) == 0


def test_targets_and_sample_prompt(smollm2: Tokenizer) -> None:
    data = ChatData([CONVERSATIONS[1]], ["x"])
    e = encode_chats(smollm2, data, 512).examples[0]
    assert targets_of(e)[-1] == IGNORE
    assert e.reference == "Salut !\nÀ bientôt 🎉"
    assert e.prompt == smollm2.apply_chat_template(
        CONVERSATIONS[1][:4], add_generation_prompt=True, tokenize=True
    )
    assert e.ids[: len(e.prompt)] == e.prompt


def test_read_template(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(CHATML)
    assert read_template(str(f)) == CHATML and read_template(CHATML) == CHATML and read_template(None) is None
    with pytest.raises(DataError, match="not found"):
        read_template(str(tmp_path / "missing.jinja"))
