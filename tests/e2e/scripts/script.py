"""What every helper script under tests/e2e/scripts shares: the engine the test asked for
(LARGEBATCH_TEST_ENGINE, set by tests/helpers.py's run_mpi_script) and its results, one JSON
object per line on stdout, which the tests parse (tests/helpers.py: ``results``)."""
import json
import os

from largebatch.engines import init_engine


def start_engine():
    return init_engine(os.environ.get("LARGEBATCH_TEST_ENGINE", "horovod"))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)
