"""`lamina generate` (a prompt, n choices, logprobs, counts; `--input prompts.jsonl` as a batch) and `lamina
chat` (history, commands, streaming, Ctrl-C, cut replies), on SmolLM2 and on a tiny saved checkpoint."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lamina
from lamina.cli.main import build_parser, main
from lamina.generate.chat import chat_config, chat_loop


@pytest.mark.slow
def test_generate_input_jsonl_runs_a_batch_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lamina_smollm2: Any
) -> None:
    lm = lamina_smollm2
    requests = [
        {"prompt": "What is the capital of France?"},
        {"id": "b", "messages": [{"role": "user", "content": "Name a color."}], "max_new_tokens": 5},
        {"prompt": "Write a word.", "temperature": 0.9, "seed": 4, "n": 2},
        {"prompt": "What is the capital of France?", "num_beams": 3},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    out_path = tmp_path / "out.jsonl"
    code = main(
        ["generate", "smollm2", "--input", str(path), "--out", str(out_path), "--max-new-tokens", "8"]
    )
    assert code == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in rows] == [(0, 0), (1, "b"), (2, 2), (2, 2), (3, 3)]
    assert rows[0]["text"] == lamina.generate(lm, requests[0]["prompt"], max_new_tokens=8)
    assert rows[1]["text"] == lamina.generate(lm, requests[1]["messages"], max_new_tokens=5)
    assert rows[1]["completion_tokens"] <= 5 and rows[0]["completion_tokens"] <= 8
    assert rows[2]["text"] == lamina.generate(lm, "Write a word.", max_new_tokens=8, temperature=0.9, seed=4)
    assert [r["n"] for r in rows[2:4]] == [0, 1]
    assert rows[4]["text"] == lamina.generate(lm, requests[3]["prompt"], max_new_tokens=8, num_beams=3)


def test_generate_input_errors_name_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", "smollm2", "--input", str(path)]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    path.write_text('{"prompt": "ok", "top_p": 7}\n')
    assert main(["generate", "smollm2", "--input", str(path)]) == 1
    assert "bad.jsonl:1: top_p=7" in capsys.readouterr().err
    assert main(["generate", "smollm2"]) == 1
    assert "give a PROMPT or --input" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_keeps_history_and_obeys_commands(lamina_smollm2: Any) -> None:
    lm = lamina_smollm2
    lines = iter(
        ["My name is Ada.", "What is my name?", "/reset", "What is my name?", "/bogus", "/exit", "never"]
    )
    written: list[str] = []
    cfg = chat_config(lm, max_new_tokens=8, temperature=0)
    history = chat_loop(lm, lambda: next(lines, None), written.append, config=cfg)
    out = "".join(written)
    first = lamina.generate(lm, [{"role": "user", "content": "My name is Ada."}], cfg)
    convo = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is my name?"},
    ]
    second = lamina.generate(lm, convo, cfg)
    fresh = lamina.generate(lm, [{"role": "user", "content": "What is my name?"}], cfg)

    def turn(reply: str) -> str:
        cut = len(lm.tokenizer.encode(reply, add_special_tokens=False)) >= 8
        return reply + "\n" + ("[reply cut at max_new_tokens=8]\n" if cut else "")

    assert out.startswith(turn(first) + turn(second) + "(conversation reset)\n" + turn(fresh))
    assert "unknown command '/bogus'" in out
    assert history == [
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": fresh},
    ]
    assert len(written) > 6  # the replies were streamed in pieces


# -- a tiny saved checkpoint: the CLI's own behaviour, fast ------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "blue", "green", "red", "hello", "world"]
SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _save_tiny(folder: Path, **model: Any) -> str:
    """A random 2-layer model (``model``: ModelConfig overrides) with a word-level chat tokenizer, saved."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["user", "assistant", "system"])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(SPECIAL)
    tok = Tokenizer(backend, eos_token="<|im_end|>", unk_token="[UNK]", chat_template=TEMPLATE)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", **{"vocab_size": len(vocab), "max_seq_len": 64, **model})
    gen = GenerationConfig(eos_token_ids=[tok.eos_token_id])
    lamina.save_checkpoint(folder, Transformer(cfg).eval(), tok, gen)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.mark.parametrize(
    ("model", "verb", "words"),
    [
        ({"arch": "encoder", "head": "none"}, "generate", ["is an encoder", "`lamina embed`"]),
        ({"arch": "encoder", "head": "none"}, "chat", ["is an encoder", "`lamina embed`"]),
        ({"arch": "encoder"}, "generate", ["is an encoder", "`lamina fill-mask`"]),
    ],
)
def test_a_model_that_cannot_generate_is_refused_in_one_line(
    model: dict[str, Any], verb: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: `lamina generate minilm "hello"` printed a 35-line traceback; `lamina chat minilm` said
    # to use `lamina generate`
    path = _save_tiny(tmp_path / "enc", **model)
    argv = ["generate", path, "hello"] if verb == "generate" else ["chat", path]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words) and "`lamina generate`" not in err, err


