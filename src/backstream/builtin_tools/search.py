"""semantic_search_v1: passages of the request's documents (tool_context) that answer a query.

When the tool starts, each document is parsed (documents.py), cut into passages of
about `chunk_chars` on paragraph and sentence boundaries (keeping character offsets),
and indexed in an in-memory SQLite FTS5 table (ranked by bm25()). With an embedding
model (`tools.semantic_search.embeddings`) passages are also embedded; a query's
keyword ranking and cosine ranking are fused by reciprocal rank fusion. Documents of
more than EMBED_ALL_MAX passages embed only each query's best keyword candidates.

Results are numbered [1], [2], ... across the run's searches; each is kept in
`env.sources` so a cited answer can point at it (citations.py).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import citations
from .base import Source, ToolEnv, ToolOutcome
from .documents import Document, check_artifacts, load_documents
from .embeddings import Embedder, EmbeddingError, embedder_for

if TYPE_CHECKING:
    import numpy as np

    from ..api_models import ChatRequest
    from ..config import Settings

EMBED_ALL_MAX = 256  # passages embedded when the tool starts; beyond, only each query's keyword candidates
RERANK_CANDIDATES = 32  # keyword candidates embedded per query on large corpora
CANDIDATES = 100  # from each ranking, before fusion
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)
MAX_QUERY_CHARS = 2000
MAX_QUERY_TERMS = 32
DEFAULT_TOP_K = 5

DESCRIPTION = (
    "Search the documents provided with this conversation. Give a natural-language query; the best matching "
    "passages come back numbered [1], [2], ... with their document index and title. Search again with other "
    "words if the passages do not answer the question."
)


@dataclass
class Chunk:
    document: int  # the document's index in tool_context
    title: str
    text: str
    start: int  # character offsets in the document's text
    end: int


# --- chunking --------------------------------------------------------------------------------------

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n")


def _pieces(text: str, size: int) -> list[tuple[int, int]]:
    """(start, end) spans of paragraphs, and of sentences (or hard cuts) for paragraphs longer than `size`."""
    spans: list[tuple[int, int]] = []
    position = 0
    for match in [*_PARAGRAPHS.finditer(text), None]:
        end = match.start() if match else len(text)
        if text[position:end].strip():
            spans.extend(_split_long(text, position, end, size))
        position = match.end() if match else end
    return spans


def _split_long(text: str, start: int, end: int, size: int) -> list[tuple[int, int]]:
    if end - start <= size:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    position = start
    for match in [*_SENTENCE_END.finditer(text, start, end), None]:
        stop = match.start() if match else end
        while stop - position > size:  # a sentence longer than a passage: cut at a space near the limit
            cut = text.rfind(" ", position + size // 2, position + size)
            cut = cut if cut > position else position + size
            out.append((position, cut))
            position = cut
        if stop > position:
            out.append((position, stop))
        position = match.end() if match else stop
    return [(s, e) for s, e in out if text[s:e].strip()]


def chunk_document(document: Document, size: int) -> list[Chunk]:
    """Consecutive pieces merged up to about `size` characters; offsets point into the document's text."""
    chunks: list[Chunk] = []
    current: tuple[int, int] | None = None
    for start, end in _pieces(document.text, size):
        if current is not None and end - current[0] <= size:
            current = (current[0], end)
            continue
        if current is not None:
            chunks.append(_chunk(document, *current))
        current = (start, end)
    if current is not None:
        chunks.append(_chunk(document, *current))
    return chunks


def _chunk(document: Document, start: int, end: int) -> Chunk:
    raw = document.text[start:end]
    lead = len(raw) - len(raw.lstrip())
    text = raw.strip()
    return Chunk(document.index, document.title, text, start + lead, start + lead + len(text))


# --- the index -------------------------------------------------------------------------------------


class SearchIndex:
    """Passages in an in-memory FTS5 table, and their embeddings when there is a model. Used from worker threads."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.lock = threading.Lock()
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute("CREATE VIRTUAL TABLE passages USING fts5(text, tokenize='porter unicode61')")
        self.db.executemany("INSERT INTO passages (rowid, text) VALUES (?, ?)", enumerate(c.text for c in chunks))
        self.vectors: dict[int, np.ndarray] = {}  # chunk id -> unit vector

    def keyword_ranking(self, query: str, limit: int) -> list[int]:
        terms = list(dict.fromkeys(re.findall(r"\w+", query.lower())))[:MAX_QUERY_TERMS]
        if not terms:
            return []
        expression = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        sql = "SELECT rowid FROM passages WHERE passages MATCH ? ORDER BY bm25(passages) LIMIT ?"
        with self.lock:
            return [row[0] for row in self.db.execute(sql, (expression, limit))]

    def vector_ranking(self, query_vector: np.ndarray, ids: list[int], limit: int) -> list[int]:
        import numpy as np

        ids = [i for i in ids if i in self.vectors]
        if not ids:
            return []
        scores = np.stack([self.vectors[i] for i in ids]) @ query_vector
        return [ids[j] for j in np.argsort(-scores)[:limit]]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def build_index(documents: list[Document], chunk_chars: int) -> SearchIndex:
    return SearchIndex([c for d in documents for c in chunk_document(d, chunk_chars)])


def fuse(rankings: list[list[int]], top_k: int) -> list[int]:
    """Reciprocal rank fusion: each ranking adds 1 / (RRF_K + rank) to a passage's score."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores, key=lambda i: (-scores[i], i))[:top_k]


# --- the tool --------------------------------------------------------------------------------------


