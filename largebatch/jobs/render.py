"""Fill a job template's @name@ placeholders for one request.

Where a value lands decides how it is written:
- on a comment line (#SBATCH/#PBS directives included) as plain text; a directive whose
  value is missing is disabled as ##SBATCH / ##PBS, so the reader sees what could be set;
- on a shell line, quoted for bash (shlex.quote); a list becomes separate words, and a list
  alone on its line one option per line, for a readable TRAIN_ARGS=( ... ) block.
A placeholder the renderer does not know is an error (a typo in an adapted template).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ..argparsing import UsageError
from .request import ENTRIES, JobRequest

PLACEHOLDER = re.compile(r"@([a-z_]+)@")
DIRECTIVE = re.compile(r"#(SBATCH|PBS)\b")

Value = str | int | list[str] | None


def values(req: JobRequest) -> dict[str, Value]:
    """Every placeholder a template may use, for this request."""
    cpus = req.cpus_per_rank
    chunk = [f"ncpus={req.ranks_per_node * (cpus or 1)}"]
    if req.gpus_per_node:
        chunk.append(f"ngpus={req.gpus_per_node}")
    chunk.append(f"mpiprocs={req.ranks_per_node}")
    if cpus:
        chunk.append(f"ompthreads={cpus}")
    return {
        "job_name": req.job_name,
        "nodes": req.nodes,
        "ranks_per_node": req.ranks_per_node,
        "gpus_per_node": req.gpus_per_node or None,  # 0: no GPU request at all
        "cpus_per_rank": cpus,
        "time": req.time,
        "time_seconds": req.time_seconds,
        "warning_seconds": req.warning_seconds,
        "account": req.account,
        "partition": req.queue,
        "queue": req.queue,
        "select": ":".join([str(req.nodes), *chunk]),
        "log_file": str(req.run_dir / "slurm-%j.out"),
        "requeue": "--requeue" if req.continuation == "requeue" else "--no-requeue",
        "continue": req.continuation,
        "launcher": req.launcher,
        "workdir": str(req.workdir),
        "venv": str(req.venv),
        "train_script": str(ENTRIES[req.entry]),
        "run_dir": str(req.run_dir),
        "modules": list(req.modules),
        "train_args": list(req.train_args),
    }


def fill(template: str, vals: dict[str, Value], source: str = "template") -> str:
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(vals))
    if unknown:
        raise UsageError(
            f"{source} uses unknown placeholder(s) {', '.join(f'@{n}@' for n in unknown)}; "
            f"known: {', '.join(sorted(vals))}"
        )
    return "".join(_fill_line(line, vals) for line in template.splitlines(keepends=True))


def _fill_line(line: str, vals: dict[str, Value]) -> str:
    names = PLACEHOLDER.findall(line)
    if not names:
        return line
    if line.lstrip().startswith("#"):
        if DIRECTIVE.match(line) and any(_missing(vals[n]) for n in names):
            return "#" + PLACEHOLDER.sub(lambda m: f"<{m[1]}>", line)
        return PLACEHOLDER.sub(lambda m: _plain(vals[m[1]]), line)
    alone = re.fullmatch(r"(\s*)@[a-z_]+@(\s*)", line)
    if alone:
        return _shell_lines(vals[names[0]], alone[1], line[len(line.rstrip("\r\n")) :])
    return PLACEHOLDER.sub(lambda m: _shell_words(vals[m[1]]), line)


def _missing(value: Value) -> bool:
    return value is None or value == "" or value == []


def _plain(value: Value) -> str:
    if isinstance(value, list):
        return " ".join(value)
    return "" if value is None else str(value)


def _quote(word: str) -> str:
    """shlex.quote, and quotes around commas too: shellcheck reads `(a 0.08,1)` as a
    mistaken comma-separated array (SC2054)."""
    quoted = shlex.quote(word)
    return f"'{word}'" if quoted == word and "," in word else quoted


def _join(words: list[str]) -> str:
    return " ".join(_quote(w) for w in words)


def _shell_words(value: Value) -> str:
    if isinstance(value, list):
        return _join(value)
    return _quote("" if value is None else str(value))


def _shell_lines(value: Value, indent: str, newline: str) -> str:
    """One option and its values per line: ['--a', '1', '--b'] -> '--a 1' / '--b'."""
    if not isinstance(value, list):
        return indent + _shell_words(value) + newline
    groups: list[list[str]] = []
    for word in value:
        if word.startswith("-") or not groups:
            groups.append([])
        groups[-1].append(word)
    return "".join(indent + _join(g) + newline for g in groups)


def render(req: JobRequest) -> str:
    try:
        template = req.template.read_text()
    except OSError as e:
        raise UsageError(f"cannot read the template {req.template}: {e.strerror or e}") from None
    return fill(template, values(req), source=str(req.template))


def write(req: JobRequest) -> Path:
    """Render into req.script, creating the run directory: the scheduler writes the job's
    log there, and fails the job without a word when the directory is missing."""
    text = render(req)
    try:
        req.run_dir.mkdir(parents=True, exist_ok=True)
        req.script.parent.mkdir(parents=True, exist_ok=True)
        req.script.write_text(text)
        req.script.chmod(0o755)
    except OSError as e:
        raise UsageError(f"cannot write {req.script}: {e.strerror or e}") from None
    return req.script
