"""The one argparse parser of every largebatch command: it raises UsageError instead of
printing usage and exiting, so each entry point reports a bad flag, like any other
problem with the user's input, as one line with exit status 2.

    from largebatch.argparsing import Parser, UsageError
"""

from __future__ import annotations

import argparse

__all__ = ["Parser", "UsageError"]


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise UsageError(message). Subcommands: pass
    ``parser_class=Parser`` to ``add_subparsers`` so theirs do too."""

    def error(self, message: str):
        raise UsageError(message)
