"""The docs' drift check: every code name a page gives must name something the code has, so a rename
fails `make docs` as a broken link does. Three kinds are checked: module paths (`fmnist/x/y.py`,
`tests/test_x.py::test_y`, `fmnist.x.y.NAME`), `fashion-mnist` commands and flags (against the CLI's own
parser, subcommands walked), and `make` targets (against the Makefile's rules).

Names are read from code spans and code blocks only: prose says "make sure" and means no target.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CODE = re.compile(r"```([^\n]*)\n(.*?)```|`([^`\n]+)`", re.S)
PACKAGES = "fmnist|flows|tasks|bench|tests"
# A path stops before a glob or a placeholder (`tests/test_e2e*.py`, `runs/<id>/`): those name no one file.
PATH = re.compile(rf"(?<![\w/.:-])((?:{PACKAGES})/[\w./-]*?)(?:::(\w+))?(?=[.,;:)]*(?:\s|$))")
DOTTED = re.compile(rf"(?<![\w.:/-])((?:{PACKAGES})(?:\.\w+)+)")
COMMAND = re.compile(r"(?<![\w./-])fashion-mnist(?=\s|$)")
MAKE = re.compile(r"(?<![\w./-])make(?=\s)")
SHELL_END = re.compile(r"\s(?:#|\||;|&&).*|\)$")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}  # a `text` block (the CLI's help) is prose
COMMENT = re.compile(r"(?:^|\s)#.*")
TARGET = re.compile(r"[A-Za-z][\w.-]*")
RULE = re.compile(r"^([A-Za-z][\w.-]*(?:[ \t]+[A-Za-z][\w.-]*)*)[ \t]*:(?!=)", re.M)


@dataclass(frozen=True)
class Finding:
    page: str
    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.page}: `{self.name}` {self.problem}"


@dataclass(frozen=True)
class Code:
    """What the docs may name: the repository's files, the CLI's parser and the Makefile's targets."""

    root: Path
    cli: argparse.ArgumentParser
    make_targets: frozenset[str]

    @classmethod
    def of(cls, root: Path) -> Code:
        from fmnist.ops.cli import parser

        targets = {name for rule in RULE.findall((root / "Makefile").read_text()) for name in rule.split()}
        return cls(root, parser(), frozenset(targets))


@dataclass(frozen=True)
class CodeText:
    text: str
    inline: bool  # a code span, not a line of a code block
    shell: bool  # commands in it are run: a span, or a line of a shell block


def code_texts(markdown: str) -> list[CodeText]:
    """Each code span, and each logical line of each code block (`\\`-continued lines joined)."""
    texts = []
    for match in CODE.finditer(markdown):
        language, block, span = match.groups()
        if span is not None:
            texts.append(CodeText(span, inline=True, shell=True))
            continue
        shell = language.strip() in SHELL_BLOCKS
        lines = (COMMENT.sub("", line) if shell else line for line in block.replace("\\\n", " ").splitlines())
        texts += [CodeText(line, inline=False, shell=shell) for line in lines if line.strip()]
    return texts


def words(command_line: str) -> list[str]:
    """The shell words of one command, up to a comment, a pipe or the next command."""
    line = SHELL_END.sub("", command_line)
    try:
        return shlex.split(line)
    except ValueError:  # an unbalanced quote in an elided example (`PARAMS='{…`)
        return line.split()


@cache
def top_level_names(source: Path) -> frozenset[str]:
    """The names a module defines or imports at its top level (read, not imported: nothing runs)."""
    names: set[str] = set()
    body = list(ast.parse(source.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.If | ast.Try):
            body += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
    return frozenset(names)


def module_file(root: Path, parts: list[str]) -> Path | None:
    base = root.joinpath(*parts)
    for source in (base.with_suffix(".py"), base / "__init__.py"):
        if source.is_file():
            return source
    return None


def path_problem(root: Path, path: str, name: str | None) -> str | None:
    found = root / path.rstrip(".")
    if not found.exists():
        return "is not a file or folder in the repository"
    if name and name not in top_level_names(found):
        return f"names no `{name}` in {path}"
    return None


def dotted_problem(root: Path, dotted: str) -> str | None:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        if source := module_file(root, parts[:cut]):
            break
    else:
        return "is not a module"
    if cut < len(parts) and parts[cut] not in top_level_names(source):
        return f"is not a module or a name: {'.'.join(parts[:cut])} has no `{parts[cut]}`"
    return None


def subcommands(command: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def takes_value(command: argparse.ArgumentParser, flag: str) -> bool:
    action = command._option_string_actions.get(flag)
    return action is not None and action.nargs != 0


def command_problem(cli: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """What in `fashion-mnist ARGV` the parser does not have: a command, a subcommand or a flag."""
    command, path, expect_value = cli, "fashion-mnist", False
    for word in argv:
        flag = word.strip("[]").split("=")[0]
        if expect_value:
            expect_value = False
        elif re.fullmatch(r"--?[A-Za-z][\w-]*", flag):
            if flag not in command._option_string_actions:
                return f"is not a command line: `{flag}` is not a flag of `{path}`"
            expect_value = "=" not in word and takes_value(command, flag)
        elif not re.fullmatch(r"[\w-]+", word):
            return None  # a placeholder (`<command>`): what follows it is not known
        elif subs := subcommands(command):
            if word not in subs:
                return f"is not a command line: `{word}` is not a command of `{path}`"
            command, path = subs[word], f"{path} {word}"
    return None


def invocations(program: re.Pattern, text: str) -> list[tuple[str, list[str]]]:
    """Each call of a program in a code text, as (the call shown, its words)."""
    calls = []
    for match in program.finditer(text):
        argv = words(text[match.end() :])
        calls.append((" ".join([match.group(0), *argv]), argv))
    return calls


def cli_lines(text: str, cli: argparse.ArgumentParser, inline: bool) -> list[tuple[str, list[str]]]:
    """Each `fashion-mnist` command line in a code text, as (the name shown, its words); a code span
    that starts with a command and gives a flag (`serve --edge`) counts as one."""
    lines = invocations(COMMAND, text)
    argv = words(text) if inline and not lines else []
    if argv and argv[0] in subcommands(cli) and any(w.startswith("-") for w in argv):
        lines.append((text, argv))
    return lines


def findings(markdown: str, page: str, code: Code) -> list[Finding]:
    """Every code name in one page that the code no longer has."""
    found = []
    for code_text in code_texts(markdown):
        text = code_text.text
        for path, name in PATH.findall(text):
            if problem := path_problem(code.root, path, name or None):
                found.append(Finding(page, f"{path}::{name}" if name else path, problem))
        for dotted in DOTTED.findall(text):
            if problem := dotted_problem(code.root, dotted):
                found.append(Finding(page, dotted, problem))
        if not code_text.shell:
            continue
        for shown, argv in cli_lines(text, code.cli, code_text.inline):
            if problem := command_problem(code.cli, argv):
                found.append(Finding(page, shown, problem))
        for shown, argv in invocations(MAKE, text):
            for target in [w for w in argv if TARGET.fullmatch(w)]:
                if target not in code.make_targets:
                    found.append(Finding(page, shown, f"is not a make command: `{target}` is not a target"))
    return found
