"""The README is for users: short, and its configuration table is generated from `Settings` and complete.

When a test here fails after a setting was added or changed: run `python -m core.config` and paste its
output between the `<!-- settings-table:start -->` and `<!-- settings-table:end -->` lines of README.md.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
MAX_PROSE_LINES = 170  # besides the generated configuration table, which grows one line per setting
ROW_VARIABLE = re.compile(r"^\| `(ENRICH_[A-Z0-9_]+)` \|", re.MULTILINE)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _table_section(text: str) -> str:
    """What sits between the markers (the README's configuration table)."""
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START} and one {END} line"
    section = text.split(START, 1)[1]
    assert END in section, f"{END} must come after {START}"
    return section.split(END, 1)[0]


def _variables() -> list[str]:
    return [f"ENRICH_{name.upper()}" for name in Settings.model_fields]


def test_every_setting_has_a_description():
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"settings without a description (the README's 'meaning' column): {missing}"


def test_settings_table_has_one_row_per_setting():
    rows = ROW_VARIABLE.findall(settings_table())
    assert rows == _variables()


def test_readme_table_lists_every_setting():
    listed = set(ROW_VARIABLE.findall(_table_section(_readme())))
    missing = [v for v in _variables() if v not in listed]
    stale = sorted(listed - set(_variables()))
    assert not missing, f"README configuration table lacks {missing}: run `python -m core.config` and paste it"
    assert not stale, f"README configuration table names settings that do not exist: {stale}"


def test_readme_table_is_the_generated_one():
    section = _table_section(_readme())
    assert section.strip("\n") == settings_table().strip("\n"), (
        "README configuration table differs from `python -m core.config`: paste its output between the markers")


def test_python_m_core_config_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "core.config"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out == settings_table()


def test_readme_is_short():
    text = _readme()
    table = text.split(START, 1)[1].split(END, 1)[0]
    lines = len(text.splitlines()) - len(table.splitlines())
    assert lines <= MAX_PROSE_LINES, (f"README.md has {lines} lines besides the settings table; figures and lab "
                                      "notes go to benchmarks/RESULTS.md")


@pytest.mark.parametrize("name", ["quickstart", "batch", "consume", "corrections", "worker", "sweep", "health",
                                  "reindex", "similar", "train", "evaluate", "promote", "migrate"])
def test_readme_names_every_command(name):
    assert f"`enrich {name}" in _readme()
