"""database_query_v1 over real HTTP: a real server process, real SQLite files and the machine's PostgreSQL
(127.0.0.1:5432, database `test`), the model faked by the fake upstream scripted to call the tool.
Pure helpers (redaction, the first keyword, connection string forms) are checked in-process at the end."""

from __future__ import annotations

import select
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from backstream.builtin_tools import database
from backstream.errors import Invalid
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.server import SECRETS, ServerProcess, fake_models
from tests.support.sse import parse_sse

PG = "postgresql://root@127.0.0.1:5432/test"
PG_PASSWORD = "hunter2-db-secret-for-tests-only-5150"
SECRETS.add(PG_PASSWORD)
USER = [{"role": "user", "content": "How much is a pear?"}]
TOOL = {"type": "database_query_v1"}


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def shop_db(allowed_dir: Path) -> Path:
    """A SQLite file with 12 items: item-1 … item-12, and item 7 is the pear."""
    path = allowed_dir / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL)")
        rows = [(i, "pear" if i == 7 else f"item-{i}", i * 1.25) for i in range(1, 13)]
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
    conn.close()
    return path


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[str]:
    """A schema of its own in the `test` database with the same 12 items; dropped at the end."""
    schema = f"bs_dbq_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.items (id integer PRIMARY KEY, name text NOT NULL, price numeric)")
        conn.execute(
            f"INSERT INTO {schema}.items SELECT i, CASE WHEN i = 7 THEN 'pear' ELSE 'item-' || i END, i * 1.25 "
            "FROM generate_series(1, 12) i"
        )
    yield schema
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, allowed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "runs": {"max_steps": 3},
        "tools": {
            "database_query": {
                "allow": [f"sqlite:///{allowed_dir}/*.db", PG, "postgresql://bob:*@127.0.0.1:*/nowhere"],
                "timeout_s": 0.5,
                "max_rows": 5,
                "max_bytes": 1024,
            }
        },
    }
    server = ServerProcess(tmp_path_factory.mktemp("dbq"), config, name="dbq").start()
    yield server
    server.stop()


