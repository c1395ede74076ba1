#!/usr/bin/env bash
# Install a single-node SLURM (Debian's slurmctld, slurmd, slurm-client) and munge, so the
# scheduler tests in tests/e2e/test_slurm.py can start a real cluster of their own.
# Idempotent: when everything is there it says so and returns at once. Installs only as root
# with apt-get; anywhere else it explains and exits 1 (the tests then skip and say why).
# Nothing is started or enabled: the tests run their own daemons in a temporary directory.
set -euo pipefail
shopt -s nullglob

PACKAGES=(slurmctld slurmd slurm-client munge libpmix2)
BINARIES=(slurmctld slurmd sbatch srun squeue scontrol scancel sinfo munged)

say() { printf 'install_slurm: %s\n' "$*"; }
die() { printf 'install_slurm: error: %s\n' "$*" >&2; exit 1; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# `srun --mpi=pmix`: Debian's slurm plugin opens the unversioned libpmix.so, which only
# libpmix-dev ships (with autotools and a dozen -dev packages in tow); libpmix2 and that one
# link are all the plugin needs.
pmix_link() {
    local libs=(/usr/lib/*/pmix2/lib/libpmix.so.2)
    [ ${#libs[@]} -gt 0 ] || return 1
    echo "$(dirname "${libs[0]}")/libpmix.so"
}

missing=()
for b in "${BINARIES[@]}"; do
    have "$b" || missing+=("$b")
done
link=$(pmix_link) || link=
if [ -z "$link" ]; then
    missing+=("libpmix.so.2")
elif [ ! -e "$link" ]; then
    missing+=("$link")
fi
if [ ${#missing[@]} -eq 0 ]; then
    say "already installed: $(slurmd -V), $(munged --version | cut -d' ' -f1), PMIx for srun"
    exit 0
fi
say "missing: ${missing[*]}"

[ "$(id -u)" -eq 0 ] || die "installing ${PACKAGES[*]} needs root (run: sudo $0)"
command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install ${PACKAGES[*]} with this system's package manager"

say "apt-get update"
apt-get update -qq
say "apt-get install ${PACKAGES[*]}"
# No daemon may start during installation (containers have no init; the tests start their own).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
for b in "${BINARIES[@]}"; do
    have "$b" || die "$b is still missing after installing ${PACKAGES[*]}"
done
link=$(pmix_link) || die "libpmix.so.2 is still missing after installing libpmix2"
if [ ! -e "$link" ]; then
    say "linking $link -> libpmix.so.2"
    ln -s libpmix.so.2 "$link"
fi
say "installed: $(slurmd -V), $(munged --version | cut -d' ' -f1), PMIx for srun"
