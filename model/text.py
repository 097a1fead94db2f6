"""Text → taxonomy values: a per-taxonomy vocabulary and a matcher (pure Python, no heavy dependencies).

Used by training (weak labels from listing text: titles and descriptions) and by the worker (text evidence
fused with the image probabilities at prediction time, worker/tagging.py).

The vocabulary is a data file beside the taxonomy, ``schemas/taxonomies/<taxonomy>.vocab.json``::

    {"taxonomy": "deepfashion",
     "negators": {"en": ["not", "no", "without"], "fr": ["pas", "sans"]},
     "groups": {"category": {"Tee": {"en": ["tee", "t-shirt"], "fr": ["tee-shirt"]}},
                "fabric": {"cotton": {"en": ["cotton"], "fr": ["coton"]}, "denim": {"en": ["denim"]}}}}

``groups`` holds ``category`` and the taxonomy's attribute groups (``type`` is derived from the category,
never matched); a value may list its phrases per language (as above) or as one plain list. Every group and
value must exist in the taxonomy; a value with no phrases is allowed (it is then never matched).

Matching rules:
- case and accents are folded (``Coton Égyptien`` = ``coton egyptien``), text is split into words at
  anything that is not a letter or digit, so ``t-shirt``, ``T Shirt`` and ``t‑shirt`` are the same phrase;
- plurals: a phrase word written in the singular also matches its regular plurals in the text (``+s``,
  ``+es``, ``y→ies``, French ``-au/-eu → -aux/-eux``), one way only, so ``short sleeve`` matches
  ``short sleeves`` but the phrase ``shorts`` does not match ``short``;
- multi-word phrases and values that are a part of another (``t-shirt`` vs ``shirt``, ``short sleeve`` vs
  ``shorts``): leftmost-longest, non-overlapping matches over whole words, so ``t-shirt`` is never also a
  ``shirt`` and ``sweatshirt`` is never a ``shirt``;
- simple negation: a match is negated when a negator word (``not``, ``no``, ``without``, ``sans``…) stands at
  most ``NEGATION_WINDOW`` words before it in the same clause (a hyphenated one, ``non-iron``, only reaches
  the word it is joined to) (``,;.!?`` and ``but`` end a clause) and the
  negator is not itself part of a matched phrase; so ``no sleeves`` listed as a phrase of ``sleeveless`` is a
  positive ``sleeveless``, while ``not cotton`` negates ``cotton``.
Evidence is the original text of each match (``"T-Shirts"``), so a reviewer sees which words counted.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.taxonomy import CATEGORY_GROUP, TAXONOMY_DIR, Taxonomy, load_taxonomy

NEGATION_WINDOW = 3  # words between a negator and the phrase it negates ("not 100 % cotton": 2)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CLAUSE_END = re.compile(r"[,;.!?:()\[\]\n]")
_CLAUSE_WORDS = frozenset({"but", "mais", "aber", "pero", "ma"})
# "never" is left out on purpose: "never worn, cotton" is the commonest second-hand phrase there is
DEFAULT_NEGATORS = ("not", "no", "non", "without", "pas", "sans", "ni", "ohne", "kein", "keine",
                    "nicht", "sin", "senza")


class VocabularyError(ValueError):
    """The vocabulary file does not fit its taxonomy (unknown group or value, malformed entry)."""


def fold(text: str) -> str:
    """Case- and accent-folded text: NFKD, combining marks dropped, casefold."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def plural_forms(word: str) -> set[str]:
    """The word and its regular plurals (English and the common French ones)."""
    forms = {word}
    if len(word) < 2 or word.isdigit():
        return forms
    forms.add(word + "s")
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(word + "es")
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    if word.endswith(("au", "eu")):
        forms.add(word + "x")
    if word.endswith("al"):
        forms.add(word[:-2] + "aux")
    return forms


@dataclass(frozen=True)
class _Token:
    folded: str
    start: int
    end: int
    clause: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    clause, pos = 0, 0
    for m in _WORD.finditer(text):
        if _CLAUSE_END.search(text, pos, m.start()):
            clause += 1
        word = fold(m.group())
        if word in _CLAUSE_WORDS:
            clause += 1
        out.append(_Token(word, m.start(), m.end(), clause))
        pos = m.end()
    return out


def _phrase_words(phrase: str) -> tuple[str, ...]:
    return tuple(fold(w) for w in _WORD.findall(phrase))


@dataclass(frozen=True)
class Match:
    group: str
    value: str
    words: str  # the matched text as written
    negated: bool
    start: int
    end: int


@dataclass
class TextMatches:
    """What a text says about a taxonomy: per group, value → the words that named it (or negated it)."""
    found: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    negated: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    matches: list[Match] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.matches)

    def groups(self) -> set[str]:
        return set(self.found) | set(self.negated)


