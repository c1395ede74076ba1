"""largebatch is an installable package (pyproject.toml), installed editable by tools/setup.sh,
and nothing patches sys.path: the package, lars and schedulers import from this checkout in
any directory with no PYTHONPATH, as MPI ranks and job scripts need them to."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_imports_from_this_checkout_in_any_directory(tmp_path):
    # find_spec, not import: the answer is where Python would load each from, without running
    # it; from an empty directory and without PYTHONPATH only the install can answer.
    code = (
        "import importlib.util as u\n"
        "for name in ('largebatch', 'lars', 'schedulers', 'bench', 'tests'):\n"
        "    spec = u.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert found.pop("bench") == found.pop("tests") == "None", f"only the package is installed: {proc.stdout}"
    expected = {
        "largebatch": ROOT / "largebatch" / "__init__.py",
        "lars": ROOT / "lars.py",
        "schedulers": ROOT / "schedulers.py",
    }
    assert {name: Path(origin).resolve() if origin != "None" else None for name, origin in found.items()} == expected, (
        "largebatch is not installed from this checkout: run tools/setup.sh (make setup)"
    )


def test_a_wheel_holds_the_package_its_templates_and_the_two_modules_only(tmp_path):
    """What a non-editable install would get, built from a copy of the sources."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "largebatch", src / "largebatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "lars.py", "schedulers.py"):
        shutil.copy(ROOT / name, src / name)
    sources = {str(p.relative_to(src)) for p in src.rglob("*.py")}  # before the build adds build/
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("largebatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"largebatch", "lars.py", "schedulers.py"}, top
    modules = {n for n in names if n.endswith(".py")}
    assert modules == sources, f"missing from the wheel: {sorted(sources - modules)}"
    # Package data: the job-script templates `python -m largebatch.jobs render` fills in.
    templates = {str(p.relative_to(src)) for p in (src / "largebatch" / "jobs" / "templates").glob("*/*")}
    assert len(templates) == 4 and templates <= set(names), (
        f"templates missing from the wheel: {templates - set(names)}"
    )
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("/METADATA"))
    assert "Requires-Python: >=3.11" in metadata


def test_nothing_patches_sys_path():
    """The package comes from the install; bench/ scripts find their siblings as scripts do;
    pytest finds the test helpers by its import mode (pyproject.toml)."""
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|PYTHONPATH=|[\"']PYTHONPATH[\"']")
    files = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and p != Path(__file__).resolve()
        and (p.suffix in (".py", ".sh", ".sbatch", ".pbs") or p.name == "Makefile")
        and not any(part.startswith(".") or part == "build" for part in p.relative_to(ROOT).parts)
    ]
    assert len(files) > 50, "the walk found too few files to mean anything"
    # A test may put a fake package in front of the installed ones (and says so on that line).
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line) and "in front of the installed" not in line
    ]
    assert not offenders, "\n".join(offenders)
