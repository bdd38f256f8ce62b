"""The README's Python example runs, and every `sparcode` command it shows parses with
the real parser (the CLI tests run each command)."""

import re
import shlex
from pathlib import Path

import pytest

from sparcode.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["ids"].shape == (1024, 100) and namespace["result"].ids.shape == (2, 10)
    bagged = namespace["bagged"].ids
    assert bagged.shape == (3, 10) and (bagged[1] == -1).all() and (bagged[0] >= 0).any()
    assert (tmp_path / "my-index" / "manifest.json").is_file()


def readme_commands() -> list[str]:
    lines = [line.strip() for line in README.splitlines() if line.startswith("    ")]
    commands = []
    for line in lines:
        line = re.sub(r"^torchrun \S+ -m sparcode.cli", "sparcode", line)
        if line.startswith("sparcode "):
            commands.append(line)
    return commands


def expand(command: str) -> list[str]:
    """[optional] parts dropped, the first of a|b|c alternatives taken."""
    command = re.sub(r"\[[^\]]*\]", "", command)
    words = shlex.split(command)[1:]
    return [w.split("|")[0] for w in words]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_parse(command):
    args = build_parser().parse_args(expand(command))
    assert callable(args.run)


def test_readme_shows_every_command():
    shown = {shlex.split(c)[1] for c in readme_commands()}
    assert shown == set(build_parser()._subparsers._group_actions[0].choices)
