"""The one config path: every field of every verb's configs is a flag and a YAML key with the same result.

The cases are generated from the dataclasses (and function signatures) each verb registers, so a new
field or a new verb is covered without a new test.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections import abc
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml

from lamina.cli.flags import given, merged, normalize_argv, values
from lamina.cli.main import build_parser, main
from lamina.config import GenerationConfig, ModelConfig, TrainConfig
from lamina.errors import ConfigError
from lamina.fields import Field, build, coerce, fields_of

# positional arguments that make each verb's command line complete
POSITIONALS = {
    "generate": ["m", "p"],
    "chat": ["m"],
    "serve": ["m"],
    "embed": ["m", "--input", "x.txt"],
    "score": ["m"],
    "eval": ["m"],
    "fill-mask": ["m", "t"],
    "explain": ["m", "t"],
    "scaling fit": ["r"],
    "ask": ["q"],
    "convert": ["m"],
    "data prepare": [],
    "tokenizer train": ["f.txt"],
    **{f"diffusion {a}": ["m"] for a in ("sample", "inpaint", "upscale", "edit", "export")},
}


PARSER = build_parser()  # one parser for the module: parsing does not change it


@functools.cache
def _verbs() -> dict[str, argparse.ArgumentParser]:
    """Every leaf verb's parser, by its words (``"data prepare"``)."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(words)] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, [*words, name])

    walk(PARSER, [])
    return out


def _config_flags(parser: argparse.ArgumentParser) -> list[tuple[str | None, Field]]:
    """(section, field) of every flag generated from a config on ``parser``."""
    out = []
    for action in parser._actions:
        if not action.dest.startswith("cfg:") or not action.option_strings:
            continue  # not from a config, or a positional field (data prepare's PATHS)
        if isinstance(action, argparse._StoreConstAction):
            continue  # --no-x of a boolean: tested with it
        section, _, name = action.dest[4:].rpartition(".")
        if not section and not parser.get_default("_lamina_sources"):
            continue  # a top-level key of a sectioned run config (--init)
        if name == "preset" or action.option_strings[0] != _expected_flag(section or None, name):
            continue  # presets and short aliases (--out for --train.out_dir) are covered by their field
        out.append((section or None, _field(parser, section or None, name)))
    return out


def _expected_flag(section: str | None, name: str) -> str:
    return f"--{section}.{name}" if section else "--" + name.replace("_", "-")


def _field(parser: argparse.ArgumentParser, section: str | None, name: str) -> Field:
    sources = parser.get_default("_lamina_sources") or []
    if section is not None:
        sources = [_SECTION_CLASSES[section]]
    for source in sources:
        for f in fields_of(source):
            if f.name == name:
                return f
    raise AssertionError(f"flag for {section}.{name} has no field")


_SECTION_CLASSES: dict[str, Any] = {}


