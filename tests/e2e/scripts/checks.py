"""Under mpirun -np 2: several helper scripts' checks in one job, on one engine started once
(every launch costs each rank seconds of importing torch and Horovod).

    checks.py NAME[:ARG] ...        e.g. checks.py accumulation:lars compression parallel_step:1

Each NAME is a script here with ``check(engine[, ARG])``; its JSON lines carry "script": NAME
and "arg": ARG (tests/e2e/conftest.py, engine_checks, reads them). A check that fails says so
in a line with "failed" and ends its process at once (a Gloo group can keep a raising
process alive, and the other rank may be waiting in a collective): mpirun then ends the job,
so the checks after it do not run."""

import importlib
import os
import sys
import traceback

import script
from script import emit, start_engine


def main():
    engine = start_engine()
    for spec in sys.argv[1:]:
        name, _, arg = spec.partition(":")
        script.current = {"script": name, "arg": arg or None}
        try:
            importlib.import_module(name).check(engine, *([arg] if arg else []))
        except BaseException:
            emit(rank=engine.rank, failed=traceback.format_exc())
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        script.current = {}


if __name__ == "__main__":
    main()
