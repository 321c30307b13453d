"""The option layer (taskres.app.options): `train` and `sweep` accept and refuse the same values for every option of
the registry, and --grid and a --config TOML read them with the same parsers; flag names in messages come from the
parser. All by parsing: nothing trains."""

import argparse
import math
import typing

import pytest
from conftest import run_cli

from taskres.app.cli import build_parser
from taskres.app.messages import describe, flag_names, message_names, subparser
from taskres.app.options import CommaList, method_options, optim_options
from taskres.app.sweep_cli import config_values, parse_grid
from taskres.errors import TaskResError, TaskResValueError, invalid

REFUSED = "refused"
OPTIONS = {**optim_options(), **method_options()}


def texts(option):
    """Values to try: a valid one, nan and inf, a wrong type, out of the choices."""
    args = (option.annotation, *typing.get_args(option.annotation))
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]
    valid = {int: "3", float: "0.25", str: "x.pt"}.get(option.annotation, "1")
    if literal:
        valid = typing.get_args(literal[0])[-1]
    elif float in typing.get_args(option.annotation):
        valid = "0.25"
    return [valid, "nan", "inf", "-inf", "abc", "1.5", "7", "", "bogus", "true"]


def parsed(command, option, text):
    """What `taskres COMMAND FLAG TEXT` parses to ("switch": the bare switch), or REFUSED (argparse exits 2)."""
    argv = ["train", "--backbone", "b", "--out", "o"] if command == "train" else ["sweep", "EXP"]
    argv.append(option.flag if text == "switch" else f"{option.flag}={text}")
    try:
        return getattr(build_parser().parse_args(argv), option.dest)
    except SystemExit as exit:
        assert exit.code == 2
        return REFUSED


def train_value(option, text):
    return parsed("train", option, text)


def run(argv, capsys):
    """(exit code, stdout, stderr) of the CLI, argparse's refusals (SystemExit) included."""
    try:
        return run_cli(argv, capsys)
    except SystemExit as exit:
        out, err = capsys.readouterr()
        return exit.code, out, err


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("flag", list(OPTIONS))
def test_train_and_sweep_accept_and_refuse_the_same_values(flag, capsys):
    option = OPTIONS[flag]
    cases = ["switch", "true", "false", "x"] if option.annotation is bool else texts(option)
    outcomes = {t: (parsed("train", option, t), parsed("sweep", option, t)) for t in cases}
    capsys.readouterr()
    for text, (train, sweep) in outcomes.items():
        assert same(train, sweep), (flag, text, train, sweep)
    if option.annotation is bool:
        assert outcomes["switch"] == (True, True) and outcomes["true"] == (REFUSED, REFUSED)
        return
    accepted = [t for t, (train, _) in outcomes.items() if train is not REFUSED]
    assert texts(option)[0] in accepted  # a valid value is taken
    if str not in (option.annotation, *typing.get_args(option.annotation)):  # a number or a choice
        assert not {"nan", "inf", "-inf", "abc", ""} & set(accepted), (flag, accepted)


@pytest.mark.parametrize("flag", [f for f in method_options()])
def test_grid_values_are_read_as_the_flag_reads_them(flag):
    option = method_options()[flag]
    if option.annotation is bool:
        assert parse_grid([f"{option.name}=false,true"]) == {option.name: (False, True)}
        with pytest.raises(TaskResValueError, match=f"grid option {option.name}: expected true or false; got 'x'"):
            parse_grid([f"{option.name}=x"])
        return
    for text in texts(option):
        if "," in text or not text.strip():
            continue
        flag_value = train_value(option, text)
        if flag_value is REFUSED:
            with pytest.raises(TaskResValueError, match=f"^grid option {option.name}: "):
                parse_grid([f"{option.name}={text}"])
        else:
            assert same(parse_grid([f"{option.name}={text}"])[option.name][0], flag_value), (flag, text)


def toml_literal(text):
    """The TOML a user would write for a value: a bare number or bool where it is one, else a string."""
    try:
        float(text)
        return text if text.strip() else '""'
    except ValueError:
        return text if text in ("true", "false") else f'"{text}"'


@pytest.mark.parametrize("flag", list(OPTIONS))
def test_config_file_values_are_read_as_the_flag_reads_them(flag, tmp_path):
    option = OPTIONS[flag]
    sweep = subparser(build_parser(), "sweep")
    cases = ["true", "false", "x", "1"] if option.annotation is bool else texts(option)
    for text in cases:
        for literal in {toml_literal(text), f'"{text}"'}:
            path = tmp_path / "grid.toml"
            path.write_text(f"{option.name} = {literal}\n")
            if option.annotation is bool:
                flag_value = {"true": True, "false": False}.get(text, REFUSED)
            else:
                flag_value = train_value(option, text)
            try:
                value = config_values(str(path), sweep)[option.dest]
            except TaskResValueError as err:
                assert flag_value is REFUSED, (flag, literal, str(err))
                assert f": {option.name}: " in str(err)
            else:
                assert same(value, flag_value), (flag, literal, value, flag_value)


@pytest.mark.parametrize(
    "single,many",
    [
        ("--shots", "--shots"),
        ("--seed", "--seeds"),
        ("--backbone", "--backbone"),
        ("--method", "--methods"),
        ("--dataset", "--dataset"),
    ],
)
def test_a_sweep_list_reads_each_item_with_trains_parser(single, many):
    parser = build_parser()
    train = next(a for a in subparser(parser, "train")._actions if single in a.option_strings)
    sweep = next(a for a in subparser(parser, "sweep")._actions if many in a.option_strings)
    assert isinstance(sweep.type, CommaList) and sweep.type.element is (train.type or str)


