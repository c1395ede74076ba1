"""Patch a Horovod 0.28.1 source tree so it builds against today's PyTorch.

Horovod's last release pins C++14; torch >= 2.1 headers need C++17 and torch >= 2.15
needs C++20 (std::bit_width in c10). With --cpu-only, Horovod ignores the CUDA build of
torch: otherwise its CMake compiles CUDA parts whenever torch reports a CUDA_HOME, which
fails on machines that have nvcc but no CUDA runtime.

Usage: python tools/patch_horovod.py SRC_DIR --torch-cxx-std 20 [--cpu-only]
"""

import argparse
import pathlib
import sys


def replace_once(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    count = text.count(old)
    if count == 0 and new in text:
        return  # patched before: keep the script idempotent
    if count != 1:
        sys.exit(f"patch_horovod: expected one '{old.strip()}' in {path}, found {count}: the Horovod source changed")
    path.write_text(text.replace(old, new))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("src", type=pathlib.Path)
    parser.add_argument("--torch-cxx-std", default="17", choices=["17", "20"])
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()

    root = args.src / "CMakeLists.txt"
    torch_cmake = args.src / "horovod" / "torch" / "CMakeLists.txt"
    replace_once(root, "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)")
    replace_once(torch_cmake, "    set(CMAKE_CXX_STANDARD 14)", f"    set(CMAKE_CXX_STANDARD {args.torch_cxx_std})")
    if args.cpu_only:
        replace_once(
            root, "    enable_language(CUDA)\n", '    message(STATUS "largebatch: CPU-only build, CUDA left off")\n'
        )
        replace_once(
            args.src / "cmake" / "Modules" / "FindPytorch.cmake",
            'string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)',
            "set(Pytorch_CUDA FALSE)  # largebatch: CPU-only build",
        )


if __name__ == "__main__":
    main()
