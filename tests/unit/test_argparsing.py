"""One argparse parser for every command (largebatch/argparsing.py): a bad flag raises the
one UsageError that every entry point turns into a single line and exit status 2."""

from __future__ import annotations

import pytest

from largebatch import config, report
from largebatch.argparsing import Parser, UsageError
from largebatch.data import tfrecord
from largebatch.jobs import cli as jobs_cli


def test_usage_error_is_one_class_wherever_it_is_imported_from():
    # Modules catch it under either name; two classes would let errors slip past.
    assert config.UsageError is UsageError


def test_parser_and_its_subcommands_raise_instead_of_exiting():
    p = Parser(prog="prog")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("go").add_argument("--n", type=int, required=True)
    with pytest.raises(UsageError, match="the following arguments are required: command"):
        p.parse_args([])
    with pytest.raises(UsageError, match="argument --n: invalid int value: 'x'"):
        p.parse_args(["go", "--n", "x"])
    with pytest.raises(UsageError, match="the following arguments are required: --n"):
        p.parse_args(["go"])
    assert p.parse_args(["go", "--n", "3"]).n == 3


@pytest.mark.parametrize(
    "main, argv, prog, message",
    [
        (jobs_cli.main, ["render", "--scheduler", "lsf"], "python -m largebatch.jobs", "invalid choice: 'lsf'"),
        (tfrecord.main, ["convert", "only-src"], "python -m largebatch.data.tfrecord", "required: out"),
        (
            tfrecord.main,
            ["index", "d", "--workers", "0"],
            "python -m largebatch.data.tfrecord",
            "must be a positive integer",
        ),
        (report.main, ["--x", "time", "run"], "python -m largebatch.report", "invalid choice: 'time'"),
    ],
)
def test_every_command_reports_a_bad_flag_in_one_line(capsys, main, argv, prog, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and message in err, err