class SemanticSearch:
    """One run's semantic_search_v1: documents parsed and indexed in `start`, searched in `call`."""

    def __init__(self) -> None:
        self.description = DESCRIPTION
        self.input_schema: dict[str, Any] = _schema(20)
        self.index: SearchIndex | None = None
        self.embedder: Embedder | None = None
        self.embedding_note: str | None = None  # why ranking is keywords only, when an embedder was configured
        self.max_top_k = 20

    async def start(self, env: ToolEnv) -> None:
        settings = env.settings.semantic_search
        self.max_top_k = settings.max_top_k
        self.input_schema = _schema(settings.max_top_k)
        documents = await load_documents(env.request.tool_context, env.settings, env.egress)
        self.index = await asyncio.to_thread(build_index, documents, settings.chunk_chars)  # CPU work: off the loop
        chunks = self.index.chunks
        if citations.enabled(env):
            env.system_additions["citations"] = citations.INSTRUCTIONS
        try:
            self.embedder = embedder_for(settings.embeddings, env.models)
        except EmbeddingError as exc:
            self.embedding_note = str(exc)
        if self.embedder is not None and chunks and len(chunks) <= EMBED_ALL_MAX:
            await self._embed(list(range(len(chunks))))

    async def _embed(self, ids: list[int]) -> None:
        """Embed these passages (those not embedded yet); on failure, note it and go on with keywords only."""
        assert self.index is not None
        todo = [i for i in ids if i not in self.index.vectors]
        if not todo or self.embedder is None:
            return
        try:
            vectors = await self.embedder.embed([self.index.chunks[i].text for i in todo])
        except EmbeddingError as exc:
            self.embedder, self.embedding_note = None, str(exc)
            return
        self.index.vectors.update(zip(todo, vectors, strict=True))

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        query, top_k, problem = self._arguments(arguments)
        if problem is not None:
            return ToolOutcome(problem, is_error=True)
        assert self.index is not None
        index = self.index
        if not index.chunks:
            return ToolOutcome("There are no documents to search: tool_context holds no text, file or uri artifact.")
        keyword = await asyncio.to_thread(index.keyword_ranking, query, CANDIDATES)
        rankings = [keyword]
        if self.embedder is not None:
            if len(index.chunks) > EMBED_ALL_MAX:
                await self._embed(keyword[:RERANK_CANDIDATES])
            vector = await self._query_vector(query)
            if vector is not None:
                ids = list(index.vectors)
                rankings.append(await asyncio.to_thread(index.vector_ranking, vector, ids, CANDIDATES))
        chosen = fuse(rankings, top_k)
        return ToolOutcome(self._render(chosen, env))

    async def _query_vector(self, query: str) -> np.ndarray | None:
        assert self.embedder is not None
        try:
            vectors = await self.embedder.embed([query])
        except EmbeddingError as exc:
            self.embedder, self.embedding_note = None, str(exc)
            return None
        return vectors[0]

    def _arguments(self, arguments: dict[str, Any]) -> tuple[str, int, str | None]:
        query, top_k = arguments.get("query"), arguments.get("top_k", DEFAULT_TOP_K)
        if not isinstance(query, str) or not query.strip():
            return "", 0, 'semantic_search_v1 needs {"query": "<what to look for>"}'
        if top_k is None:
            top_k = DEFAULT_TOP_K
        if isinstance(top_k, str) and top_k.strip().isdigit():  # small models often quote numbers
            top_k = int(top_k)
        if isinstance(top_k, float) and top_k.is_integer():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            return "", 0, f"top_k must be an integer from 1 to {self.max_top_k}"
        return query[:MAX_QUERY_CHARS], min(top_k, self.max_top_k), None

    def _render(self, chosen: list[int], env: ToolEnv) -> str:
        """The results for the model, numbered across the run; each one kept in env.sources."""
        assert self.index is not None
        lines = []
        if self.embedding_note is not None:
            lines.append(f"(Ranked by keywords only: {self.embedding_note})")
        if not chosen:
            lines.append("No passage matches the query. Try other words.")
            return "\n".join(lines)
        for chunk_id in chosen:
            chunk = self.index.chunks[chunk_id]
            number = _source_number(env, chunk)
            lines.append(
                f'[{number}] document {chunk.document} "{chunk.title}" '
                f"(characters {chunk.start}-{chunk.end}):\n{chunk.text}\n"
            )
        if citations.enabled(env):
            lines.append(citations.INSTRUCTIONS)
        return "\n".join(lines).strip()

    async def aclose(self) -> None:
        if self.index is not None:
            self.index.close()


def _source_number(env: ToolEnv, chunk: Chunk) -> int:
    """The passage's number: the one it already had in this run, else the next."""
    for number, source in enumerate(env.sources, 1):
        if (source.document_index, source.start, source.end) == (chunk.document, chunk.start, chunk.end):
            return number
    env.sources.append(Source(chunk.document, chunk.title, chunk.text, chunk.start, chunk.end))
    return len(env.sources)


def _schema(max_top_k: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            # Bounded: a model whose arguments are sampled under this schema (the local one) must stop somewhere.
            "query": {"type": "string", "maxLength": 200, "description": "What to look for, in natural language"},
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_top_k,
                "description": f"How many passages to return (default {min(DEFAULT_TOP_K, max_top_k)})",
            },
        },
        "required": ["query"],
    }


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """Refuse before the run what can be judged cheaply: document counts, sizes, base64, file types, URL shapes."""
    if chat.tool_context is not None:
        check_artifacts(chat.tool_context, settings.tools.semantic_search, settings.egress)


TOOLS = {"semantic_search_v1": SemanticSearch}
