"""The entry points' common body: parse, run, and turn failures into one-line errors."""
from __future__ import annotations

import sys

from .argparsing import UsageError
from .config import parse_config
from .stop import StopRequest


def main(entry: str, argv: list[str] | None = None) -> int:
    # First, before torch loads (seconds): a scheduler's stop signal during start-up is then
    # recorded and honoured at the first report instead of killing the process.
    stop = StopRequest()
    from .engines import EngineError, launcher_rank  # imports torch
    from .parallel import ShardingError
    prog = "pytorch_imagenet_resnet_dali.py" if entry == "dali" else "pytorch_imagenet_resnet.py"
    try:
        cfg = parse_config(argv, entry)
        from .job import run  # torch/horovod import after the flags are known to be good
        return run(cfg, entry, stop)
    except (UsageError, ShardingError) as e:
        # Every rank reaches the same verdict (the checks are agreed across ranks): one says it.
        flag = "--enable-model-parallel: " if isinstance(e, ShardingError) else ""
        if launcher_rank() == 0:
            print(f"{prog}: error: {flag}{e}", file=sys.stderr, flush=True)
        return 2
    except EngineError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
