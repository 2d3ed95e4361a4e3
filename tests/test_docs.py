"""The documentation names only what exists: every ``catsdogs COMMAND --option`` written in the README,
docs/, the plugin READMEs and the comments of experiments/*.yaml is an option of that command, every
command is documented, and every ``CATSDOGS_*`` variable the docs mention is read somewhere.

This is the class of stale text issue 10 found by hand (``experiments/seed.yaml`` documented
``--output`` while the CLI says ``--out``); the checker is tested on planted drift so it cannot pass
by finding nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from conftest import REPO

from catsdogs.cli import cli

#: where users read commands: the README, docs/, the plugins' READMEs and the experiment files
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                    *(REPO / "plugins").glob("*/README.md"), *(REPO / "experiments").glob("*.yaml")])

#: ``catsdogs WORD`` followed by the rest of the command, up to the end of the inline code span,
#: a shell comment, a table cell or the end of the line
_COMMAND = re.compile(r"(?<![\w/.<-])catsdogs ([a-z][a-z-]*)([^`|#\n]*)")
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_ENV = re.compile(r"\bCATSDOGS_[A-Z0-9_]+\b")


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def doc_command_errors(text: str, group: click.Group = cli, where: str = "text") -> list[str]:
    """Every ``--option`` written after ``catsdogs COMMAND`` that COMMAND does not have.

    Words after ``catsdogs`` that are no command are prose ("catsdogs also installs ...") unless
    they are followed by an option, which only a command line has.
    """
    errors = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in _COMMAND.finditer(line):
            name, rest = match.group(1), match.group(2)
            options = _OPTION.findall(rest)
            command = group.commands.get(name)
            if command is None:
                if options:
                    errors.append(f"{where}:{lineno}: 'catsdogs {name}' is no command "
                                  f"(commands: {', '.join(sorted(group.commands))})")
                continue
            known = _options(command)
            for option in options:
                if option not in known:
                    errors.append(f"{where}:{lineno}: 'catsdogs {name}' has no option {option} "
                                  f"(it has {', '.join(sorted(o for o in known if o.startswith('--')))})")
    return errors


def _text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":  # only the comments of an experiment file are prose
        text = "\n".join(line.split("#", 1)[1] if "#" in line else "" for line in text.splitlines())
    return text


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_command_lines_use_real_options(path):
    errors = doc_command_errors(_text(path), where=str(path.relative_to(REPO)))
    assert not errors, "\n".join(errors)


def test_every_command_is_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    documented = {m.group(1) for m in _COMMAND.finditer(readme)}
    assert set(cli.commands) <= documented, sorted(set(cli.commands) - documented)


def test_every_documented_variable_is_read_somewhere():
    mentioned = set()
    for path in DOC_FILES:
        mentioned |= set(_ENV.findall(path.read_text(encoding="utf-8")))
    code = "\n".join(p.read_text(encoding="utf-8") for folder in ("catsdogs", "plugins", "tests")
                     for p in (REPO / folder).rglob("*.py"))
    code += (REPO / "tox.ini").read_text(encoding="utf-8")
    read = {name for name in mentioned
            if re.search(rf"""["'{{:]{name}\b|environ\[["']{name}|\${{?{name}\b|^\s*{name}\s*$""",
                         code, re.M)}
    assert mentioned, "the docs name no CATSDOGS_* setting at all: the scan is broken"
    assert mentioned == read, f"documented but read nowhere: {sorted(mentioned - read)}"


# -- the checker finds planted drift -----------------------------------------------------------
def test_checker_finds_a_misspelled_option():
    text = "#   catsdogs run experiments/seed.yaml [--data DIR] [--output DIR]\n"
    (error,) = doc_command_errors(text, where="seed.yaml")
    assert error.startswith("seed.yaml:1: 'catsdogs run' has no option --output") and "--out" in error


def test_checker_finds_an_option_of_another_command():
    text = "run `catsdogs export RUN --labels x.csv` then `catsdogs score S --labels x.csv`"
    (error,) = doc_command_errors(text)
    assert "'catsdogs export' has no option --labels" in error


def test_checker_finds_a_command_that_does_not_exist():
    (error,) = doc_command_errors("```\ncatsdogs train grid.yaml --out runs\n```")
    assert "text:2: 'catsdogs train' is no command" in error


def test_checker_leaves_prose_and_other_programs_alone():
    text = ("catsdogs also installs pytest fixtures; catsdogs does not know the photo.\n"
            "pip install catsdogs --upgrade; python -m catsdogs_lite --fast\n"
            "| `catsdogs predict IMAGE --model M --json` | --anything-in-another-cell |\n"
            "catsdogs run EXP.yaml --engine ray --ray-address HEAD:6379  # --not-an-option here\n"
            "`<catsdogs cache>/weights/<backbone>-k<version>.h5`\n")
    assert doc_command_errors(text) == []
