"""What every helper script under tests/e2e/scripts shares: the engine the test asked for
(LARGEBATCH_TEST_ENGINE, set by tests/helpers.py's run_mpi_script) and its results, one JSON
object per line on stdout, which the tests parse (tests/helpers.py: ``results``). Under
checks.py, which runs several scripts' checks in one job, each line also names its check."""

import atexit
import json
import os

from largebatch.engines import init_engine

current: dict = {}  # {"script": NAME, "arg": ARG} while checks.py runs that check


def start_engine():
    engine = init_engine(os.environ.get("LARGEBATCH_TEST_ENGINE", "horovod"))
    # Closed before the interpreter exits, as the job closes its own: a Gloo process group left
    # to the exit can abort the finished script (exit 134, "terminate called without an active
    # exception").
    atexit.register(engine.close)
    return engine


def emit(**fields) -> None:
    print(json.dumps({**current, **fields}), flush=True)
