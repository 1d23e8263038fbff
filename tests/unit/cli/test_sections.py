"""stillroom.cli.sections: flags built from a config section, parsed back into it; `--help` shows the schema."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field

from stillroom.cli.main import build_parser, main
from stillroom.cli.sections import add_section_arguments, flag_of, section_command, section_from_args
from stillroom.config import commands
from stillroom.config.core import Strict
from stillroom.config.load import ConfigError

REPO = Path(__file__).resolve().parents[3]


class Toy(Strict):
    """A section with one field of every kind the helper supports."""

    src: str = Field(description="Where from.")
    out: str = Field(description="Where to.")
    n: int = Field(3, ge=1, description="How many.")
    mode: Literal["fast", "slow"] = Field("fast", description="Speed.")
    sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2], description="Sizes.")
    ratio: float | None = Field(None, gt=0, description="A ratio; unset: none.")
    loud: bool = Field(False, description="Say more.")
    tidy: bool = Field(True, description="Clean up after.")
    note: str = Field("100% sure", description="A note with a percent sign.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_section_arguments(p, Toy, positional=("src",))
    return p


def _parse(*argv: str) -> Toy:
    return section_from_args(Toy, _parser().parse_args(list(argv)), ("src",), command="toy")


def test_only_given_flags_reach_the_section_so_the_schema_defaults_apply():
    args = _parser().parse_args(["A", "--out", "B"])
    assert vars(args) == {"src": "A", "out": "B"}  # argparse's own default is "not given"
    assert _parse("A", "--out", "B") == Toy(src="A", out="B")


def test_types_choices_lists_and_switches():
    cfg = _parse("A", "--out", "B", "--n", "7", "--mode", "slow", "--sizes", "4", "5", "6", "--ratio", "0.5",
                 "--loud", "--no-tidy")
    assert (cfg.n, cfg.mode, cfg.sizes, cfg.ratio, cfg.loud, cfg.tidy) == (7, "slow", [4, 5, 6], 0.5, True, False)
    with pytest.raises(SystemExit):
        _parser().parse_args(["A", "--out", "B", "--mode", "medium"])  # not among the choices
    with pytest.raises(SystemExit):
        _parser().parse_args(["A"])  # --out is required
    with pytest.raises(SystemExit):
        _parser().parse_args(["A", "--out", "B", "--n", "many"])


def test_a_refused_value_is_a_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match=r"toy: invalid arguments\n  --n: .*greater than or equal to 1 \(got 0\)"):
        _parse("A", "--out", "B", "--n", "0")
    with pytest.raises(ConfigError, match=r"--sizes: .*greater than or equal to 1"):
        _parse("A", "--out", "B", "--sizes", "3", "0")
    with pytest.raises(ConfigError, match=r"--ratio"):
        _parse("A", "--out", "B", "--ratio", "-1")


def test_help_is_the_description_with_the_schema_default():
    text = " ".join(_parser().format_help().split())
    assert "SRC Where from." in text
    assert "--out OUT Where to. (required)" in text
    assert "--n N How many. (default: 3)" in text
    assert "--mode {fast,slow} Speed. (default: fast)" in text
    assert "Sizes. (default: 1 2)" in text
    assert "A ratio; unset: none. (default: unset)" in text
    assert "--loud, --no-loud Say more. (default: off)" in text
    assert "--tidy, --no-tidy Clean up after. (default: on)" in text
    assert "(default: 100% sure)" in text


def test_unsupported_fields_and_names_are_refused_when_registering():
    class Nested(Strict):
        table: dict[str, int] = Field(default_factory=dict, description="No command-line form.")

    with pytest.raises(TypeError, match="Nested.table"):
        add_section_arguments(argparse.ArgumentParser(), Nested)

    class Clash(Strict):
        func: str = Field("x", description="Used by the parser itself.")

    with pytest.raises(TypeError, match="Clash.func"):
        add_section_arguments(argparse.ArgumentParser(), Clash)
    with pytest.raises(TypeError, match="positional"):
        add_section_arguments(argparse.ArgumentParser(), Toy, positional=("missing",))


def test_section_command_runs_the_function_with_the_section():
    seen = []
    parser = argparse.ArgumentParser(prog="x")
    section_command(parser.add_subparsers(dest="command"), "toy", Toy, seen.append, positional=("src",), help="toy")
    args = parser.parse_args(["toy", "A", "--out", "B", "--n", "2"])
    assert args.func(args) == 0 and seen == [Toy(src="A", out="B", n=2)]
    assert flag_of("max_new_tokens") == "--max-new-tokens" and flag_of("src", ("src",)) == "SRC"


def test_spec_eval_help_shows_the_schema_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["spec-eval", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--target TARGET", "(required)", "--gamma GAMMA [GAMMA ...]", "(default: 1 3 5)",
                     "(default: bundled:instructions)", "--prompts PROMPTS", "(default: 8)", "(default: 64)",
                     "(default: greedy sampling)", "--stop-at-eos, --no-stop-at-eos", "(default: off)",
                     "(default: float32)", "(default: cpu)", "runs/spec-eval/<draft>-vs-<target>"):
        assert expected in text, expected


COMMANDS = {
    "spec-eval": commands.SpecEvalConfig,
    "serve-teacher": commands.ServeTeacherConfig,
    "draft-data": commands.DraftDataConfig,
    "merge": commands.MergeConfig,
    "conditional-extend": commands.ConditionalExtendConfig,
    "conditional-demo-data": commands.ConditionalDemoDataConfig,
    "preference-data": commands.PreferenceDataConfig,
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_command_documents_every_field_and_its_default(name):
    section = COMMANDS[name]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = " ".join(sub.choices[name].format_help().split())
    for field, info in section.model_fields.items():
        assert info.description, f"{section.__name__}.{field} has no description"
        if info.is_required():
            continue
        assert flag_of(field) in help_text, field
        default = info.get_default(call_default_factory=True)
        if isinstance(default, (str, int, float)) and not isinstance(default, bool):
            assert f"(default: {default})" in help_text, field


def test_no_argparse_outside_the_cli_and_no_flag_defaults_in_it():
    lib = [p for p in (REPO / "stillroom").rglob("*.py") if "cli" not in p.relative_to(REPO / "stillroom").parts]
    assert [str(p) for p in lib if "argparse" in p.read_text()] == []
    flag_defaults = []
    for p in sorted((REPO / "stillroom" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" \
                    and any(k.arg == "default" for k in node.keywords):
                flag_defaults.append(f"{p.name}: {ast.unparse(node.args[0]) if node.args else '?'}")
    # Left: `eval --student` (main.py's recipe commands belong to another change).
    assert flag_defaults in ([], ["main.py: '--student'"]), flag_defaults
