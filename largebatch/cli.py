"""The entry points' common body: parse, run, and turn failures into one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .argparsing import UsageError
from .config import parse_config
from .launch import EXIT_DIR
from .stop import StopRequest


def main(entry: str, argv: list[str] | None = None) -> int:
    code = _main(entry, argv)
    report_exit(code)
    return code


def report_exit(code: int) -> None:
    """Under ``python -m largebatch.launch``: this rank's exit status, for the wrapper to
    return the job's own status where a launcher (torchrun) turns every failure into 1."""
    directory = os.environ.get(EXIT_DIR)
    if directory:
        from .engines import launcher_rank

        try:
            Path(directory, f"rank-{launcher_rank()}").write_text(f"{code}\n")
        except OSError:
            pass  # the wrapper then returns the launcher's status


def _main(entry: str, argv: list[str] | None) -> int:
    # First, before torch loads (seconds): a scheduler's stop signal during start-up is then
    # recorded and honoured at the first report instead of killing the process.
    stop = StopRequest()
    stop.watch_parent()
    from .checkpoint import CheckpointWriteError
    from .data.checks import DataError
    from .engines import EngineError, launcher_rank, lost_peer  # imports torch
    from .parallel import ShardingError

    prog = "pytorch_imagenet_resnet_dali.py" if entry == "dali" else "pytorch_imagenet_resnet.py"
    try:
        cfg = parse_config(argv, entry)
        if cfg.run.print_config:
            from .config_file import dump

            print(dump(cfg.to_dict()), end="", flush=True)
            return 0
        from .job import run  # torch/horovod import after the flags are known to be good

        return run(cfg, stop)
    except (UsageError, ShardingError) as e:
        # Every rank reaches the same verdict (the checks are agreed across ranks): one says it.
        # Bad data met while reading is one rank's own finding: that rank says it.
        flag = "--enable-model-parallel: " if isinstance(e, ShardingError) else ""
        if launcher_rank() == 0 or isinstance(e, DataError):
            print(f"{prog}: error: {flag}{e}", file=sys.stderr, flush=True)
        return 2
    except CheckpointWriteError as e:
        # Raised on every rank with rank 0's message (job.saver agrees on it): one says it.
        if launcher_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except EngineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        # Another rank died (killed, out of memory, its node lost): the collective this rank
        # was in fails. Its traceback says nothing about the cause, which is the dead rank's
        # (and its launcher's) to tell; every other RuntimeError is a bug and keeps its traceback.
        reason = lost_peer(e)
        if reason is None:
            raise
        print(
            f"{prog}: error: rank {launcher_rank()} lost its connection to another process ({reason}); "
            f"that process ended first (see its own message or the launcher's); continue the run from its "
            f"last checkpoint with --resume auto",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
