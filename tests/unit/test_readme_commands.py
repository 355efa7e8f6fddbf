"""The commands in the READMEs cannot rot.

Every shell block (```sh) of README.md and of the READMEs under deploy/ is parsed line by
line (continuations joined, comments dropped, ``&&``/``;``/``|`` split):

- ``nanofleet ...`` and ``nanofleet-agent ...``: the subcommand path exists, every ``--option``
  shown is one of that command's options, and ``--help`` on it succeeds;
- every argument that names a path in this repository (its first component is a top-level
  entry of the repository, or the command is a relative script) exists, globs included,
  relative to the block's ``cd``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from agent.cli import app as agent_app
from coordinator.cli import app as coordinator_app

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([REPO / "README.md", *(REPO / "deploy").rglob("README.md")])
PROGRAMS: dict[str, typer.Typer] = {"nanofleet": coordinator_app, "nanofleet-agent": agent_app}
#: First path components that name something in the repository.
TOP_LEVEL = frozenset(
    p.name for p in REPO.iterdir() if not p.name.startswith(".") or p.name == ".ci"
) - {"nanofleet.egg-info"}
_BLOCK = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.M | re.S)
_SEPARATORS = frozenset({"&&", "||", ";", "|", "&"})
_REDIRECTS = frozenset({">", ">>", "<", "2>", "2>&1"})


@dataclass(frozen=True)
class Command:
    document: Path
    line: str
    argv: list[str]
    cwd: Path


def shell_lines(text: str) -> list[str]:
    """The logical lines of the shell blocks in ``text`` (continuations joined)."""
    lines: list[str] = []
    for block in _BLOCK.findall(text):
        pending = ""
        for raw in block.splitlines():
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            lines.append(pending + raw)
            pending = ""
    return [line for line in lines if line.strip()]


def split_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in _SEPARATORS:
            commands.append([])
        elif token in _REDIRECTS:
            skip_next = True
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def commands_of(document: Path, text: str | None = None) -> list[Command]:
    found = []
    cwd = REPO
    for line in shell_lines(text if text is not None else document.read_text()):
        for argv in split_commands(line):
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                argv = argv[1:]  # VAR=value before the program
            if not argv:
                continue
            found.append(Command(document, line.strip(), argv, cwd))
            if argv[0] == "cd" and len(argv) == 2:
                cwd = (cwd / argv[1]).resolve()
    return found


def leaf_command(app: typer.Typer, args: list[str]) -> tuple[list[str], click.Command]:
    """The subcommand path at the start of ``args`` and the command it names."""
    command = typer.main.get_command(app)
    path: list[str] = []
    for token in args:
        if not isinstance(command, click.Group) or token not in command.commands:
            break
        command = command.commands[token]
        path.append(token)
    return path, command


def problems_of(command: Command) -> list[str]:
    """What is wrong with one documented command (empty: nothing)."""
    argv, where = command.argv, f"{command.document.name}: `{command.line}`"
    problems: list[str] = []
    program = Path(argv[0]).name
    if program in PROGRAMS:
        path, leaf = leaf_command(PROGRAMS[program], argv[1:])
        if isinstance(leaf, click.Group):
            problems.append(f"{where}: `{program} {' '.join(argv[1:2])}` is not a command")
            return problems
        options = {opt for param in leaf.params for opt in param.opts} | {"--help"}
        for token in argv[1 + len(path) :]:
            if token.startswith("--") and token.split("=", 1)[0] not in options:
                problems.append(f"{where}: `{program} {' '.join(path)}` has no option {token}")
        result = CliRunner().invoke(PROGRAMS[program], [*path, "--help"])
        if result.exit_code != 0:
            problems.append(f"{where}: --help failed: {result.output[-300:]}")
        return problems
    if argv[0] == "cd":
        if len(argv) == 2 and not (command.cwd / argv[1]).is_dir():
            problems.append(f"{where}: no directory {argv[1]}")
        return problems
    candidates = argv if "/" in argv[0] and not argv[0].startswith("/") else argv[1:]
    for token in candidates:
        if token.startswith("-") or "://" in token:
            continue
        relative = token.removeprefix("./")
        head = relative.split("/", 1)[0]
        is_script = token is argv[0]
        if head not in TOP_LEVEL and not (is_script and command.cwd != REPO):
            continue
        if head == ".venv":
            continue  # created by scripts/bootstrap.sh
        base = REPO if head in TOP_LEVEL else command.cwd
        matches = list(base.glob(relative)) if any(c in relative for c in "*?[") else []
        if not matches and not (base / relative).exists():
            problems.append(f"{where}: {token} does not exist in the repository")
    return problems


ALL_COMMANDS = [c for doc in DOCUMENTS for c in commands_of(doc)]


def test_the_readmes_have_commands_to_check() -> None:
    programs = {Path(c.argv[0]).name for c in ALL_COMMANDS}
    assert {"nanofleet", "nanofleet-agent"} <= programs
    documented = {" ".join(c.argv[:3]) for c in ALL_COMMANDS}
    for expected in (
        "nanofleet device provision",
        "nanofleet-agent enroll kiosk-0001.enroll",
        "nanofleet device ca-init",
    ):
        assert expected in documented, expected


@pytest.mark.parametrize(
    "command",
    ALL_COMMANDS,
    ids=[f"{c.document.relative_to(REPO)}:{' '.join(c.argv[:3])}" for c in ALL_COMMANDS],
)
def test_every_documented_command_exists_with_its_options_and_paths(command: Command) -> None:
    assert problems_of(command) == []


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("nanofleet device provison --id x", "is not a command"),
        ("nanofleet device provision --identity x", "has no option --identity"),
        ("nanofleet-agent enroll f --dst /etc", "has no option --dst"),
        ("./scripts/deploy-everything.sh", "does not exist"),
        ("install -m 0644 deploy/systemd/*.timer /etc/systemd/system/", "does not exist"),
        ("cd deploy/compose && ./missing.sh", "does not exist"),
        ("bash scripts/check.sh && cat deploy/nothing.md", "deploy/nothing.md does not exist"),
    ],
)
def test_the_checker_catches_a_rotten_command(snippet: str, problem: str) -> None:
    text = f"```sh\n{snippet}\n```\n"
    found = [p for c in commands_of(REPO / "README.md", text) for p in problems_of(c)]
    assert any(problem in p for p in found), found


def test_the_checker_follows_continuations_comments_and_cd() -> None:
    text = (
        "```sh\n"
        "cd deploy/compose   # a comment\n"
        "nanofleet device provision --id a \\\n    --group g --out f.enroll\n"
        "```\n"
    )
    commands = commands_of(REPO / "README.md", text)
    assert [c.argv[:3] for c in commands] == [
        ["cd", "deploy/compose"],
        ["nanofleet", "device", "provision"],
    ]
    assert commands[1].cwd == REPO / "deploy" / "compose"
    assert "--out" in commands[1].argv
    assert all(problems_of(c) == [] for c in commands)


def test_ci_runs_the_readmes_test_command_as_written() -> None:
    """The README's first block names two commands: the demo, then the suite. `.ci/run`
    must run the second one exactly (its last line), nothing else."""
    first_block = _BLOCK.search((REPO / "README.md").read_text("utf-8"))
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 2, commands
    test_command = commands[1]
    ci = (REPO / ".ci" / "run").read_text("utf-8").strip().splitlines()
    assert ci[-1] == f"exec {test_command}", ci[-1]
    assert (REPO / test_command).stat().st_mode & 0o111, f"{test_command} is not executable"