def test_token_ids_outside_the_vocabulary_are_a_one_line_error(
    tiny_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: `--logit-bias '{50256: -100}'` (the help's example) printed nothing and exited 0
    assert main(["generate", tiny_path, "hello", "--logit-bias", "{50256: -100}"]) == 1
    err = capsys.readouterr().err
    assert "logit_bias names token id 50256" in err and "vocabulary of 19 tokens" in err


def test_n_choices_logprobs_and_counts_print(tiny_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    # before: --n 2 failed naming a Python function; --logprobs printed nothing; no counts were printed
    argv = ["generate", tiny_path, "hello", "--n", "2", "--seed", "1", "--max-new-tokens", "3",
            "--ignore-eos", "--logprobs", "--top-logprobs", "2", "--prompt-logprobs", "1"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "--- choice 1/2 ---" and lines[2] == "--- choice 2/2 ---" and len(lines) == 4
    assert "prompt logprobs:" in err and "logprobs (choice 1/2):" in err and "logprobs (choice 2/2):" in err
    assert "top alternatives" in err and "(the first prompt token has no logprob)" in err
    summary = err.strip().splitlines()[-1]
    assert "prompt 6 tokens" in summary and "generated 6 tokens in 2 choices" in summary
    assert "tokens/s" in summary and "all cut at max_new_tokens=3" in summary
    assert main(["generate", tiny_path, "hello", "--max-new-tokens", "2", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "logprobs" not in err and "generated 2 tokens," in err
    args = build_parser().parse_args(["generate", tiny_path, "hello", "--max-new-tokens", "2"])
    args.quiet = True  # the lead's --quiet
    assert args.func(args) == 0
    assert capsys.readouterr().err == ""


def test_input_rows_hold_top_logprobs(
    tiny_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "logprobs": True, "top_logprobs": 2}) + "\n")
    assert main(["generate", tiny_path, "--input", str(path), "--max-new-tokens", "3", "--ignore-eos"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(row["top_logprobs"]) == len(row["logprobs"]) == 3 and len(row["top_logprobs"][0]) == 2


def test_chat_from_a_script_notes_cut_replies(
    tiny_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/system be brief\nthe cat\n"))
    assert main(["chat", tiny_path, "--max-new-tokens", "3", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.count("[reply cut at max_new_tokens=3]") == 2 and "(system prompt set)" in out


def test_generate_draft_and_speculative_layers_print_the_greedy_text(
    tiny_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: there were no --draft / --speculative-layers flags; then they were refused with --input and chat
    base = ["generate", tiny_path, "hello", "--max-new-tokens", "10"]
    assert main([*base, "--quiet"]) == 0
    greedy = capsys.readouterr().out
    draft = _save_tiny(tmp_path / "draft", n_layers=1)
    for extra in (["--speculative-layers", "1"], ["--draft", draft, "--num-draft-tokens", "2"]):
        assert main([*base, *extra]) == 0
        out, err = capsys.readouterr()
        assert out == greedy, extra
        assert "draft accepted " in err, err  # the acceptance rate on the stderr line
    # a sampled request decodes as without a draft (nothing is proposed for it)
    assert main([*base, "--speculative-layers", "1", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "draft proposed nothing" in capsys.readouterr().err
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "hello", "max_new_tokens": 10}\n{"prompt": "the cat", "temperature": 0.7, "seed": 1}\n'
    )
    assert main(["generate", tiny_path, "--input", str(path)]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", tiny_path, "--input", str(path), "--speculative-layers", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "draft accepted " in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", tiny_path, "--max-new-tokens", "4", "--temperature", "0", "--repetition-penalty", "1",
                 "--speculative-layers", "1"]) == 0  # fmt: skip
    assert "draft accepted " in capsys.readouterr().err