def test_every_flag_two_commands_share_parses_alike():
    """One definition per flag: the same parser function in every command that takes it (a sweep list: its
    items'), apart from the flags that mean something else there."""
    differ = {("zeroshot", "--protocol"), ("demo", "--views"), ("demo", "--seeds"), ("demo", "--out")}
    parser = build_parser()
    seen: dict[str, tuple] = {}
    for command in ("train", "zeroshot", "import-official", "eval", "predict", "export", "sweep", "demo"):
        for action in subparser(parser, command)._actions:
            for flag in action.option_strings:
                kind = action.type.element if isinstance(action.type, CommaList) else action.type
                if (command, flag) in differ or flag in ("-h", "--help"):
                    continue
                first = seen.setdefault(flag, (command, kind))
                assert first[1] is kind, (flag, first[0], command)
    assert {"--lr", "--alpha", "--views", "--protocol", "--precision", "--engine", "--backbone"} <= set(seen)


def test_the_four_config_file_refusals_exit_2_before_anything_is_written(tmp_path, capsys):
    cases = {
        'lr = "abc"': "lr: expected a number; got 'abc'",
        'protocol = "bogus"': "protocol: invalid choice: 'bogus'",
        "shots = [1.7]": "shots: invalid int value: '1.7'",
        "alpha = nan": "alpha: expected a finite number; got 'nan'",
    }
    for i, (line, match) in enumerate(cases.items()):
        path = tmp_path / f"g{i}.toml"
        path.write_text(f'dataset = "dtd"\nroot = "{tmp_path}"\nbackbone = "RN50"\n{line}\n')
        code, _, err = run(["sweep", str(tmp_path / "exp"), "--device", "cpu", "--config", str(path)], capsys)
        assert code == 2 and match in err and "Traceback" not in err, (line, err)
        assert err.startswith(f"taskres: error: config file {str(path)!r}: ")
        assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--lr", "nan"], "argument --lr: expected a finite number; got 'nan'"),
        (["--weight-decay", "inf"], "argument --weight-decay: expected a finite number; got 'inf'"),
        (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
        (["--shots", "1,x"], "argument --shots: invalid int value: 'x'"),
        (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
        (["--grid", "alpha=nan"], "taskres: error: grid option alpha: expected a finite number; got 'nan'."),
        (["--grid", "alpha=1", "--grid", "alpha=2"], "grid option alpha is given twice"),
        (["--lr", "-1"], "taskres: error: --lr must be a finite number > 0; got -1.0."),
        (["--protocol", "official", "--methods", "coop"], "--protocol official runs a method as its public code"),
    ],
)
def test_sweep_refusals_exit_2_before_anything_is_written(env, capsys, argv, match):
    tmp, base, _ = env
    code, _, err = run(["sweep", str(tmp / "exp"), *base, "--methods", "taskres", *argv], capsys)
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp / "exp").exists()


def test_flag_names_come_from_the_parser():
    parser = build_parser()
    names = flag_names(subparser(parser, "eval"))
    assert names["run"] == "--run" and names["encode_batch_size"] == "--encode-batch-size"
    assert flag_names(subparser(parser, "import-official"))["checkpoint"] == "CHECKPOINT"
    assert flag_names(subparser(parser, "sweep"))["exp"] == "EXP"
    train = message_names(parser, "train", "tip-adapter")
    assert train["alpha"] == "--tip-alpha" and train["beta"] == "--tip-beta" and train["c"] == "--lp-c"
    assert message_names(parser, "train", "taskres")["alpha"] == "--alpha"
    assert train["templates"] == "--template" and train["batch_size"] == "--batch-size"
    assert message_names(parser, "import-official")["alpha"] == "--alpha"
    assert message_names(parser, "export")["check_images"] == "--check-images"
    # every dest of every command is named
    for command in ("train", "sweep", "export", "predict"):
        for action in subparser(parser, command)._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.dest in message_names(parser, command)


def test_describe_keeps_the_libraries_message_with_flags():
    names = message_names(build_parser(), "train", "tip-adapter")
    err = invalid("alpha", "be >= 0", -1.0)
    assert describe(err, names) == "--tip-alpha must be >= 0; got -1.0."
    err = TaskResError("set `search` none and a fixed `c`; `nothing` stays.", param="c")
    assert describe(err, names) == "set --search none and a fixed --lp-c; nothing stays."
    assert describe(TaskResError("alphabet soup", param="alpha"), names) == "alphabet soup"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--method", "linear-probe", "--alpha", "1"], "--alpha applies to --method taskres or "),
        (["train", "--method", "tip-adapter", "--lr", "0.1"], "--lr: method 'tip-adapter' is training-free"),
        (["train", "--encode-batch-size", "0"], "--encode-batch-size must be >= 1"),
        (["zeroshot", "--encode-batch-size", "0"], "--encode-batch-size must be >= 1"),
        (
            ["train", "--method", "tip-adapter", "--search", "none", "--tip-alpha", "-1", "--tip-beta", "1"],
            "--tip-alpha and --tip-beta must be finite",
        ),
    ],
)
def test_library_refusals_name_the_flags(env, capsys, argv, match):
    tmp, base, _ = env
    extra = ["--shots", "1", "--seed", "1"] if argv[0] == "train" else []
    code, _, err = run([argv[0], *base, *extra, *argv[1:], "--out", str(tmp / "r")], capsys)
    assert code == 2 and err.startswith("taskres: error: ") and match in err and "Traceback" not in err, err
    assert not (tmp / "r").exists()