def _sample(tp: Any, default: Any) -> str | None:
    """A value of type ``tp``, as text, that differs from ``default`` (None: no such value)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, type(int | None)):
        options = [a for a in args if a is not type(None)]
        return _sample(options[0], default)
    if origin is Literal:
        others = [a for a in args if a != default]
        return str(others[0]) if others else None
    if tp is bool:
        return "false" if default else "true"
    if tp is int:
        return "7" if default != 7 else "9"
    if tp is float:
        return "0.25" if default != 0.25 else "0.5"
    if tp is str or tp == (str | Path):
        return "yes"  # YAML would read a bare yes as a boolean: the field's type must win
    if origin in (list, abc.Sequence):
        (item,) = args
        if get_origin(item) is list:
            return "[[1, 2]]"
        return {int: "[1, 2]", str: "[yes, no]", float: "[0.5]"}[item]
    if origin is dict:
        return "{5: -1.5}"
    raise AssertionError(f"no sample for {tp}")


def _cases() -> list[Any]:
    cases = []
    for verb, parser in _verbs().items():
        for section, f in _config_flags(parser):
            cases.append(
                pytest.param(verb, section, f, id=f"{verb}:{section + '.' if section else ''}{f.name}")
            )
    return cases


def _register_sections() -> None:
    from lamina.data.corpus import DataConfig
    from lamina.model.lora import LoraConfig
    from lamina.train.finetune import SftConfig, TaskConfig
    from lamina.train.preference import DpoConfig, RewardConfig

    _SECTION_CLASSES.update(
        model=ModelConfig, train=TrainConfig, data=DataConfig, task=TaskConfig, sft=SftConfig, lora=LoraConfig
    )
    _SECTION_CLASSES.update(dpo=DpoConfig, reward=RewardConfig)
    from lamina.train.grpo import GrpoConfig

    _SECTION_CLASSES.update(grpo=GrpoConfig)
    from lamina.data.span_corruption import SpanCorruptionConfig
    from lamina.train.seq2seq import Seq2SeqConfig

    _SECTION_CLASSES.update(seq2seq=Seq2SeqConfig, span_corruption=SpanCorruptionConfig)
    from lamina.analysis.sweep import SweepConfig

    _SECTION_CLASSES.update(sweep=SweepConfig)
    from lamina.cli.diffusion import _sections

    _SECTION_CLASSES.update({k: v for k, v in _sections().items() if k != "train"})


_register_sections()
CASES = _cases()


def test_every_verb_has_generated_flags() -> None:
    verbs = {c.values[0] for c in CASES}
    for verb in (
        "generate",
        "chat",
        "serve",
        "pretrain",
        "finetune",
        "data prepare",
        "demo",
        "convert",
        "fill-mask",
    ):
        assert verb in verbs, f"{verb} has no flags generated from a config"


@pytest.mark.parametrize(("verb", "section", "field"), CASES)
def test_field_is_a_flag_and_a_yaml_key_with_the_same_value(
    verb: str, section: str | None, field: Field, tmp_path: Path
) -> None:
    text = _sample(field.type, field.default)
    if text is None:
        pytest.skip(f"{field.name}: a Literal with one choice has no other value")
    parser = PARSER
    words = verb.split()
    flag = _expected_flag(section, field.name)
    from_flag = parser.parse_args(normalize_argv(parser, [*words, flag, text, *POSITIONALS.get(verb, [])]))
    config = tmp_path / "run.yaml"
    # the YAML file holds the same text the flag got (a YAML scalar, list or mapping)
    body = f"{field.name}: {text}\n" if section is None else f"{section}:\n  {field.name}: {text}\n"
    config.write_text(body)
    from_file = parser.parse_args(
        normalize_argv(parser, [*words, "--config", str(config), *POSITIONALS.get(verb, [])])
    )
    expected = coerce(text, field.type, field.name, field.parse)
    if section is None:
        source = _owner(_verbs()[verb], field.name)
        assert values(from_flag, source)[field.name] == expected
        assert values(from_file, source)[field.name] == expected
    else:
        raw_flag = merged(from_flag, [section])[section][field.name]
        raw_file = merged(from_file, [section])[section][field.name]
        assert coerce(raw_flag, field.type, field.name, field.parse) == expected
        assert coerce(raw_file, field.type, field.name, field.parse) == expected
    assert expected != field.default or field.default is dataclasses.MISSING


def _owner(parser: argparse.ArgumentParser, name: str) -> Any:
    for source in parser.get_default("_lamina_sources"):
        if name in {f.name for f in fields_of(source)}:
            return source
    raise AssertionError(name)


def test_no_verb_declares_a_default_its_config_also_declares() -> None:
    """Hand-written options carry no default of a config field; generated flags default to "not given"."""
    names = {f.name for cls in (*_SECTION_CLASSES.values(), GenerationConfig) for f in fields_of(cls)}
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if action.dest.startswith("cfg:"):
                assert action.default is argparse.SUPPRESS, (verb, action.dest)
            elif action.dest in names:
                assert action.default in (None, False, argparse.SUPPRESS), (
                    f"{verb} {action.option_strings}: default {action.default!r} copies a config field's"
                )


def test_yaml_traps_are_read_by_the_field_type() -> None:
    assert coerce("[yes, no]", list[str]) == ["yes", "no"]
    assert coerce("{50256: -100}", dict[int, float]) == {50256: -100.0}
    assert coerce("null", int | None) is None
    assert coerce("3e-4", float) == 3e-4
    assert coerce("[0-3]", list[str]) == ["0-3"]
    assert coerce("###", list[str]) == ["###"]  # one item needs no brackets
    with pytest.raises(ConfigError, match="top_k"):
        coerce("abc", int, "top_k")
    with pytest.raises(ConfigError, match="is not one of"):
        coerce("fp8", Literal["fp32", "bf16"], "precision")


def test_torch_dtype_names_are_read_as_the_short_ones() -> None:
    from lamina.checkpoint.load import LoadOptions

    args = PARSER.parse_args(normalize_argv(PARSER, ["generate", "m", "p", "--dtype", "float16"]))
    assert values(args, LoadOptions) == {"dtype": "fp16"}
    assert build(TrainConfig, {"precision": "bfloat16"}).precision == "bf16"  # a YAML key
    assert coerce("float32", Literal["fp32", "bf16"] | None, "weights") == "fp32"
    with pytest.raises(ConfigError, match=r"'fp16' \(or torch's names 'float32', 'bfloat16', 'float16'\)"):
        coerce("float8", Literal["fp32", "bf16", "fp16"], "dtype")
    with pytest.raises(ConfigError, match="is not one of 'f32', 'f16'") as e:  # no alias without its target
        coerce("float16", Literal["f32", "f16"], "quant")
    assert "torch" not in str(e.value)


def test_int4_kernel_and_head_topk_flags_reach_load_options() -> None:
    """``--int4-kernel`` / ``--no-int4-kernel`` / unset (automatic) and ``--head-topk K`` are LoadOptions'
    fields; either without ``--weights int4`` is a one-line error."""
    from lamina.checkpoint.load import LoadOptions

    def opts(*flags: str) -> LoadOptions:
        args = PARSER.parse_args(normalize_argv(PARSER, ["generate", "m", "p", *flags]))
        return build(LoadOptions, values(args, LoadOptions))

    fast = opts("--weights", "int4", "--compile", "--int4-kernel", "--head-topk", "16")
    assert (fast.weights, fast.compile, fast.int4_kernel, fast.head_topk) == ("int4", True, True, 16)
    assert opts("--weights", "int4", "--no-int4-kernel").int4_kernel is False
    assert opts("--weights", "int4").int4_kernel is None and opts().head_topk is None
    with pytest.raises(ConfigError, match=r"int4_kernel=true runs int4 weights \(got weights='int8'\)"):
        opts("--weights", "int8", "--int4-kernel")
    with pytest.raises(ConfigError, match=r"head_topk=4 rescores int4's head"):
        opts("--head-topk", "4")
    assert opts("--weights", "bf16", "--no-int4-kernel").int4_kernel is False  # off: nothing to refuse


def test_a_path_field_shows_metavar_path() -> None:
    def metavar(verb: str, flag: str) -> str:
        (action,) = [a for a in _verbs()[verb]._actions if flag in a.option_strings]
        return str(action.metavar)

    assert metavar("pretrain", "--train.out_dir") == "PATH" == metavar("pretrain", "--out")  # str, alias
    assert metavar("pretrain", "--data.tokenizer") == "PATH" == metavar("generate", "--lora")  # str | None
    assert metavar("convert", "--out") == "PATH"  # typed str | os.PathLike
    assert metavar("generate", "--regex") == "TEXT" == metavar("generate", "--system")  # text, not a path


def test_a_help_that_explains_none_does_not_repeat_default_none() -> None:
    helps = {a.option_strings[0]: a.help for a in _verbs()["generate"]._actions if a.option_strings}
    # before: "...; None: a seed drawn from torch's global generator (default: none)"
    assert "None:" in helps["--seed"] and "default:" not in helps["--seed"]
    assert helps["--top-n-sigma"].endswith("(default: none)")  # "None or -1 = off" does not say which
    assert helps["--temperature"].endswith("(default: 1.0)")


def test_every_argument_of_every_verb_says_what_it_takes() -> None:
    # before: `lamina tokenizer count --help` listed TOKENIZER with no help and a lowercase "text"
    bare = [
        f"{verb} {a.option_strings or a.metavar or a.dest}"
        for verb, parser in _verbs().items()
        for a in parser._actions
        if not a.help or (not a.option_strings and not str(a.metavar or a.dest).isupper())
    ]
    assert bare == []


def test_setting_epochs_clears_max_steps_and_back() -> None:
    assert build(TrainConfig, {"epochs": "2"}).max_steps is None
    assert build(TrainConfig, {"max_steps": 5}).epochs is None
    ft = build(TrainConfig, {"preset": "finetune", "max_steps": 5})
    assert (ft.max_steps, ft.epochs, ft.lr) == (5, None, 5e-5)
    with pytest.raises(ConfigError, match="exactly one"):
        build(TrainConfig, {"epochs": 2, "max_steps": 5})


def test_presets_resolve_in_the_config() -> None:
    cfg = build(ModelConfig, {"preset": "tiny", "n_layers": "3"})
    assert (cfg.n_layers, cfg.d_model) == (3, 128)
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        build(ModelConfig, {"preset": "tinyy"})


def test_unknown_keys_name_the_nearest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "g.yaml"
    config.write_text("temprature: 0.5\n")
    assert main(["generate", "m", "p", "--config", str(config)]) == 1
    assert "did you mean 'temperature'" in capsys.readouterr().err


def test_booleans_and_spellings(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        normalize_argv(parser, ["generate", "--logprobs", "smollm2", "hi", "--top_k", "5"])
    )
    assert (args.model, args.prompt) == ("smollm2", "hi")
    assert values(args, GenerationConfig) == {"logprobs": True, "top_k": 5}
    args = parser.parse_args(
        normalize_argv(parser, ["generate", "m", "--logprobs", "false", "--no-do-sample"])
    )
    assert values(args, GenerationConfig) == {"logprobs": False, "do_sample": False}
    args = parser.parse_args(
        normalize_argv(parser, ["pretrain", "--train.out-dir", "x", "--no-train.progress"])
    )
    assert given(args, "train") == {"out_dir": "x", "progress": "false"}


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pretrain", "--model.preset", "tiny", "--train.epochs", "2", "--data.out", str(tmp_path / "d"),
            "--data.builtin", "stdlib", "--out", str(tmp_path / "run"), "--print-config"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["train"]["max_steps"] is None and data["train"]["epochs"] == 2.0
    assert data["train"]["out_dir"] == str(tmp_path / "run") and data["model"]["d_model"] == 128
    (tmp_path / "run.yaml").write_text(printed)
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_help_groups_flags_by_section_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for verb, needles in {
        "pretrain": ["train (TrainConfig)", "model (ModelConfig)", "data (DataConfig)", "default: 0.0003"],
        "generate": ["decoding controls", "loading the model", "--top-k"],
        "serve": ["server (ServeConfig)", "--max-top-logprobs", "--max-embedding-inputs"],
    }.items():
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        for needle in needles:
            assert needle in out, (verb, needle)


def test_every_config_field_has_help() -> None:
    missing = []
    for verb, parser in _verbs().items():
        for section, f in _config_flags(parser):
            if not f.help:
                missing.append(f"{verb}: {section + '.' if section else ''}{f.name}")
    assert not missing, "fields without a help text (a comment on the field's line):\n" + "\n".join(
        sorted(set(missing))
    )


def test_field_types_resolve() -> None:
    """Every generated flag's annotation is a type ``coerce`` can read (no forward references left)."""
    for _verb, parser in _verbs().items():
        for _section, f in _config_flags(parser):
            assert not isinstance(f.type, str | typing.ForwardRef), f.name


