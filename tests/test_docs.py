"""The README documents every command and every config key (as sqlite-utils does)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer.main

import agentwatch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


agentwatch.load_shipped_sources()  # the types in sources/ document their keys here too


def keys_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "options"]


CONFIG_KEYS = [
    *(("agentwatch", k) for k in keys_of(agentwatch.Settings)),
    *(("llm", k) for k in keys_of(agentwatch.LLMSettings)),
    *(("slack", k) for k in keys_of(agentwatch.SlackSettings)),
    *(("digest", k) for k in keys_of(agentwatch.DigestSettings)),
    *(("sources", k) for k in keys_of(agentwatch.SourceConfig)),
    *((t, k) for t, cls in sorted(agentwatch.SOURCES.items()) for k in keys_of(cls.Options)),
]


@pytest.mark.parametrize(("table", "key"), CONFIG_KEYS, ids=[f"{t}.{k}" for t, k in CONFIG_KEYS])
def test_every_config_key_is_documented(table, key):
    assert f"`{key}`" in README, f"{table}.{key} is not in README.md"


def commands(group, prefix=""):
    click_group = typer.main.get_command(group)
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            for sub in command.commands:
                yield f"{prefix}{name} {sub}"
        else:
            yield f"{prefix}{name}"


@pytest.mark.parametrize("command", sorted(commands(agentwatch.app)))
def test_every_command_is_documented(command):
    assert f"agentwatch {command}" in README


def test_the_readme_opens_with_the_two_setup_commands():
    first = [line.strip() for line in README.splitlines()[1:6] if line.strip()]
    assert first[0] == "pip install . && agentwatch init && agentwatch run"
    assert first[1] == "pip install '.[test]' && pytest"


def test_every_built_in_source_type_has_a_section():
    for name in agentwatch.SOURCES:
        assert re.search(rf"`{name}`", README), name