class Vocabulary:
    """Phrases per (group, value) compiled for leftmost-longest whole-word matching."""

    def __init__(self, taxonomy: Taxonomy, groups: Mapping[str, Mapping[str, Iterable[str]]],
                 negators: Iterable[str] = DEFAULT_NEGATORS) -> None:
        self.taxonomy_name = taxonomy.name
        allowed = {CATEGORY_GROUP: set(taxonomy.category_names)}
        allowed.update({g.name: set(g.values) for g in taxonomy.attribute_groups})
        self.negators = frozenset(fold(n) for n in negators)
        # phrase (tuple of folded words) → [(group, value)]; a phrase may name values in two groups
        self._phrases: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        self._forms: dict[str, set[str]] = {}  # text word → vocabulary words it can stand for
        for group, values in groups.items():
            if group not in allowed:
                raise VocabularyError(f"vocabulary group {group!r} is not in taxonomy {taxonomy.name!r} "
                                      f"(known: {sorted(allowed)})")
            for value, phrases in values.items():
                if value not in allowed[group]:
                    raise VocabularyError(f"vocabulary value {group}/{value!r} is not in taxonomy {taxonomy.name!r}")
                for phrase in phrases:
                    words = _phrase_words(phrase)
                    if not words:
                        raise VocabularyError(f"empty phrase {phrase!r} for {group}/{value}")
                    entry = self._phrases.setdefault(words, [])
                    if (group, value) not in entry:
                        entry.append((group, value))
                    for w in words:
                        for f in plural_forms(w):
                            self._forms.setdefault(f, set()).add(w)
        self._max_len = max((len(p) for p in self._phrases), default=0)
        self._prefixes = {p[:i] for p in self._phrases for i in range(1, len(p) + 1)}

    def _candidates(self, word: str) -> set[str]:
        return self._forms.get(word, set()) | {word}

    def _longest_at(self, toks: list[_Token], i: int) -> tuple[int, tuple[str, ...]] | None:
        """Longest phrase starting at token i (within one clause): (length, phrase)."""
        best: tuple[int, tuple[str, ...]] | None = None
        frontier: list[tuple[str, ...]] = [()]
        for k in range(self._max_len):
            j = i + k
            if j >= len(toks) or toks[j].clause != toks[i].clause or not frontier:
                break
            cands = self._candidates(toks[j].folded)
            frontier = [p + (w,) for p in frontier for w in cands if p + (w,) in self._prefixes]
            for p in frontier:
                if p in self._phrases:
                    best = (k + 1, p)
                    break
        return best

    def match(self, text: str) -> TextMatches:
        """Every value the text names or negates, with the words that did it."""
        out = TextMatches()
        if not text or not self._phrases:
            return out
        toks = _tokens(text)
        i = 0
        last_negator: int | None = None  # index of the last free-standing negator word
        scope = NEGATION_WINDOW
        while i < len(toks):
            hit = self._longest_at(toks, i)
            if hit is None:
                if toks[i].folded in self.negators:
                    last_negator = i
                    # a hyphenated negator ("non-iron cotton") only negates the word it is joined to
                    scope = 1 if text[toks[i].end:toks[i].end + 1] in "-\u2010\u2011" and toks[i].end < len(text) \
                        else NEGATION_WINDOW
                i += 1
                continue
            n, phrase = hit
            negated = (last_negator is not None and i - last_negator <= scope
                       and toks[last_negator].clause == toks[i].clause)
            words = text[toks[i].start:toks[i + n - 1].end]
            for group, value in self._phrases[phrase]:
                out.matches.append(Match(group, value, words, negated, toks[i].start, toks[i + n - 1].end))
                target = out.negated if negated else out.found
                evidence = target.setdefault(group, {}).setdefault(value, [])
                if words not in evidence:
                    evidence.append(words)
            i += n
        return out


def vocabulary_path(taxonomy_name: str) -> Path:
    return TAXONOMY_DIR / f"{taxonomy_name}.vocab.json"


def _flatten(phrases: object, where: str) -> list[str]:
    if isinstance(phrases, list):
        items: list[object] = list(phrases)
    elif isinstance(phrases, dict):
        items = [p for lang in phrases.values() for p in (lang if isinstance(lang, list) else [lang])]
    else:
        raise VocabularyError(f"{where}: phrases must be a list or a {{language: [phrases]}} object")
    if not all(isinstance(p, str) for p in items):
        raise VocabularyError(f"{where}: every phrase must be a string")
    return [str(p) for p in items]


def parse_vocabulary(data: Mapping[str, object], taxonomy: Taxonomy) -> Vocabulary:
    """Build a Vocabulary from the parsed JSON of a vocabulary file (checked against the taxonomy)."""
    if data.get("taxonomy") not in (None, taxonomy.name):
        raise VocabularyError(f"vocabulary is for taxonomy {data.get('taxonomy')!r}, not {taxonomy.name!r}")
    raw_groups = data.get("groups", {})
    if not isinstance(raw_groups, dict):
        raise VocabularyError("'groups' must be an object")
    groups: dict[str, dict[str, list[str]]] = {}
    for group, values in raw_groups.items():
        if not isinstance(values, dict):
            raise VocabularyError(f"group {group!r}: values must be an object")
        groups[group] = {v: _flatten(p, f"{group}/{v}") for v, p in values.items()}
    raw_neg = data.get("negators")
    negators: Iterable[str] = DEFAULT_NEGATORS if raw_neg is None else _flatten(raw_neg, "negators")
    return Vocabulary(taxonomy, groups, negators)


_CACHE: dict[tuple[str, str], Vocabulary | None] = {}


def load_vocabulary(taxonomy: Taxonomy | str, path: str | Path | None = None) -> Vocabulary | None:
    """The vocabulary beside a taxonomy (by Taxonomy or bundled name), or None when it has none.

    Cached per taxonomy content and file, so the worker can call it per listing."""
    tax = load_taxonomy(taxonomy) if isinstance(taxonomy, str) else taxonomy
    file = Path(path) if path is not None else vocabulary_path(tax.name)
    key = (tax.sha256(), str(file))
    if key not in _CACHE:
        _CACHE[key] = parse_vocabulary(json.loads(file.read_text()), tax) if file.is_file() else None
    return _CACHE[key]


def match(text: str, vocabulary: Vocabulary) -> TextMatches:
    """Module-level shorthand for ``vocabulary.match(text)``."""
    return vocabulary.match(text)