@pytest.mark.parametrize("verb", [v for v, p in _verbs().items() if p.get_default("_lamina_sources")])
def test_print_config_round_trips_on_every_one_config_verb(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What --print-config prints, --config reads back to the same config (no model is loaded)."""
    argv = [
        *verb.split(),
        *POSITIONALS.get(verb, []),
        *({"convert": ["--out", "x"], "data prepare": ["--out", "d"]}.get(verb, [])),
    ]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) is not None or verb == "fill-mask"
    (tmp_path / "c.yaml").write_text(printed)
    assert main([*argv, "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_a_flag_wins_over_the_file_and_keeps_the_epochs_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.yaml").write_text("train:\n  max_steps: 6\n  lr: 1e-3\n")
    assert (
        main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--train.epochs", "2", "--print-config"])
        == 0
    )
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert (train["max_steps"], train["epochs"], train["lr"]) == (None, 2.0, 1e-3)


def test_finetune_help_shows_the_finetune_preset_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 5e-05)" in out and "(default: 'runs/finetune')" in out


def test_unknown_flag_names_the_verb_and_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "p", "--top-kk", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lamina generate: error" in err and "did you mean --top-k?" in err


def test_single_stop_string_reads_escapes_as_llama_cpp() -> None:
    assert coerce("\\n", list[str]) == ["\n"]
    assert coerce('["\\n\\n"]', list[str]) == ["\n\n"]


def test_a_boolean_flag_with_a_word_that_is_no_boolean_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--pad-shapes maybe` used to end as argparse's "unrecognized arguments: 'maybe'" (the bare flag
    # meant true and the word was left over); every boolean flag of every verb now names its values.
    # Through main's parse: it keeps the word from filling an optional positional (generate's PROMPT)
    from lamina.cli.main import parse

    checked, taken = 0, set()
    for verb, parser in _verbs().items():
        for flag in sorted(getattr(parser, "_lamina_bools", set())):
            argv = [*verb.split(), *POSITIONALS.get(verb, []), flag, "maybe"]
            try:
                parse(PARSER, argv)
            except SystemExit as e:
                err = capsys.readouterr().err.strip()
                assert e.code == 2 and len(err.splitlines()) == 1, err
                assert f"{flag} 'maybe': " in err and "true or false" in err, err
                checked += 1
            else:
                taken.add(verb)
    assert checked > 50
    assert taken == {"data prepare", "index"}  # their trailing PATHs take any word, by argparse's own rule
