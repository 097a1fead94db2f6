"""The README and docs/ are for users: the README is short, shows the two commands CI relies on, commands and
examples that work, and links that resolve; docs/configuration.md's table is generated from `Settings`.

When a test here fails after a setting was added or changed: run `python -m core.config` and paste its output
between the `<!-- settings-table:start -->` and `<!-- settings-table:end -->` lines of docs/configuration.md.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from pydantic import BaseModel, ValidationError

from core.config import Settings, settings_table
from enrich.cli import app
from schemas.enrichment import Enrichment, TagSource
from schemas.events import CorrectionEvent, ListingEvent
from schemas.taxonomy import Taxonomy, load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIGURATION = ROOT / "docs" / "configuration.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
# the README is read top to bottom by someone who just found the repository: reference material goes to docs/
MAX_PROSE_LINES = 200  # outside code blocks
MAX_CODE_LINES = 80  # the commands, the example event, enrichment and taxonomy
ROW_VARIABLE = re.compile(r"^\| `(ENRICH_[A-Z0-9_]+)` \|", re.MULTILINE)
SETUP_AND_QUICKSTART = "bash scripts/setup.sh && .venv/bin/enrich quickstart"
TEST_COMMAND = ".venv/bin/python -m pytest"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# `enrich` as the command (also .venv/bin/enrich), not catalogue-enrich, enrich/, enrich.cli or a database name
ENRICH = re.compile(r"(?:^|(?<=[\s(`])|(?<=bin/))enrich(?![\w/.-])", re.MULTILINE)
# where a shown command line ends: end of line, a code span, a shell operator, a comment, a diagram arrow or note
COMMAND_END = re.compile(r"[`\n&|;#():─►]")
EXAMPLE_CONTRACTS: tuple[type[BaseModel], ...] = (ListingEvent, Enrichment, Taxonomy, CorrectionEvent)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _readme() -> str:
    return _read(README)


def _table_section(text: str) -> str:
    """What sits between the markers (the configuration table)."""
    assert text.count(START) == 1 and text.count(END) == 1, f"docs/configuration.md needs one {START} and one {END}"
    section = text.split(START, 1)[1]
    assert END in section, f"{END} must come after {START}"
    return section.split(END, 1)[0]


def _variables() -> list[str]:
    return [f"ENRICH_{name.upper()}" for name in Settings.model_fields]


def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return FENCE.findall(text)


def _code(text: str) -> list[str]:
    """Every piece of code the page shows: fenced blocks (continued lines joined) and inline code spans."""
    blocks = [body.replace("\\\n", " ") for _, body in _fenced(text)]
    prose = FENCE.sub("", text)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def _enrich_commands(text: str) -> list[list[str]]:
    """The words after each `enrich` shown in code, up to where that command line ends."""
    found = []
    for code in _code(text):
        for match in ENRICH.finditer(code):
            rest = code[match.end():]
            end = COMMAND_END.search(rest)
            found.append((rest[:end.start()] if end else rest).split())
    return found


def _subcommands(command) -> dict:
    """A command group's subcommands by name; none for a plain command. (typer carries its own click.)"""
    return getattr(command, "commands", {})


def _option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return names


def _check_command(words: list[str]) -> list[str]:
    """What is wrong with `enrich <words>`: an unknown command or subcommand, or an option it does not have."""
    command = typer.main.get_command(app)
    path = ["enrich"]
    rest = [w.strip("[],.") for w in words]
    rest = [w for w in rest if w]
    while _subcommands(command) and rest and not rest[0].startswith("-"):
        sub = _subcommands(command).get(rest[0])
        if sub is None:
            if path == ["enrich"]:
                return [f"`enrich {rest[0]}`: no such command (enrich --help lists them)"]
            break  # a group that takes an argument of its own
        command, path = sub, [*path, rest.pop(0)]
    options = _option_names(command)
    return [f"`{' '.join(path)} {word}`: no such option" for word in rest
            if word.startswith("-") and word.split("=", 1)[0] not in options]


# ---- the configuration table (docs/configuration.md) ------------------------------------------------------

def test_every_setting_has_a_description():
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"settings without a description (the table's 'meaning' column): {missing}"


def test_settings_table_has_one_row_per_setting():
    rows = ROW_VARIABLE.findall(settings_table())
    assert rows == _variables()


def test_configuration_table_lists_every_setting():
    listed = set(ROW_VARIABLE.findall(_table_section(_read(CONFIGURATION))))
    missing = [v for v in _variables() if v not in listed]
    stale = sorted(listed - set(_variables()))
    assert not missing, f"docs/configuration.md lacks {missing}: run `python -m core.config` and paste it"
    assert not stale, f"docs/configuration.md names settings that do not exist: {stale}"


def test_configuration_table_is_the_generated_one():
    section = _table_section(_read(CONFIGURATION))
    assert section.strip("\n") == settings_table().strip("\n"), (
        "docs/configuration.md's table differs from `python -m core.config`: paste its output between the markers")


def test_python_m_core_config_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "core.config"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out == settings_table()


