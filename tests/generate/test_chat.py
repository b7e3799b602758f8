"""The chat loop (lamina.generate.chat) on a tiny chat model: scripted sessions with Ctrl-C, replies cut
by the budget or the context window, and the chat's decoding defaults."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from tiny_chat import CONTEXT, tiny_lm

import lamina
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.chat import CHAT_DEFAULTS, chat_config, chat_loop
from lamina.generate.text import complete as real_complete


def _session(
    lm: Any, lines: list[str], write: Any = None, **controls: Any
) -> tuple[str, list[dict[str, str]]]:
    it = iter(lines)
    written: list[str] = []
    history = chat_loop(lm, lambda: next(it, None), write or written.append, **controls)
    return "".join(written), history


def test_a_reply_cut_by_the_budget_says_so(tiny: Any) -> None:
    out, history = _session(tiny, ["hello"], max_new_tokens=3, ignore_eos=True, temperature=0)
    cfg = chat_config(tiny, max_new_tokens=3, ignore_eos=True, temperature=0)
    reply = lamina.generate(tiny, [{"role": "user", "content": "hello"}], cfg)
    assert out == reply + "\n[reply cut at max_new_tokens=3]\n"
    assert history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}]


def test_ollamas_commands_clear_and_bye_work(tiny: Any) -> None:
    """/clear forgets the conversation and /bye ends the session, as in Ollama (they were unknown commands,
    and the session went on after /bye)."""
    out, history = _session(tiny, ["hello", "/clear", "/bye", "never"], max_new_tokens=2, temperature=0)
    assert "(conversation reset)" in out and "unknown command" not in out and history == []


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(tiny: Any) -> None:
    written: list[str] = []

    def write(text: str) -> None:
        if len(written) == 1 and "interrupt" not in text:  # Ctrl-C while the 2nd piece of reply 1 shows
            written.append("interrupt")
            raise KeyboardInterrupt
        written.append(text)

    controls = dict(max_new_tokens=6, ignore_eos=True, temperature=0)
    _, history = _session(tiny, ["hello", "the cat"], write=write, **controls)
    out = "".join(written)
    assert written[1:3] == ["interrupt", "\n[reply interrupted]\n"]
    assert history[0] == {"role": "user", "content": "hello"}
    assert history[1] == {"role": "assistant", "content": written[0]}  # the partial reply, as shown
    assert history[2] == {"role": "user", "content": "the cat"} and len(history) == 4
    assert out.endswith("[reply cut at max_new_tokens=6]\n")  # the second turn ran to its budget


def test_a_turn_interrupted_before_any_text_is_dropped(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = sys.modules["lamina.generate.chat"]  # (the attribute lamina.generate is the function)
    calls = []

    def complete(*args: Any, **kw: Any) -> Any:
        calls.append(args[1])
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the prefill: no text yet
        return real_complete(*args, **kw)

    monkeypatch.setattr(chat, "complete", complete)
    out, history = _session(tiny, ["hello", "the cat"], max_new_tokens=2, ignore_eos=True)
    assert out.startswith("\n[reply interrupted]\n")
    assert calls[1] == [{"role": "user", "content": "the cat"}]  # the first turn was dropped
    assert history[0]["content"] == "the cat" and len(history) == 2


def test_a_conversation_over_the_context_window_is_refused_and_goes_on(tiny: Any) -> None:
    long = " ".join(["the cat sat on the mat"] * (CONTEXT // 6 + 1))
    out, history = _session(tiny, [long, "/reset", "hello"], max_new_tokens=2, ignore_eos=True)
    assert "does not fit the context window" in out and "/reset starts a new conversation" in out
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"


def test_a_reply_that_fills_the_context_window_says_so(tiny: Any) -> None:
    out, _ = _session(tiny, ["hello"], max_new_tokens=500, ignore_eos=True, temperature=0)
    assert f"the context window ({CONTEXT} tokens) is full" in out


def test_chat_defaults_when_the_checkpoint_has_none_else_its_own(tiny: Any) -> None:
    cfg = chat_config(tiny)
    assert cfg.sampling and all(getattr(cfg, k) == v for k, v in CHAT_DEFAULTS.items())
    assert cfg.eos_token_ids == tiny.generation.eos_token_ids
    with pytest.warns(UserWarning, match="top_k=5 has no effect"):  # greedy skips top_k, as generate says
        assert chat_config(tiny, temperature=0, top_k=5).sampling is False  # controls on top
    own = GenerationConfig(eos_token_ids=[2], temperature=0.2, top_p=0.9, max_new_tokens=40)
    cfg = chat_config(tiny_lm(generation=own), seed=3)
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.repetition_penalty, cfg.seed) == (
        0.2, 0.9, 40, 1.0, 3,
    )  # fmt: skip


def test_a_model_that_cannot_chat_is_refused_at_once() -> None:
    with pytest.raises(ConfigError, match=r"encoder.*lamina embed"):
        chat_loop(tiny_lm(arch="encoder", head="none"), lambda: "hello", print)
    import dataclasses
    from pathlib import Path

    from lamina.checkpoint.registry import ModelEntry

    lm = tiny_lm()
    lm.tokenizer.chat_template = None
    # `lamina chat "runs/my gpt/last"`: generate is suggested with the path given, not the folder's name
    lm = dataclasses.replace(lm, entry=ModelEntry("last", Path("runs/my gpt/last"), "path", "lamina"))
    with pytest.raises(ConfigError, match=r"no chat template; `lamina generate 'runs/my gpt/last' PROMPT`"):
        chat_loop(lm, lambda: "hello", print)
