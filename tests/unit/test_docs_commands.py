"""The commands in README.md and docs/*.md work as written, checked without running them.

Every ```sh, ```bash, ```shell or ```console block is read as a shell would read it
(backslash continuations, comments, `$ ` prompts, VAR=value prefixes, &&, ||, ;, |), and each
command is checked by what it names: a `make` target and its variables exist in the
Makefile; the training entry points' flags go through `largebatch.config.parse_config`, the
job scripts' through `python -m largebatch.jobs`'s own parser and request checks; a
`python -m` module imports and its subcommand and flags exist; a script named by path
exists, and so do its flags; torchrun's and torch.distributed.launch's own flags parse.
Nothing is trained, submitted or written.

A trailing or standalone `...` stands for flags the text leaves out: the flags given are
checked, and a missing data directory is not an error then. Commands with other placeholders
(`<jobid>`, `...same options...`) are left out, counted, and must stay a small share.
Links between the pages, and their #anchors, are checked here too.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "shell-session"}
TRAINING = {"pytorch_imagenet_resnet.py": "folder", "pytorch_imagenet_resnet_dali.py": "dali"}
LAUNCHERS = {"mpirun", "mpiexec", "horovodrun", "srun"}
# Other people's programs: the docs show them, the test cannot check their arguments.
EXTERNAL = {
    "less",
    "cat",
    "tail",
    "head",
    "grep",
    "ls",
    "cd",
    "rm",
    "mkdir",
    "export",
    "module",
    "ssh",
    "sbatch",
    "squeue",
    "scancel",
    "scontrol",
    "sacct",
    "qsub",
    "qstat",
    "qdel",
    "tensorboard",
    "nvidia-smi",
    "kill",
    "pip",
    "git",
    "tee",
    "sort",
    "wc",
    "echo",
    "time",
    "xargs",
}
# Errors that only say a path named in the docs is not on this machine (a checkpoint, a
# template, the environment a job script activates when pytest runs outside one).
ABSENT_PATH = re.compile(r"no such (checkpoint )?file|no bin/activate there")
# What parse_config says when the data flags are among those a `...` leaves out.
DATA_LEFT_OUT = re.compile(r"--train-dir and --val-dir are required|--data-dir is required")
PLACEHOLDER = re.compile(r"<[A-Za-z_][\w .-]*>|\.\.\.")
OPERATORS = {"&&", "||", ";", "|", "&"}
MIN_CHECKED = 0.8


# --- reading the commands out of the pages -----------------------------------------------------


@dataclass
class Command:
    where: str  # page:line of the command's first line
    text: str  # continuations joined, as a shell reads it
    simple: list[list[str]] = field(default_factory=list)  # split at &&, ||, ;, |
    elided: bool = False  # a standalone `...` stands for flags left out
    placeholder: str = ""  # the first other placeholder, if any: not checked


def fenced_blocks(text: str):
    """(language, line number of the block's first line, its lines) for each fenced block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, language = m[1], m[2].lower()
        start = i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        yield language, start + 1, lines[start:i]
        i += 1


def shell_lines(language: str, first: int, lines: list[str]):
    """(line number, command text) with continuations joined; output lines of a console block
    (those without a `$ ` prompt) are left out."""
    console = language in ("console", "shell-session")
    i = 0
    while i < len(lines):
        line, number = lines[i], first + i
        i += 1
        stripped = line.strip()
        if console:
            if not stripped.startswith("$"):
                continue
            stripped = stripped[1:].strip()
        elif stripped.startswith("$ "):
            stripped = stripped[2:].strip()
        if not stripped or stripped.startswith("#"):
            continue
        while stripped.endswith("\\") and i < len(lines):
            stripped = stripped[:-1] + " " + lines[i].strip()
            i += 1
        yield number, stripped


def tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def parse_command(where: str, text: str) -> Command:
    cmd = Command(where, text)
    # `[--flag VALUE]` is an optional part: check it; `[RUN_DIR ...]` adds nothing to check.
    text = re.sub(r"(?<=\s)\[([^\[\]]*)\]", lambda m: "" if "..." in m[1] else m[1], text)
    current: list[str] = []
    for tok in tokens(text):
        if tok in OPERATORS:
            if current:
                cmd.simple.append(current)
            current = []
        elif tok == "...":
            cmd.elided = True
        else:
            if not cmd.placeholder and PLACEHOLDER.search(tok):
                cmd.placeholder = tok
            current.append(tok)
    if current:
        cmd.simple.append(current)
    return cmd


def commands_in(text: str, name: str) -> list[Command]:
    return [
        parse_command(f"{name}:{number}", line)
        for language, first, lines in fenced_blocks(text)
        if language in SHELL_LANGUAGES
        for number, line in shell_lines(language, first, lines)
    ]


COMMANDS = [c for page in PAGES for c in commands_in(page.read_text(), page.relative_to(ROOT).as_posix())]


# --- what the repository offers ----------------------------------------------------------------


@functools.cache
def makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    # .PHONY and the like are make's own, not targets to run
    targets = {t for t in re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M) if not t.startswith(".")}
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:?+]?=", text, re.M))
    return targets, variables


