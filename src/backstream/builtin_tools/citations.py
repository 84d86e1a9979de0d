"""Citations: which search results a finished text block draws on.

On when the request's `system` carries `citations: {"enabled": true}` (the seed's
System configuration; a list holding such an object is read the same). The model is
asked to cite results as [n]; each [n] that names a result of this run becomes a
`search_result_location` citation quoting the passage's sentence that best matches the
claim before the marker. Small models often ignore the instruction: a block without
markers cites the results whose passages share enough distinctive words with it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .base import Source, ToolEnv

INSTRUCTIONS = (
    "When your answer uses a search result, cite it right after the statement with the result's number in "
    "square brackets, for example [1] or [2][3]. Cite only numbers that appeared in the search results."
)
CLAIM_WINDOW = 1000  # characters before a marker searched for its sentence (bounds work on long blocks)
MAX_UNMARKED = 3  # results cited for a block without markers, at most
MIN_SHARED_WORDS = 2  # an unmarked block cites a passage only if they share this many distinctive words
MIN_COVERAGE = 0.2  # ... and these cover this share of the block's distinctive words (weighted by rarity)

_MARKER = re.compile(r"\[(\d{1,4}(?:\s*[,;]\s*\d{1,4})*)\]")
_TRAILING_MARKERS = re.compile(r"(?:\s*\[\d{1,4}(?:\s*[,;]\s*\d{1,4})*\])+\s*$")
# Each alternative after the run of non-terminators matches at once: no backtracking over long text.
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|(?=\n)|$)")
_WORD = re.compile(r"[^\W_]{3,}")
_STOPWORD_TEXT = (
    "the and for are but not you all any can had her was one our out has his how its may new now old see two who "
    "did get him let put say she too use that with have this will your from they been were said each which their "
    "what there when would make like into time than them then these some could other more very also about after "
    "before just over such only most where while does doing being here those through during because should under "
    "until again further both same own once above below between why off into onto upon among within without "
    "according document documents result results passage passages search answer question"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def enabled(env: ToolEnv) -> bool:
    """Whether the request's system configuration turns citations on."""
    return any(_turned_on(system.citations) for system in env.request.system or ())


def _turned_on(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("enabled") is True
    if isinstance(value, list):
        return any(isinstance(item, dict) and item.get("enabled") is True for item in value)
    return False


def cite(text: str, env: ToolEnv) -> list[dict[str, Any]] | None:
    """The citations of a finished text block, or None (citations off, no results yet, nothing cited)."""
    if not enabled(env) or not env.sources or not text.strip():
        return None
    return _by_markers(text, env.sources) or _by_overlap(text, env.sources) or None


def _by_markers(text: str, sources: list[Source]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, int, int]] = set()
    for match in _MARKER.finditer(text):
        claim = _claim_before(text, match.start())
        for number in (int(n) for n in re.split(r"\s*[,;]\s*", match.group(1))):
            if not 1 <= number <= len(sources):
                continue  # a number no search returned: nothing to point at
            citation = _citation(number, sources[number - 1], claim)
            key = (number, citation["start_char_index"], citation["end_char_index"])
            if key not in seen:
                seen.add(key)
                out.append(citation)
    return out


def _claim_before(text: str, position: int) -> str:
    """The sentence a marker at `position` closes: back from it (past other markers) to the previous sentence end."""
    before = _TRAILING_MARKERS.sub("", text[max(0, position - CLAIM_WINDOW) : position]).rstrip()
    body = before.rstrip(".!?")
    ends = [m.end() for m in re.finditer(r"[.!?\n]\s|\]\s", body)]
    return before[ends[-1] if ends else 0 :]


def _words(text: str) -> set[str]:
    return {w for w in (m.group().lower() for m in _WORD.finditer(text)) if w not in _STOPWORDS}


def _citation(number: int, source: Source, claim: str) -> dict[str, Any]:
    """A search_result_location: the passage's sentence sharing most words with the claim (else the passage)."""
    start, end = _best_sentence(source.text, _words(claim))
    return {
        "type": "search_result_location",
        "document_index": source.document_index,
        "document_title": source.title,
        "cited_text": source.text[start:end],
        "start_char_index": source.start + start,
        "end_char_index": source.start + end,
        "source_index": number,
    }


def _best_sentence(passage: str, claim_words: set[str]) -> tuple[int, int]:
    best, best_shared = (0, len(passage)), 0
    for match in _SENTENCE.finditer(passage):
        shared = len(_words(match.group()) & claim_words)
        if shared > best_shared:
            raw = match.group()
            lead = len(raw) - len(raw.lstrip())
            best, best_shared = (match.start() + lead, match.start() + len(raw.rstrip())), shared
    return best


def _by_overlap(text: str, sources: list[Source]) -> list[dict[str, Any]]:
    """Results whose passages share enough distinctive words with an unmarked block, the best first."""
    text_words = _words(text)
    passages = [_words(s.text) for s in sources]
    if not text_words:
        return []
    # Rarer words across the results weigh more: a word every passage has tells them apart from nothing.
    weight = {w: math.log(1 + len(passages) / (1 + sum(w in p for p in passages))) + 0.1 for w in text_words}
    total = sum(weight.values())
    scored = []
    for number, words in enumerate(passages, 1):
        shared = text_words & words
        coverage = sum(weight[w] for w in shared) / total
        if len(shared) >= MIN_SHARED_WORDS and coverage >= MIN_COVERAGE:
            scored.append((coverage, number))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [_citation(n, sources[n - 1], text) for _, n in scored[:MAX_UNMARKED]]
