"""semantic_search_v1 and citations over real HTTP: documents from tool_context (text, files of each type,
uris through the egress rules), ranking with a fake /v1/embeddings endpoint and with the built-in offline
model, results reaching the model, citations on events and folded messages, and the 422s. Pure functions
(chunking, citation matching, the numpy embedding model) are checked in-process."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from backstream.api_models import ChatRequest
from backstream.builtin_tools import citations, documents, embeddings, search
from backstream.builtin_tools.base import Source, ToolEnv
from backstream.config import Settings
from tests.support import docs_fixtures as fixtures
from tests.support.fake_embeddings import FakeEmbeddings
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.server import SECRETS, ServerProcess, fake_models, free_port
from tests.support.sse import parse_sse

EMB_KEY = "emb-key-secret-for-tests-only-41"
SECRETS.add(EMB_KEY)
CITATIONS_ON = {"enabled": True}  # the seed's configuration object

LAUNCH = "The Aurora satellite launches from Kourou on March 3, after two delays caused by a faulty valve."
BUDGET = "The canteen budget for next year is 41,000 euros, mostly for new ovens and a coffee machine."
GARDEN = "Tomatoes need six hours of direct sun and deep watering twice a week in the summer months."
SEARCH = [{"type": "semantic_search_v1"}]


@pytest.fixture(scope="module")
def emb() -> Iterator[FakeEmbeddings]:
    server = FakeEmbeddings().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def docs() -> Iterator[fixtures.DocServer]:
    server = fixtures.DocServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def srv(
    fake: FakeUpstream, emb: FakeEmbeddings, docs: fixtures.DocServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Remote embeddings (the fake), documents served by `docs` reachable through egress.allow_hosts."""
    emb_model = {"name": "emb", "provider": "embeddings", "base_url": emb.base_url, "api_key_env": "EMB_KEY"}
    config = {
        "store": "memory",
        "models": [*fake_models(fake), emb_model],
        "egress": {"allow_hosts": [f"127.0.0.1:{docs.port}"]},
        "runs": {"max_steps": 4},
        "tools": {"semantic_search": {"embeddings": "emb", "max_document_bytes": 200_000, "max_documents": 5}},
    }
    server = ServerProcess(tmp_path_factory.mktemp("search"), config, env={"EMB_KEY": EMB_KEY}, name="search")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def builtin_srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default configuration: the offline built-in embedding model, and the local chat model."""
    config = {"store": "memory", "models": fake_models(fake), "runs": {"max_steps": 3}}
    server = ServerProcess(tmp_path_factory.mktemp("search-builtin"), config, env={"HF_HUB_OFFLINE": "1"}, name="sb")
    yield server.start()
    server.stop()


def search_call(query: str, call_id: str = "call_s1", **extra: Any) -> ToolCall:
    raw = orjson.dumps({"query": query, **extra}).decode()
    return ToolCall(id=call_id, name="semantic_search_v1", arguments=[raw])


def texts(*items: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"type": "text", "title": title, "value": value} for title, value in items]


def body(tool_context: Any, question: str = "When does Aurora launch?", **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": question}],
        "tools": SEARCH,
        "tool_context": tool_context,
        **extra,
    }


def stream(c: httpx.Client, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with c.stream("POST", "/v1/messages", json={**payload, "stream": True}) as resp:
        raw = resp.read()
        assert resp.status_code == 200, raw
    return parse_sse(raw)


def tool_results(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["data"] for f in frames if f["event"] == "tool_result"]


# --- end to end: search results reach the model -------------------------------------------------------


def test_search_result_reaches_the_model(srv: ServerProcess, fake: FakeUpstream, emb: FakeEmbeddings) -> None:
    fake.script(
        "gpt-up", [Reply(tokens=[], tool_calls=[search_call("Aurora launch date")]), Reply(tokens=["March 3."])]
    )
    emb.requests.clear()
    context = [{"type": "sql_database", "connection_string": "ignored by search"}]
    context += texts(("Canteen", BUDGET), ("Launch plan", LAUNCH), ("Garden", GARDEN))
    with srv.client() as c:
        frames = stream(c, body(context))
    [result] = tool_results(frames)
    assert result["is_error"] is False and result["name"] == "semantic_search_v1"
    first_line = result["content"].splitlines()[0]
    assert first_line.startswith('[1] document 1 "Launch plan"'), result["content"]  # documents count from 0
    assert LAUNCH in result["content"].split("[2]")[0], "the best passage comes first"
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    offered = fake.requests[0].body["tools"]
    [tool] = [t["function"] for t in offered if t["function"]["name"] == "semantic_search_v1"]
    assert tool["parameters"]["required"] == ["query"] and tool["parameters"]["properties"]["top_k"]["maximum"] == 20
    sent = fake.requests[1].body["messages"][-1]
    assert sent["role"] == "tool" and sent["tool_call_id"] == "call_s1" and LAUNCH in sent["content"]
    # Passages, then the query, were embedded by the configured endpoint, with its key.
    assert emb.requests and all(r["headers"]["authorization"] == f"Bearer {EMB_KEY}" for r in emb.requests)
    embedded = [text for r in emb.requests for text in r["body"]["input"]]
    assert LAUNCH in embedded and "Aurora launch date" in embedded and emb.requests[0]["body"]["model"] == "emb"


FILE_LINES = ["Quarterly memo", "The Aurora satellite launches from Kourou on March 3.", "Ask the press office first."]


def _file(kind: str) -> dict[str, Any]:
    if kind == "pdf":
        return {"type": "file", "filename": "memo.pdf", "value": fixtures.b64(fixtures.pdf(FILE_LINES))}
    if kind == "pdf-by-magic":
        return {"type": "file", "value": fixtures.b64(fixtures.pdf(FILE_LINES))}
    if kind == "docx":
        return {"type": "file", "filename": "memo.docx", "value": fixtures.b64(fixtures.docx(FILE_LINES))}
    if kind == "html":
        return {"type": "file", "filename": "memo.html", "value": fixtures.b64(fixtures.html("Memo", FILE_LINES))}
    if kind == "markdown":
        text = "# Quarterly memo\n\n" + "\n\n".join(f"* {line}" for line in FILE_LINES[1:])
        return {"type": "file", "filename": "memo.md", "value": fixtures.b64(text.encode())}
    return {"type": "file", "filename": "memo.txt", "value": fixtures.b64("\n\n".join(FILE_LINES).encode())}


@pytest.mark.parametrize("kind", ["pdf", "pdf-by-magic", "docx", "html", "markdown", "text"])
def test_each_file_type_is_parsed(srv: ServerProcess, fake: FakeUpstream, kind: str) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("Kourou launch", top_k=1)]), Reply(tokens=["ok"])])
    context = [*texts(("Canteen", BUDGET)), _file(kind)]
    with srv.client() as c:
        frames = stream(c, body(context))
    [result] = tool_results(frames)
    assert result["is_error"] is False
    assert result["content"].startswith("[1] document 1 "), result["content"]
    assert "The Aurora satellite launches from Kourou on March 3." in result["content"]
    assert "[2]" not in result["content"], "top_k 1"
    if kind == "pdf":
        assert '"memo.pdf"' in result["content"], "a file's title defaults to its filename"


def test_uri_artifact_is_fetched_through_egress(
    srv: ServerProcess, fake: FakeUpstream, docs: fixtures.DocServer
) -> None:
    docs.routes["/guide.html"] = (200, {"content-type": "text/html"}, fixtures.html("Launch guide", [LAUNCH, GARDEN]))
    docs.routes["/old-guide"] = (302, {"location": "/guide.html"}, b"")
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("Kourou valve")]), Reply(tokens=["ok"])])
    docs.hits.clear()
    with srv.client() as c:
        frames = stream(c, body([*texts(("Canteen", BUDGET)), {"type": "uri", "value": f"{docs.url}/old-guide"}]))
    [result] = tool_results(frames)
    assert result["content"].startswith(f'[1] document 1 "{docs.url}/old-guide"'), result["content"]
    assert LAUNCH in result["content"]
    assert docs.hits == ["/old-guide", "/guide.html"], "a redirect within the allowed host is followed"


def test_uri_outside_egress_is_422(srv: ServerProcess, fake: FakeUpstream, docs: fixtures.DocServer) -> None:
    refused = f"http://127.0.0.1:{free_port()}/secret.txt"  # not in egress.allow_hosts
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body([*texts(("Canteen", BUDGET)), {"type": "uri", "value": refused}]))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["details"][0]["field"] == "tool_context.1.value" and "allow_hosts" in error["message"]
    assert fake.requests == []


def test_private_uris_are_refused_without_an_allow_list(builtin_srv: ServerProcess, fake: FakeUpstream) -> None:
    """No egress.allow_hosts: a private literal address is a 422; a name resolving to one fails when fetched."""
    with builtin_srv.client() as c:
        literal = c.post("/v1/messages", json=body([{"type": "uri", "value": "http://127.0.0.1:9/notes.txt"}]))
        named = c.post("/v1/messages", json=body([{"type": "uri", "value": "http://localhost:9/notes.txt"}]))
    assert literal.status_code == 422 and "not a globally routable" in literal.json()["error"]["message"]
    assert named.status_code == 502, named.text
    assert "document 0" in named.json()["error"]["message"] and "globally routable" in named.json()["error"]["message"]
    assert fake.requests == []


def test_redirect_to_a_refused_host_fails_the_run(
    srv: ServerProcess, fake: FakeUpstream, docs: fixtures.DocServer
) -> None:
    port = free_port()
    docs.routes["/leak"] = (302, {"location": f"http://127.0.0.1:{port}/internal"}, b"")
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body([{"type": "uri", "value": f"{docs.url}/leak"}]))
    assert resp.status_code == 502, resp.text
    message = resp.json()["error"]["message"]
    assert "document 0" in message and "egress" in message and str(port) in message
    assert fake.requests == [], "the model is not called when the documents cannot be read"


def test_oversized_uri_body_fails_the_run(srv: ServerProcess, fake: FakeUpstream, docs: fixtures.DocServer) -> None:
    docs.routes["/huge.txt"] = (200, {"content-type": "text/plain"}, b"x" * 300_000)  # cap: 200,000 bytes
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body([{"type": "uri", "value": f"{docs.url}/huge.txt"}]))
    assert resp.status_code == 502 and "larger than 200000 bytes" in resp.json()["error"]["message"]


# --- request-time refusals and failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("artifact", "field", "words"),
    [
        ({"type": "file", "filename": "a.pdf", "value": "not base64!!"}, "tool_context.0.value", "base64"),
        ({"type": "file", "value": fixtures.b64(b"\x00\xff\xfe\x01" * 100)}, "tool_context.0.value", "file type"),
        ({"type": "file", "value": fixtures.b64(b"y" * 200_001)}, "tool_context.0.value", "200000 bytes"),
        ({"type": "text", "value": 42}, "tool_context.0.value", "string"),
        ({"type": "uri", "value": "ftp://example.com/a.txt"}, "tool_context.0.value", "http"),
    ],
)
def test_bad_documents_are_422(srv: ServerProcess, fake: FakeUpstream, artifact: Any, field: str, words: str) -> None:
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body([artifact]))
        background = c.post("/v1/messages/async", json=body([artifact]))
    assert resp.status_code == 422 and background.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["details"][0]["field"] == field and words in error["message"], error
    assert fake.requests == []


def test_grouped_tool_context_names_the_field(srv: ServerProcess, fake: FakeUpstream) -> None:
    """tool_context as an object of lists: documents are numbered across it, fields named by their path."""
    bad = {"type": "file", "filename": "b.pdf", "value": "%%%"}
    grouped = {
        "databases": [{"type": "sql_database", "connection_string": "x"}],
        "documents": [*texts(("a", GARDEN)), bad],
    }
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body(grouped))
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "tool_context.documents.1.value"
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("canteen ovens")]), Reply(tokens=["ok"])])
    with srv.client() as c:
        frames = stream(c, body({"documents": texts(("Garden", GARDEN), ("Canteen", BUDGET))}))
    assert tool_results(frames)[0]["content"].startswith('[1] document 1 "Canteen"')


def test_too_many_documents_is_422(srv: ServerProcess) -> None:
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body(texts(*[(f"d{i}", GARDEN) for i in range(6)])))
    assert resp.status_code == 422 and "at most 5" in resp.json()["error"]["message"]


def test_unparseable_file_fails_the_run_naming_it(srv: ServerProcess, fake: FakeUpstream) -> None:
    broken = {"type": "file", "filename": "report.pdf", "value": fixtures.b64(b"%PDF-1.4 this is not a pdf at all")}
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body([*texts(("Canteen", BUDGET)), broken]))
    assert resp.status_code == 502, resp.text
    message = resp.json()["error"]["message"]
    assert "document 1 (report.pdf, tool_context.1)" in message and "cannot read it as pdf" in message
    assert fake.requests == []


def test_an_embeddings_model_never_serves_chat(srv: ServerProcess, fake: FakeUpstream) -> None:
    with srv.client() as c:
        resp = c.post("/v1/messages", json={"model": "emb", "messages": [{"role": "user", "content": "hi"}]})
        listed = c.get("/v1/models").json()["data"]
        ready = c.get("/readyz")
    assert resp.status_code == 422
    assert (
        "embeddings model" in resp.json()["error"]["message"] and resp.json()["error"]["details"][0]["field"] == "model"
    )
    assert {m["id"]: m["provider"] for m in listed}["emb"] == "embeddings"
    assert ready.status_code == 200, "readiness checks an embeddings model's key, not a chat provider"
    assert fake.requests == []


def test_embedding_failure_falls_back_to_keywords(srv: ServerProcess, fake: FakeUpstream, emb: FakeEmbeddings) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("canteen ovens")]), Reply(tokens=["ok"])])
    emb.fail = True
    try:
        with srv.client() as c:
            frames = stream(c, body(texts(("Launch plan", LAUNCH), ("Canteen", BUDGET))))
    finally:
        emb.fail = False
    [result] = tool_results(frames)
    assert result["is_error"] is False and "Ranked by keywords only" in result["content"]
    assert "500" in result["content"] and '[1] document 1 "Canteen"' in result["content"]


# --- citations ------------------------------------------------------------------------------------------


def test_citations_on_events_stream_end_and_results(srv: ServerProcess, fake: FakeUpstream) -> None:
    answer = ["Aurora launches from Kourou ", "on March 3 [1]."]
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("Aurora launch Kourou")]), Reply(tokens=answer)])
    system = [{"text": "You answer from the documents.", "citations": CITATIONS_ON}]
    payload = body(texts(("Canteen", BUDGET), ("Launch plan", LAUNCH)), system=system)
    with srv.client() as c:
        mid = c.post("/v1/messages/async", json=payload).json()["message_id"]
        with c.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
            frames = parse_sse(resp.read())
        result = c.get(f"/v1/messages/async/{mid}/result").json()
    expected = {
        "type": "search_result_location",
        "document_index": 1,
        "document_title": "Launch plan",
        "cited_text": "The Aurora satellite launches from Kourou on March 3, after two delays caused by a faulty valve.",
        "start_char_index": 0,
        "end_char_index": len(LAUNCH),
        "source_index": 1,
    }
    [complete] = [f["data"] for f in frames if f["event"] == "text_complete"]
    assert complete["citations"] == [expected]
    assert frames[-1]["event"] == "stream_end" and frames[-1]["data"]["citations"] == [expected]
    assert result["status"] == "completed" and result["citations"] == [expected]
    [text_block] = [b for b in result["content"] if b["type"] == "text"]
    assert text_block["citations"] == [expected] and text_block["text"] == "".join(answer)
    # The model was told how to cite: in the system prompt of each step and in the tool result.
    first_system = fake.requests[0].body["messages"][0]
    assert first_system["role"] == "system" and citations.INSTRUCTIONS in str(first_system["content"])
    assert citations.INSTRUCTIONS in tool_results(frames)[0]["content"]


def test_citations_in_the_non_streamed_answer(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script(
        "gpt-up",
        [Reply(tokens=[], tool_calls=[search_call("canteen budget")]), Reply(tokens=["About 41,000 euros [1]."])],
    )
    system = [{"text": "Be brief.", "citations": CITATIONS_ON}]
    with srv.client() as c:
        message = c.post("/v1/messages", json=body(texts(("Launch plan", LAUNCH), ("Canteen", BUDGET)), system=system))
    assert message.status_code == 200, message.text
    folded = message.json()
    [citation] = folded["citations"]
    assert citation["document_index"] == 1 and citation["document_title"] == "Canteen"
    assert citation["cited_text"] == BUDGET
    assert folded["content"][-1]["citations"] == folded["citations"]


def test_no_citations_unless_enabled(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call("canteen")]), Reply(tokens=["41,000 euros [1]."])])
    with srv.client() as c:
        folded = c.post("/v1/messages", json=body(texts(("Canteen", BUDGET)))).json()
    assert folded["citations"] is None and "citations" not in folded["content"][-1]
    assert citations.INSTRUCTIONS not in str(fake.requests[0].body["messages"])


# --- the built-in offline embedding model ----------------------------------------------------------------


def test_builtin_embeddings_find_a_paraphrase_in_the_server(builtin_srv: ServerProcess, fake: FakeUpstream) -> None:
    # No word of the query is in the right passage: keyword ranking alone cannot find it.
    query = "orbital vehicle liftoff schedule"
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[search_call(query, top_k=1)]), Reply(tokens=["ok"])])
    rocket = "The rocket will be launched into space next spring from the coastal spaceport."
    with builtin_srv.client() as c:
        frames = stream(c, body(texts(("Canteen", BUDGET), ("Garden", GARDEN), ("Rocket", rocket))))
    [result] = tool_results(frames)
    assert result["content"].startswith('[1] document 2 "Rocket"'), result["content"]
    assert "keywords only" not in result["content"]


def test_local_model_searches_then_answers(builtin_srv: ServerProcess) -> None:
    """The built-in model, forced to call the tool (its arguments sampled under the tool's schema), searches
    the documents and answers from the result: structure, not wording."""
    payload = body(
        texts(("Canteen", BUDGET), ("Launch plan", LAUNCH)),
        model="local",
        max_tokens=320,  # room for a query of maxLength 200 even in one-character tokens
        temperature=0,
        tool_choice={"type": "tool", "name": "semantic_search_v1"},
        system={"text": "Answer briefly.", "citations": CITATIONS_ON},
    )
    with builtin_srv.client(timeout=120) as c:
        frames = stream(c, payload)
    kinds = [f["event"] for f in frames]
    assert kinds[0] == "stream_start" and kinds[-1] == "stream_end" and kinds.count("step_start") == 2, "".join(
        f["data"]["delta"] for f in frames if f["event"] == "tool_call_delta"
    )
    call = next(f["data"] for f in frames if f["event"] == "tool_call_complete")
    assert call["name"] == "semantic_search_v1" and isinstance(call["input"].get("query"), str), call
    [result] = tool_results(frames)
    assert result["is_error"] is False and result["content"].startswith("[1] document "), result
    assert frames[-1]["data"]["finish_reason"] in ("Stop", "Length")
    assert not any("tools are not supported" in w for w in frames[0]["data"]["metadata"]["warnings"])


def test_builtin_model_ranks_a_paraphrase_above_unrelated_text_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the embedding model opened a connection: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = embeddings.load_builtin()
    vectors = model.encode(
        [
            "How do I reset my password?",
            "Steps to recover access when you forgot your login credentials.",
            "The recipe needs two cups of flour and a pinch of salt.",
            "A man is eating food.",
            "A man is eating a piece of bread.",
        ]
    )
    assert vectors.shape == (5, 384)
    assert abs(float((vectors**2).sum(axis=1).max()) - 1.0) < 1e-4, "unit vectors"
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2, similarity
    # sentence-transformers gives 0.7553 for this pair with the same weights.
    assert abs(float(similarity[3, 4]) - 0.755) < 0.01, similarity[3, 4]
    assert embeddings.load_builtin() is model, "loaded once per process"


# --- pure functions -------------------------------------------------------------------------------------


def test_chunks_keep_offsets_and_boundaries() -> None:
    text = "First paragraph about ovens.\n\n" + "A sentence on launches. " * 60 + "\n\nLast words here."
    chunks = search.chunk_document(documents.Document(3, "doc", text), 300)
    assert len(chunks) > 4
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text and chunk.document == 3
        assert len(chunk.text) <= 300 and chunk.text == chunk.text.strip()
        assert chunk.text.endswith((".", "here.")), "cut on sentence boundaries"
    assert chunks[0].text.startswith("First paragraph") and chunks[-1].text.endswith("Last words here.")


def test_fusion_prefers_passages_both_rankings_agree_on() -> None:
    assert search.fuse([[1, 2, 3], [3, 1, 4]], 2) == [1, 3]
    assert search.fuse([[], [7, 8]], 5) == [7, 8]


def _env(system: list[dict[str, Any]] | None, sources: list[Source]) -> ToolEnv:
    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": "q"}], "system": system})
    settings = Settings()
    return ToolEnv(request, settings.tools, settings.egress, "/tmp", tenant="default", sources=sources)


def test_unmarked_answers_cite_by_shared_distinctive_words() -> None:
    sources = [Source(0, "Canteen", BUDGET, 100, 100 + len(BUDGET)), Source(1, "Launch", LAUNCH, 0, len(LAUNCH))]
    env = _env([{"text": "x", "citations": CITATIONS_ON}], sources)
    [citation] = citations.cite("Aurora lifts off from Kourou after the valve problems were fixed.", env) or []
    assert citation["source_index"] == 2 and citation["document_title"] == "Launch"
    assert citations.cite("I am not sure, sorry.", env) is None, "no real overlap: no citation"
    marked = citations.cite("Ovens come first [1]. Launch is in March [2][9].", env) or []
    assert [c["source_index"] for c in marked] == [1, 2], "[9] names no result"
    assert marked[0]["start_char_index"] == 100 and marked[0]["cited_text"] == BUDGET
    assert citations.cite("Ovens [1].", _env(None, sources)) is None, "citations are off by default"
    assert citations.enabled(_env([{"text": "x", "citations": [{"enabled": False}]}], sources)) is False


def test_file_kinds_by_name_media_type_and_bytes() -> None:
    assert documents.file_kind(b"%PDF-1.7 ...", None, None) == "pdf"
    assert documents.file_kind(b"hello", "notes.MD", None) == "markdown"
    assert documents.file_kind(b"<!doctype html><p>x", None, None) == "html"
    assert documents.file_kind(b"{}", None, "text/html; charset=utf-8") == "html"
    assert documents.file_kind(fixtures.docx(["x"]), None, None) == "docx"
    assert documents.file_kind(b"\xff\xfe\x00\x01" * 10, None, None) is None