@functools.cache
def environment_names() -> str:
    """The text in which a LARGEBATCH_* variable the docs set must appear."""
    files = [ROOT / "tools" / "setup.sh", ROOT / "Makefile", *sorted((ROOT / "largebatch").rglob("*.py"))]
    return "\n".join(p.read_text() for p in files)


@functools.cache
def argparse_words(files: tuple[Path, ...]) -> tuple[set[str], set[str]]:
    """Option strings (add_argument) and subcommands (add_parser) in these files' source."""
    options, commands = set(), set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                words = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if node.func.attr == "add_argument":
                    options.update(w for w in words if w.startswith("-"))
                elif node.func.attr == "add_parser" and words:
                    commands.add(words[0])
    return options, commands


@functools.cache
def pytest_markers() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {m.split(":")[0].strip() for m in config.get("markers", [])}


# --- the checks --------------------------------------------------------------------------------


class Wrong(Exception):
    """What is wrong with a command, in one line."""


def is_python(word: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", word) is not None


def check_training(args: list[str], entry: str, elided: bool) -> None:
    from largebatch.argparsing import UsageError
    from largebatch.config import parse_config

    if {"-h", "--help"} & set(args):
        return
    try:
        parse_config(args, entry)
    except UsageError as e:
        if ABSENT_PATH.search(str(e)) or (elided and DATA_LEFT_OUT.search(str(e))):
            return
        raise Wrong(f"{TRAINING_NAME[entry]}: {e}") from None


TRAINING_NAME = {entry: name for name, entry in TRAINING.items()}


def check_flags(args: list[str], files: list[Path], what: str) -> None:
    """Flags against the option strings and the first word against the subcommands that the
    files' argparse calls declare (for scripts and modules without a parser to import)."""
    options, commands = argparse_words(tuple(files))
    if not options and not commands:
        return
    for arg in args:
        if re.match(r"-[^\d.]", arg) and arg.split("=", 1)[0] not in options | {"-h", "--help"}:
            raise Wrong(f"{what}: no option {arg.split('=', 1)[0]}")
    words = [a for a in args if not re.match(r"-[^\d.]", a)]
    if commands and words and words[0] not in commands:
        raise Wrong(f"{what}: no subcommand {words[0]!r} (there are {', '.join(sorted(commands))})")


def check_script(script: str, args: list[str], elided: bool) -> None:
    path = ROOT / script
    if not path.is_file():
        raise Wrong(f"no file {script} in the repository")
    if path.name in TRAINING and path.parent == ROOT:
        check_training(args, TRAINING[path.name], elided)
    elif path.suffix == ".py":
        check_flags(args, [path], script)


def parse_with(parser: argparse.ArgumentParser, args: list[str], what: str) -> argparse.Namespace:
    """A plain argparse parser (torch's): its usage error, in one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        raise Wrong(f"{what}: {err.getvalue().strip().splitlines()[-1]}") from None


def check_torchrun(args: list[str], elided: bool, module: str = "torch.distributed.run") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.distributed.launch says it is deprecated
        parser = importlib.import_module(module).get_args_parser()
    ns = parse_with(parser, args, module)
    check_script(ns.training_script, ns.training_script_args, elided)


def check_module(module: str, args: list[str], elided: bool) -> None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise Wrong(f"no module {module}")
    if module == "largebatch.jobs":
        check_jobs(args, elided)
    elif module == "largebatch.report":
        from largebatch.argparsing import UsageError
        from largebatch.report import parse_args

        try:
            parse_args(args)
        except UsageError as e:
            raise Wrong(f"{module}: {e}") from None
    elif module == "largebatch.launch":
        if not args:
            raise Wrong(f"{module}: no launcher command")
        check_simple(args, elided)
    elif module in ("torch.distributed.launch", "torch.distributed.run"):
        check_torchrun(args, elided, module)
    elif module == "pytest":
        check_pytest(args)
    elif spec.origin and Path(spec.origin).is_relative_to(ROOT):
        origin = Path(spec.origin)
        files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
        check_flags(args, files, f"python -m {module}")


def check_jobs(args: list[str], elided: bool) -> None:
    from largebatch.argparsing import UsageError
    from largebatch.jobs.cli import build_parser, split_argv
    from largebatch.jobs.request import build_request

    ours, train = split_argv(args)
    try:
        ns = build_parser().parse_args(ours)
        if ns.command not in ("render", "submit"):
            return
        if elided:
            if train:
                check_training(train, ns.entry, elided)
            return
        build_request(ns, train, ROOT)  # checks, writes nothing
    except UsageError as e:
        if not ABSENT_PATH.search(str(e)):
            raise Wrong(f"python -m largebatch.jobs: {e}") from None


def check_pytest(args: list[str]) -> None:
    markers = pytest_markers()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m" and i + 1 < len(args):
            unknown = set(re.findall(r"[A-Za-z_]\w*", args[i + 1])) - {"and", "or", "not"} - markers
            if unknown:
                raise Wrong(f"pytest -m: unregistered markers {sorted(unknown)} (pyproject.toml has {sorted(markers)})")
            i += 2
            continue
        if arg in ("-k", "-p", "-c", "-o", "--maxfail", "--durations", "--rootdir", "-n"):
            i += 2
            continue
        if not arg.startswith("-") and not (ROOT / arg.split("::")[0]).exists():
            raise Wrong(f"pytest: no {arg.split('::')[0]} in the repository")
        i += 1


def check_make(args: list[str]) -> None:
    targets, variables = makefile()
    for arg in args:
        if arg.startswith("-"):
            continue
        if "=" in arg:
            if arg.split("=", 1)[0] not in variables:
                raise Wrong(f"make: the Makefile has no variable {arg.split('=', 1)[0]}")
        elif arg not in targets:
            raise Wrong(f"make: no target {arg!r} in the Makefile (there are {', '.join(sorted(targets))})")


def check_simple(words: list[str], elided: bool) -> str:
    """Check one simple command; returns how: 'checked' or 'external'."""
    words = list(words)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name = words.pop(0).split("=", 1)[0]
        if name.startswith("LARGEBATCH_") and name not in environment_names():
            raise Wrong(f"{name}: no such setting in tools/setup.sh, the Makefile or largebatch/")
    if words[:1] == ["sudo"]:
        words = words[1:]
    if not words:
        return "checked"
    program, args = words[0], words[1:]
    if program == "make":
        check_make(args)
    elif is_python(program):
        if args[:1] == ["-m"] and len(args) > 1:
            check_module(args[1], args[2:], elided)
        elif args and not args[0].startswith("-"):
            check_script(args[0], args[1:], elided)
    elif program == "torchrun":
        check_torchrun(args, elided)
    elif program in LAUNCHERS:
        inner = next((i for i, w in enumerate(args) if is_python(w) or w.endswith(".py")), None)
        if inner is None:
            raise Wrong(f"{program}: no python program in the command")
        check_simple(args[inner:] if is_python(args[inner]) else ["python", *args[inner:]], elided)
    elif "/" in program and not program.startswith(("/", "$", "~")):
        if not (ROOT / program).is_file():
            raise Wrong(f"no file {program} in the repository")
    elif program in EXTERNAL:
        return "external"
    else:
        raise Wrong(f"{program}: a program this test does not know; check it here, or add it to EXTERNAL")
    return "checked"


def is_external(cmd: Command) -> bool:
    """Whether the command runs someone else's program (its first one: `... | tee log` is ours)."""
    words = list(cmd.simple[0]) if cmd.simple else []
    while words and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] == "sudo"):
        words.pop(0)
    return bool(words) and words[0] in EXTERNAL


