"""The one argparse parser of every largebatch command: it raises UsageError instead of
printing usage and exiting, so each entry point reports a bad flag, like any other
problem with the user's input, as one line with exit status 2.

    from largebatch.argparsing import Parser, UsageError
"""

from __future__ import annotations

import argparse
import math

__all__ = ["Parser", "UsageError", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise UsageError(message). Subcommands: pass
    ``parser_class=Parser`` to ``add_subparsers`` so theirs do too."""

    def error(self, message: str):
        raise UsageError(message)


# --- value types of flags (argparse ``type=``): a bad value is argparse's one-line error --------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
