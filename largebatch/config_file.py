"""Config files: ``--config FILE.yaml`` and the ``args.yaml`` every run writes.

A config file is a YAML mapping from flag names to values, as timm's ``-c args.yaml``:

    model: resnet50
    base-op: lars            # or base_op: the flag's name with dashes or underscores
    lr-decay-epochs: [30, 60, 80]
    bn-bias-separately: true

It stands for those flags, written before the command line's: a flag given on the command
line wins. A key that names no flag, or a value its flag refuses, is one line naming the file
and the key (and the nearest flag name). ``args.yaml`` in the run directory holds the resolved
configuration of the run, every flag with its value, so ``--config RUN/args.yaml`` runs it
again; ``--print-config`` prints the same and exits.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

from .argparsing import UsageError
from .files import atomic_write

CONFIG_FLAG = "--config"
ARGS_FILE = "args.yaml"


def split_config(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(the --config path, the other arguments): --config FILE or --config=FILE, once."""
    found: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == CONFIG_FLAG:
            if i + 1 == len(argv):
                raise UsageError("argument --config: expected a YAML file")
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(CONFIG_FLAG + "="):
            found.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise UsageError("--config is given more than once: merge the files, or give the rest as flags")
    return (Path(found[0]) if found else None), rest


def load(path: Path) -> dict:
    """The file's mapping; UsageError (one line) if it is missing or not a YAML mapping."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must be a mapping of flag names to values, not a {type(data).__name__}")
    return data


def to_arguments(path: Path, data: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line arguments the file's keys stand for (refused key by key)."""
    flags = _flags(parser)
    arguments: list[str] = []
    for key, value in data.items():
        action = flags.get(str(key).lstrip("-").replace("_", "-"))
        if action is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), list(flags), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"--config {path}: {key!r} is not a flag of this job{hint}")
        arguments += _tokens(path, key, action, value)
    return arguments


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag's long names, without dashes, and its destination, to its action."""
    flags: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        for option in _long_options(action):
            flags[option[2:].replace("_", "-")] = action
        if not action.dest.startswith("seed_"):
            flags.setdefault(action.dest.replace("_", "-"), action)
    return flags


def _long_options(action: argparse.Action) -> list[str]:
    """The action's --names, without the --no- forms a BooleanOptionalAction adds."""
    negative = isinstance(action, argparse.BooleanOptionalAction)
    return [o for o in action.option_strings if o.startswith("--") and not (negative and o.startswith("--no-"))]


def _tokens(path: Path, key: Any, action: argparse.Action, value: Any) -> list[str]:
    option = _long_options(action)[0]
    if value is None:
        return []  # the default
    if isinstance(action, argparse.BooleanOptionalAction):
        _need_bool(path, key, value)
        return [option if value else "--no-" + option[2:]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        _need_bool(path, key, value)
        return [option] if value != isinstance(action, argparse._StoreFalseAction) else []
    if isinstance(value, bool):
        return [option, str(value)]  # --flag True|False (Apex's spelling)
    if isinstance(value, (list, tuple)):
        if action.nargs in ("+", "*"):
            return [option, *map(str, value)]
        return [option, ",".join(map(str, value))]
    return [option, str(value)]


def _need_bool(path: Path, key: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"--config {path}: {key!r} is a switch: true or false, not {value!r}")


# Not flags of a run: the entry script (which script reads the file), the file itself, printing.
_NOT_SAVED = {"entry", "config", "print_config"}


def resolved(values: dict) -> dict:
    """A run's configuration as a config file holds it: flag names, plain values. A flag that
    only applies with another is left out when that one is off (so the file parses again)."""
    out = {key.replace("_", "-"): value for key, value in values.items() if key not in _NOT_SAVED}
    if not values.get("enable_model_parallel"):
        out.pop("model-parallel-dim", None)
    return out


def dump(values: dict) -> str:
    import yaml

    return yaml.safe_dump(resolved(values), sort_keys=False, default_flow_style=None)


def write_args(run_dir: Path, values: dict) -> None:
    """``RUN/args.yaml``: what ``--config`` takes to run this run again."""
    text = (
        "# The resolved configuration of this run: `--config THIS_FILE` runs it again (flags given\n"
        "# on the command line win).\n" + dump(values)
    )
    atomic_write(run_dir / ARGS_FILE, lambda f: f.write(text.encode()))
