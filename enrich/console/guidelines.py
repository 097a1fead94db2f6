"""Labelling guidelines per tag group: a markdown file beside a bundled taxonomy (<name>.guidelines.md), one
`## <group>` section per group, shown in the review card."""
from __future__ import annotations

import re
from functools import lru_cache

from markdown_it import MarkdownIt
from markupsafe import Markup

from schemas.taxonomy import TAXONOMY_DIR

_HEADING = re.compile(r"^##\s+(\S.*?)\s*$")
_TAXONOMY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def parse_guidelines(text: str) -> dict[str, Markup]:
    """A guidelines file's `## <group>` sections, each rendered to HTML. CommonMark with raw HTML off: any
    HTML in the file comes out escaped, so the result can go into a page as it is."""
    md = MarkdownIt("commonmark", {"html": False})
    sections: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            lines = sections.setdefault(m.group(1), [])
        elif lines is not None:
            lines.append(line)
    return {group: Markup(md.render("\n".join(body))) for group, body in sections.items()}


@lru_cache(maxsize=16)
def guidelines(taxonomy_name: str) -> dict[str, Markup]:
    """The labelling guidelines beside a bundled taxonomy (<name>.guidelines.md), parsed once per process."""
    if not _TAXONOMY_NAME.match(taxonomy_name):
        return {}
    path = TAXONOMY_DIR / f"{taxonomy_name}.guidelines.md"
    return parse_guidelines(path.read_text(encoding="utf-8")) if path.is_file() else {}