def test_readme_links_the_configuration_instead_of_copying_it():
    text = _readme()
    assert START not in text and not ROW_VARIABLE.search(text), "the settings table lives in docs/configuration.md"
    assert "(docs/configuration.md)" in text


# ---- the README ------------------------------------------------------------------------------------------

def test_readme_is_short():
    text = _readme()
    code = sum(body.count("\n") for _, body in _fenced(text))
    prose = len(FENCE.sub("", text).splitlines())
    assert prose <= MAX_PROSE_LINES, (f"README.md has {prose} lines of prose: reference material goes to docs/, "
                                      "figures and history to benchmarks/RESULTS.md")
    assert code <= MAX_CODE_LINES, f"README.md has {code} lines of code blocks: keep the examples small"


def test_readme_shows_the_two_commands():
    lines = {line.strip() for lang, body in _fenced(_readme()) if lang == "bash" for line in body.splitlines()}
    assert SETUP_AND_QUICKSTART in lines, f"the README's first command must stay `{SETUP_AND_QUICKSTART}`"
    assert TEST_COMMAND in lines, f"the README's test command must stay `{TEST_COMMAND}`"


def test_ci_runs_the_readmes_test_command():
    ci = [line.strip() for line in _read(ROOT / ".ci" / "run").splitlines()]
    assert TEST_COMMAND in ci, f".ci/run must run the README's test command `{TEST_COMMAND}`"


def test_readme_names_every_command():
    text = _readme()
    missing = [name for name in _subcommands(typer.main.get_command(app)) if f"`enrich {name}" not in text]
    assert not missing, f"the README's command table lacks {missing}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_command_shown_exists(page):
    commands = _enrich_commands(_read(page))
    problems = [problem for words in commands for problem in _check_command(words)]
    assert not problems, f"{page.name} shows commands that do not work: {problems}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_inline_code_stays_on_one_line(page):
    """A code span split over two lines would hide its command from the check above."""
    split = [line for line in FENCE.sub("", _read(page)).splitlines() if line.count("`") % 2]
    assert not split, f"{page.name}: a `code span` runs over the end of these lines: {split}"


def test_command_check_catches_unknown_commands_and_options():
    assert _enrich_commands("run `enrich similar L-1 --k 3` then\n```\n.venv/bin/enrich quickstart # demo\n```\n") \
        == [["quickstart"], ["similar", "L-1", "--k", "3"]]
    assert _check_command(["similar", "L-1", "--k", "3"]) == []
    assert _check_command(["models", "show", "v1"]) == []
    assert _check_command(["evaluate", "model/", "--fp32"]) == []
    assert _check_command(["simlar", "L-1"]) != []
    assert _check_command(["similar", "L-1", "--colour"]) != []
    assert _check_command(["console-user", "add", "me", "--admin"]) != []


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_point_to_files(page):
    targets = [t.split("#", 1)[0] for t in LINK.findall(FENCE.sub("", _read(page)))
               if not re.match(r"^(https?:|mailto:|#)", t)]
    broken = [t for t in targets if t and not (page.parent / t).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_readme_examples_are_valid_contracts():
    """Each JSON example parses as the contract it shows, and the enrichment fits the bundled fashion-mnist
    taxonomy and the listing event beside it."""
    examples: dict[type[BaseModel], list[BaseModel]] = {}
    for lang, body in _fenced(_readme()):
        if lang != "json":
            continue
        data = json.loads(body)
        fits = []
        for contract in EXAMPLE_CONTRACTS:
            try:
                fits.append(contract.model_validate(data))
            except ValidationError:
                continue
        assert len(fits) == 1, f"a README JSON example is no valid {[c.__name__ for c in EXAMPLE_CONTRACTS]}: {body}"
        examples.setdefault(type(fits[0]), []).append(fits[0])
    shown = set(examples)
    assert {ListingEvent, Enrichment, Taxonomy} <= shown, "the README shows a listing, its enrichment and a taxonomy"
    (event,), (enrichment,) = examples[ListingEvent], examples[Enrichment]
    assert isinstance(event, ListingEvent) and isinstance(enrichment, Enrichment)
    assert enrichment.listing_id == event.listing_id
    taxonomy = load_taxonomy("fashion-mnist")
    for group, tag in enrichment.tags.items():
        assert tag.value in (taxonomy.values_of(group) or []), f"{group}={tag.value!r} is not in fashion-mnist"
        if tag.source is TagSource.predicted:
            assert tag.model_version == enrichment.model_version
    for item in enrichment.review:
        assert all(value in (taxonomy.values_of(item.group) or []) for value, _ in item.candidates)
    category, type_ = enrichment.tags.get("category"), enrichment.tags.get("type")
    assert enrichment.not_applicable == taxonomy.not_applicable(category and category.value, type_ and type_.value)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_no_seed_numbers(page):
    """Things are named for what they are; the papers are cited by title in the README's glossary."""
    found = re.findall(r"seed[ -]?00\d", _read(page), re.IGNORECASE)
    assert not found, f"{page.name} says {found}: name what the thing is instead"