# --- the tests ---------------------------------------------------------------------------------

CHECKABLE = [c for c in COMMANDS if not c.placeholder]


def test_every_command_works_as_written():
    wrong = []
    for cmd in CHECKABLE:
        for words in cmd.simple:
            try:
                check_simple(words, cmd.elided)
            except Wrong as e:
                wrong.append(f"{cmd.where}: {e}\n    {cmd.text}")
    assert not wrong, f"{len(wrong)} of {len(CHECKABLE)} commands do not work as written:\n" + "\n".join(wrong)


def test_most_commands_are_checked():
    """Commands with placeholders stay a small share of this project's commands, and the pages
    hold commands at all. Other people's programs (sbatch, tail, tensorboard) are counted apart:
    only their names are known here."""
    ours = [c for c in COMMANDS if not is_external(c)]
    checked = [c for c in ours if not c.placeholder]
    left_out = "\n".join(f"    {c.where}: {c.placeholder}" for c in ours if c.placeholder)
    share = len(checked) / max(len(ours), 1)
    assert len(checked) >= 30 and share >= MIN_CHECKED, (
        f"{len(checked)} of this project's {len(ours)} commands checked ({share:.0%}; "
        f"{len(COMMANDS) - len(ours)} commands of other programs); left out:\n{left_out}"
    )


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    for _, _, lines in fenced_blocks(text):  # a `# comment` in a code block is no heading
        text = text.replace("\n".join(lines), "")
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        base = slug(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(line, target) of every relative link outside code."""
    lines = path.read_text().split("\n")
    in_code = set()
    for _, first, block in fenced_blocks("\n".join(lines)):
        in_code.update(range(first - 1, first + len(block) + 1))
    for n, line in enumerate(lines, 1):
        if n in in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if not re.match(r"[a-z]+:", m[1]):
                yield n, m[1]


def test_links_between_the_pages_resolve():
    wrong = []
    for page in PAGES:
        where = page.relative_to(ROOT).as_posix()
        for n, target in links(page):
            name, _, anchor = target.partition("#")
            dest = (page.parent / name).resolve() if name else page
            if not dest.exists():
                wrong.append(f"{where}:{n}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                wrong.append(f"{where}:{n}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not wrong, "\n".join(wrong)


SAMPLE = r"""
```console
$ FOO=1 make demo NP=1 && \
    .venv/bin/python -m pytest tests/unit -m "not mpi"   # a comment
output line
```

```sh
mpirun -np 2 python pytorch_imagenet_resnet.py --synthetic ... | tee log
tail -f runs/x/slurm-<jobid>.out
```
"""


def test_the_reader_on_a_sample():
    first, second, third = commands_in(SAMPLE, "sample.md")
    assert (first.where, second.where, third.where) == ("sample.md:3", "sample.md:9", "sample.md:10")
    assert first.simple == [
        ["FOO=1", "make", "demo", "NP=1"],
        [".venv/bin/python", "-m", "pytest", "tests/unit", "-m", "not mpi"],
    ]
    assert second.elided and second.simple[0][-1] == "--synthetic" and second.simple[1] == ["tee", "log"]
    assert third.placeholder == "runs/x/slurm-<jobid>.out" and not first.placeholder
    assert [check_simple(w, first.elided) for w in first.simple] == ["checked", "checked"]
    assert [check_simple(w, second.elided) for w in second.simple] == ["checked", "external"]
    with pytest.raises(Wrong, match="unrecognized arguments: --no-such-flag"):
        check_simple(["python", "pytorch_imagenet_resnet.py", "--synthetic", "--no-such-flag"], False)
    with pytest.raises(Wrong, match="no target 'dmeo'"):
        check_simple(["make", "dmeo"], False)
    with pytest.raises(Wrong, match="no module"):
        check_simple(["python", "-m", "largebatch.nothing_here"], False)
    with pytest.raises(Wrong, match="no option --no-such-flag"):
        check_simple(["python", "bench/gpu_check.py", "--no-such-flag"], False)
