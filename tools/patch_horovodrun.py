"""Fix the installed horovodrun for Open MPI 5.

Open MPI 5's launcher (prterun) reads '-bind-to none' as the program to run: its long
options need two dashes (Open MPI 4 accepts both forms). This touches Horovod's Python
only, so it is applied after install and leaves the cached wheel as it is.

Usage: python tools/patch_horovodrun.py
"""

import os
import sys

import horovod

FIXES = {
    "_NO_BINDING_ARGS = ['-bind-to none', '-map-by slot']": "_NO_BINDING_ARGS = ['--bind-to none', '--map-by slot']",
    "_SOCKET_BINDING_ARGS = ['-bind-to socket', '-map-by socket', '-rank-by core']": (
        "_SOCKET_BINDING_ARGS = ['--bind-to socket', '--map-by socket', '--rank-by core']"
    ),
}


def main() -> None:
    path = os.path.join(os.path.dirname(horovod.__file__), "runner", "mpi_run.py")
    with open(path) as f:
        text = f.read()
    for old, new in FIXES.items():
        if old in text:
            text = text.replace(old, new)
        elif new not in text:
            sys.exit(f"patch_horovodrun: '{old}' not found in {path}: the Horovod source changed")
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