def query(sql: str, call_id: str = "call_1", **extra: Any) -> ToolCall:
    raw = orjson.dumps({"query": sql, **extra}).decode()
    return ToolCall(id=call_id, name="database_query_v1", arguments=[raw[: len(raw) // 2], raw[len(raw) // 2 :]])


def sqlite_artifact(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "sql_database", "connection_string": f"sqlite:///{path}", **extra}


def post(c: httpx.Client, tool_context: Any) -> httpx.Response:
    body = {"model": "gpt", "max_tokens": 64, "messages": USER, "tools": [TOOL], "tool_context": tool_context}
    return c.post("/v1/messages", json={**body, "stream": True})


def run(srv: ServerProcess, fake: FakeUpstream, tool_context: Any, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """One run where the model calls the tool once (or several times in one step), then answers."""
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=calls), Reply(tokens=["done"])])
    with srv.client() as c:
        resp = post(c, tool_context)
    assert resp.status_code == 200, resp.text
    return parse_sse(resp.content)


def results(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["data"] for f in frames if f["event"] == "tool_result"]


def sent_tool_messages(fake: FakeUpstream) -> list[str]:
    """What the model's second request carried back as tool results."""
    return [m["content"] for m in fake.requests[-1].body["messages"] if m["role"] == "tool"]


def described(fake: FakeUpstream) -> str:
    tools = fake.requests[0].body["tools"]
    return next(t["function"]["description"] for t in tools if t["function"]["name"] == "database_query_v1")


def pg_rows(schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG) as conn:
        return conn.execute(f"SELECT id, name FROM {schema}.items ORDER BY id").fetchall()


# --- the right row reaches the model --------------------------------------------------------------------------


def test_sqlite_row_reaches_the_model(srv: ServerProcess, fake: FakeUpstream, shop_db: Path) -> None:
    artifact = sqlite_artifact(shop_db, description="the shop's price list")
    frames = run(srv, fake, [artifact], [query("SELECT name, price FROM items WHERE id = 7")])
    (result,) = results(frames)
    assert result["is_error"] is False, result
    assert result["content"].splitlines() == ['columns: ["name","price"]', '["pear",8.75]', "(1 row)"]
    assert result["database"] == {"index": 0, "rows": 1, "truncated": False}
    assert sent_tool_messages(fake) == [result["content"]], "the row reaches the model's next request"
    description = described(fake)
    assert "items: id INTEGER, name TEXT, price REAL" in description and "the shop's price list" in description
    assert frames[-1]["data"]["finish_reason"] == "Stop"


def test_postgresql_row_reaches_the_model(srv: ServerProcess, fake: FakeUpstream, pg_schema: str) -> None:
    # tool_context as a dict of artifact lists: fields are named by key
    context = {"databases": [{"type": "sql_database", "connection_string": PG, "description": "inventory"}]}
    frames = run(srv, fake, context, [query(f"SELECT name, price FROM {pg_schema}.items WHERE id = 7")])
    (result,) = results(frames)
    assert result["is_error"] is False, result
    assert result["content"].splitlines() == ['columns: ["name","price"]', '["pear","8.75"]', "(1 row)"]
    assert sent_tool_messages(fake) == [result["content"]]
    assert f"{pg_schema}.items: id integer, name text, price numeric" in described(fake)


def test_second_database_by_index(srv: ServerProcess, fake: FakeUpstream, shop_db: Path, pg_schema: str) -> None:
    context = [sqlite_artifact(shop_db), {"type": "sql_database", "connection_string": PG}]
    calls = [query(f"SELECT count(*) FROM {pg_schema}.items", "c1", database=1), query("SELECT 1", "c2", database=2)]
    first, second = results(run(srv, fake, context, calls))
    assert first["is_error"] is False and first["content"].splitlines()[1] == "[12]"
    assert second["is_error"] is True and "from 0 to 1" in second["content"]


# --- the allow-list, before anything connects ----------------------------------------------------------------


def test_outside_the_allow_list_is_422_and_nothing_connects(srv: ServerProcess, fake: FakeUpstream) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        secret = f"postgresql://bob:{PG_PASSWORD}@127.0.0.1:{port}/elsewhere"  # only /nowhere is allowed
        with srv.client() as c:
            resp = post(
                c, [{"type": "text", "value": "unrelated"}, {"type": "sql_database", "connection_string": secret}]
            )
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["details"][0]["field"] == "tool_context.1.connection_string"
        assert "not allowed" in error["message"] and "bob:***@" in error["message"]
        assert PG_PASSWORD not in resp.text
        readable, _, _ = select.select([listener], [], [], 0)
        assert readable == [], "the server connected to a database it was not allowed to"
    assert fake.requests == [], "and no run started"


def test_allowed_but_unreachable_fails_at_start_without_the_password(srv: ServerProcess, fake: FakeUpstream) -> None:
    """The control for the test above: an allowed string does connect, and its failure names no password."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        accepted = threading.Event()

        def hang_up() -> None:
            conn, _ = listener.accept()
            accepted.set()
            conn.close()  # not PostgreSQL: the connection fails at once

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        allowed = f"postgresql://bob:{PG_PASSWORD}@127.0.0.1:{port}/nowhere"
        with srv.client() as c:
            resp = post(c, [{"type": "sql_database", "connection_string": allowed}])
        thread.join(5)
    assert accepted.is_set(), "the allowed connection string was connected to"
    assert resp.status_code == 502 and PG_PASSWORD not in resp.text
    error = resp.json()["error"]
    assert error["type"] == "tool_error"
    assert "cannot open database 0 (postgresql://bob:***@127.0.0.1" in error["message"]
    assert fake.requests == [], "the model is never called"


@pytest.mark.parametrize(
    ("context", "field", "words"),
    [
        ([{"type": "text", "value": "no database here"}], "tool_context", "needs a"),
        ([{"type": "sql_database"}], "tool_context.0.connection_string", "needs a connection_string"),
        (
            {"type": "sql_database", "connection_string": "sqlite:///etc/../tmp/x.db"},
            "tool_context.connection_string",
            "normalised",
        ),
        ([{"type": "sql_database", "connection_string": "shop.db"}], "tool_context.0.connection_string", "absolute"),
        (
            [{"type": "sql_database", "connection_string": "postgresql://root@127.0.0.1:5432/test?host=10.0.0.1"}],
            "tool_context.0.connection_string",
            "'host' is not accepted",
        ),
        (
            [{"type": "sql_database", "connection_string": "mysql://root@db/x"}],
            "tool_context.0.connection_string",
            "must be",
        ),
    ],
)
def test_malformed_artifacts_are_422(srv: ServerProcess, context: Any, field: str, words: str) -> None:
    with srv.client() as c:
        resp = post(c, context)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["details"][0]["field"] == field and words in error["message"]


def test_sqlite_outside_the_allow_list_is_refused(srv: ServerProcess, allowed_dir: Path, tmp_path: Path) -> None:
    """Another folder, or a way out of the allowed one through its glob (the pattern's `*` matches '/')."""
    outside = tmp_path / "secret.db"
    with sqlite3.connect(outside) as conn:
        conn.execute("CREATE TABLE secrets (value TEXT)")
    conn.close()
    escape = f"sqlite://{allowed_dir}/../{tmp_path.name}/secret.db"
    with srv.client() as c:
        for connection_string, words in [(f"sqlite://{outside}", "not allowed"), (escape, "normalised")]:
            resp = post(c, [{"type": "sql_database", "connection_string": connection_string}])
            assert resp.status_code == 422, resp.text
            error = resp.json()["error"]
            assert error["details"][0]["field"] == "tool_context.0.connection_string" and words in error["message"]


# --- read-only, time and size limits -------------------------------------------------------------------------


def test_writes_are_refused_and_data_unchanged(
    srv: ServerProcess, fake: FakeUpstream, shop_db: Path, pg_schema: str
) -> None:
    before = shop_db.read_bytes()
    sqlite_calls = [
        query("INSERT INTO items VALUES (99, 'plum', 1.0)", "c1"),
        query("DROP TABLE items", "c2"),
        query("WITH doomed AS (SELECT 7 AS id) DELETE FROM items WHERE id IN (SELECT id FROM doomed)", "c3"),
    ]
    for result in results(run(srv, fake, [sqlite_artifact(shop_db)], sqlite_calls)):
        assert result["is_error"] is True and "read-only" in result["content"], result
    assert shop_db.read_bytes() == before

    pg_before = pg_rows(pg_schema)
    pg_calls = [
        query(f"DROP TABLE {pg_schema}.items", "c1"),
        # Past the keyword check: PostgreSQL's read-only transaction refuses it.
        query(f"EXPLAIN ANALYZE INSERT INTO {pg_schema}.items VALUES (99, 'plum', 1)", "c2"),
        query(f"WITH gone AS (DELETE FROM {pg_schema}.items RETURNING id) SELECT * FROM gone", "c3"),
    ]
    pg_results = results(run(srv, fake, [{"type": "sql_database", "connection_string": PG}], pg_calls))
    assert [r["is_error"] for r in pg_results] == [True, True, True]
    assert all("read-only" in r["content"] for r in pg_results), pg_results
    assert "cannot execute INSERT in a read-only transaction" in pg_results[1]["content"]
    assert pg_rows(pg_schema) == pg_before and len(pg_before) == 12
    assert all("read-only" in m for m in sent_tool_messages(fake)), "the model is told"


def test_statement_timeout(srv: ServerProcess, fake: FakeUpstream, shop_db: Path) -> None:
    endless = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    context = [sqlite_artifact(shop_db), {"type": "sql_database", "connection_string": PG}]
    started = time.monotonic()
    found = results(run(srv, fake, context, [query(endless, "c1"), query("SELECT pg_sleep(5)", "c2", database=1)]))
    elapsed = time.monotonic() - started
    assert [r["is_error"] for r in found] == [True, True]
    assert all("statement timeout (0.5 s)" in r["content"] for r in found), found
    assert elapsed < 4, f"two 0.5 s timeouts took {elapsed:.1f} s"


def test_row_cap(srv: ServerProcess, fake: FakeUpstream, shop_db: Path) -> None:
    context = [sqlite_artifact(shop_db), {"type": "sql_database", "connection_string": PG}]
    # Ten million rows on PostgreSQL: a server-side cursor fetches 6 of them, well within the 0.5 s timeout.
    calls = [
        query("SELECT id FROM items ORDER BY id", "c1"),
        query("SELECT generate_series(1, 10000000) AS n", "c2", database=1),
    ]
    small, huge = results(run(srv, fake, context, calls))
    for result in (small, huge):
        assert result["is_error"] is False, result
        lines = result["content"].splitlines()
        assert lines[1:6] == ["[1]", "[2]", "[3]", "[4]", "[5]"] and len(lines) == 7
        assert "only the first 5 rows are shown (max_rows)" in lines[-1]
        assert result["database"]["truncated"] is True
    assert sent_tool_messages(fake) == [small["content"], huge["content"]]


def test_byte_cap(srv: ServerProcess, fake: FakeUpstream, shop_db: Path) -> None:
    (result,) = results(
        run(srv, fake, [sqlite_artifact(shop_db)], [query("SELECT id, hex(randomblob(300)) FROM items")])
    )
    assert result["is_error"] is False
    assert len(result["content"].encode()) <= 1024
    assert "result cut at max_bytes (1024 bytes) after 1 rows" in result["content"]


# --- pure helpers (in-process) -------------------------------------------------------------------------------


def test_redaction_and_scrubbing() -> None:
    cs = f"postgresql://bob:{PG_PASSWORD}@db.internal:5432/shop?sslmode=require"
    assert database.redact(cs) == "postgresql://bob:***@db.internal:5432/shop?sslmode=require"
    assert database.redact("postgresql://bob@db/x") == "postgresql://bob@db/x"
    assert database.redact("postgres://bob:p@s/s?#@db/x?sslmode=require") == "postgres://bob:***@db/x?sslmode=require"
    assert database.redact("postgresql://bob:p@ss/word@db/x") == "postgresql://bob:***@db/x"
    spec = database.DatabaseSpec("f", cs, None, "postgresql")
    assert spec.scrub(f"password {PG_PASSWORD} rejected") == "password *** rejected"


def test_first_keyword_skips_comments_and_parentheses() -> None:
    assert database._first_keyword("  -- hi\n/* x */ ((select 1))") == "select"
    assert database._first_keyword("/* unterminated") == ""
    assert database._first_keyword("(" * 10_000 + " ") == ""


def test_sqlite_forms() -> None:
    assert database._sqlite_path("sqlite:///srv/a.db") == "/srv/a.db"
    assert database._sqlite_path("sqlite:////srv/a.db") == "/srv/a.db"
    assert database._sqlite_path("/srv/a.sqlite3") == "/srv/a.sqlite3"
    assert database._sqlite_path("/srv/a.txt") is None
    with pytest.raises(Invalid):
        database._parse("f", {"connection_string": "sqlite:///srv/a.db?mode=rw"})


def test_stored_requests_drop_connection_string_passwords() -> None:
    """A run that has begun is never started again: its stored request keeps no database password
    (executor and lifecycle store `redact_stored_request` of it), whatever shape tool_context has."""
    from backstream.tools import redact_stored_request

    secret = f"postgresql://bob:{PG_PASSWORD}@db.internal:5432/shop"
    for context in (
        [{"type": "sql_database", "connection_string": secret}, {"type": "text", "value": "kept"}],
        {"databases": [{"type": "sql_database", "connection_string": secret}]},
        {"type": "sql_database", "connection_string": secret, "description": "one"},
    ):
        raw = orjson.dumps({"messages": USER, "tools": [TOOL], "tool_context": context})
        redacted = redact_stored_request(raw)
        assert PG_PASSWORD.encode() not in redacted
        assert b"postgresql://bob:***@db.internal:5432/shop" in redacted
        assert orjson.loads(redacted)["messages"] == USER
