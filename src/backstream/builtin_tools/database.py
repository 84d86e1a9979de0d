"""`database_query_v1`: read-only SQL over the request's `sql_database` artifacts (SQLite files, PostgreSQL).

A connection string comes from the request, so it is untrusted: it must match one of the
operator's glob patterns (`tools.database_query.allow`) before anything connects. Accepted forms:

- SQLite: `sqlite:///absolute/path.db` (SQLAlchemy's `sqlite:////absolute/path.db` too), or a plain
  absolute path ending in `.db`, `.sqlite` or `.sqlite3`. Opened `mode=ro` with `query_only`, an
  authorizer that allows reads only, and no ATTACH.
- PostgreSQL: `postgresql://…` or `postgres://…` (psycopg 3, async). Every query runs in a read-only
  transaction that is rolled back; the session defaults to read-only too; `statement_timeout` applies.

Queries are SELECT, WITH, VALUES, TABLE or EXPLAIN; rows are fetched at most `max_rows` + 1 (a
server-side cursor on PostgreSQL, so a large result never crosses the wire) and the text is cut at
`max_bytes`. Passwords in connection strings never appear in messages, logs or tool output.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import orjson

from ..errors import Invalid
from .base import ToolEnv, ToolOutcome, ToolSetupError, artifacts

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import DatabaseQuerySettings, Settings

TYPE = "database_query_v1"
MAX_DATABASES = 8  # sql_database artifacts in one request: each one connects when the run starts
MAX_CONNECTION_STRING_CHARS = 4096
MAX_DESCRIPTION_CHARS = 4000
MAX_QUERY_CHARS = 20_000
MAX_SCHEMA_COLUMNS = 2000  # columns introspected per database
MAX_SCHEMA_CHARS = 24_000  # the tables and columns of all databases, in the tool description
MIN_CONNECT_S = 5.0  # connecting and introspecting may take longer than one statement
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
# Query parameters a PostgreSQL URL may carry: others could redirect the connection (host=), read
# server files (passfile=, sslkey=) or loosen the session (options=).
POSTGRES_PARAMS = frozenset({"sslmode", "application_name", "connect_timeout"})
READ_KEYWORDS = frozenset({"select", "with", "values", "table", "explain"})
_WORD = re.compile(r"[A-Za-z]+")

DESCRIPTION = (
    "Run one read-only SQL query (SELECT, WITH, VALUES, TABLE or EXPLAIN) against a database the user "
    "provided, and get its columns and rows back as JSON lines. The databases are read-only: writes are "
    "refused. Results are capped; use WHERE, LIMIT and aggregates to fetch what you need."
)


class QueryRefused(Exception):
    """The query cannot run or failed; the message (passwords removed) becomes an error result."""


@dataclass(frozen=True)
class DatabaseSpec:
    """One `sql_database` artifact, validated."""

    field: str  # where it sits in the request, for 422s
    connection_string: str
    description: str | None
    kind: Literal["sqlite", "postgresql"]
    path: str | None = None  # the SQLite file

    @property
    def shown(self) -> str:
        """The connection string as messages and the model may see it: no password."""
        return redact(self.connection_string)

    def scrub(self, text: str) -> str:
        """`text` (a driver's error message, say) without this connection string's password."""
        password = _password(self.connection_string)
        if password:
            for form in {password, unquote(password), quote(password, safe="")}:
                text = text.replace(form, "***")
        return text


# --- connection strings -------------------------------------------------------------------------------------


def _userinfo_split(connection_string: str) -> tuple[str, str, str] | None:
    """(scheme + "://", userinfo, the rest from its "@") of a URL with credentials, else None.

    The last "@" ends the credentials: a password with a raw "@", "/", "?" or "#" is still hidden
    (an "@" in a query parameter hides the host too, which errs on the safe side).
    """
    scheme, sep, rest = connection_string.partition("://")
    end = rest.rfind("@")
    if not sep or end < 0:
        return None
    return scheme + sep, rest[:end], rest[end:]


def _password(connection_string: str) -> str | None:
    parts = _userinfo_split(connection_string)
    if parts is None or ":" not in parts[1]:
        return None
    return parts[1].partition(":")[2] or None


def redact(connection_string: str) -> str:
    """The connection string with its password replaced by `***`."""
    parts = _userinfo_split(connection_string)
    if parts is None or ":" not in parts[1]:
        return connection_string
    prefix, userinfo, rest = parts
    return f"{prefix}{userinfo.partition(':')[0]}:***{rest}"


def _sqlite_path(connection_string: str) -> str | None:
    """The file of a SQLite connection string (always absolute), or None if it is not one."""
    if connection_string.startswith("sqlite:///"):
        return "/" + connection_string[len("sqlite:///") :].lstrip("/")
    if connection_string.startswith("/") and connection_string.lower().endswith(SQLITE_SUFFIXES):
        return connection_string
    return None


def _parse(field: str, artifact: dict[str, Any]) -> DatabaseSpec:
    """A validated artifact; errors.Invalid (a 422 naming the field) for anything malformed."""
    cs = artifact.get("connection_string")
    if not isinstance(cs, str) or not cs.strip():
        raise Invalid("a sql_database artifact needs a connection_string (a string)", f"{field}.connection_string")
    if len(cs) > MAX_CONNECTION_STRING_CHARS or any(ord(c) < 32 for c in cs):
        raise Invalid(
            f"connection_string must be at most {MAX_CONNECTION_STRING_CHARS} characters, without control characters",
            f"{field}.connection_string",
        )
    description = artifact.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS):
        raise Invalid(
            f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters", f"{field}.description"
        )
    path = _sqlite_path(cs)
    if path is not None:
        # The allow-list is a glob over the string: "/srv/db/*.db" must not reach "/srv/db/../../x.db".
        if os.path.normpath(path) != path or "?" in path or "#" in path:
            raise Invalid(
                "a SQLite path must be absolute and normalised (no '..', '?' or '#')", f"{field}.connection_string"
            )
        return DatabaseSpec(field, cs, description, "sqlite", path)
    if cs.startswith(("postgresql://", "postgres://")):
        for name, _value in parse_qsl(urlsplit(cs).query, keep_blank_values=True):
            if name not in POSTGRES_PARAMS:
                raise Invalid(
                    f"connection string parameter {name!r} is not accepted (only {', '.join(sorted(POSTGRES_PARAMS))})",
                    f"{field}.connection_string",
                )
        return DatabaseSpec(field, cs, description, "postgresql")
    raise Invalid(
        "connection_string must be sqlite:///absolute/path.db, an absolute path ending in .db, .sqlite or .sqlite3, "
        "or postgresql://…",
        f"{field}.connection_string",
    )


def databases(tool_context: Any) -> list[DatabaseSpec]:
    """The request's sql_database artifacts, in order; errors.Invalid for a malformed one."""
    found: list[DatabaseSpec] = []
    for field, item in artifacts(tool_context):
        if isinstance(item, dict) and item.get("type") == "sql_database":
            if len(found) >= MAX_DATABASES:
                raise Invalid(f"at most {MAX_DATABASES} sql_database artifacts are allowed", field)
            found.append(_parse(field, item))
    return found


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """Every sql_database artifact must be well formed and allowed by `tools.database_query.allow`: else 422."""
    found = databases(chat.tool_context)
    if not found:
        raise Invalid(
            f'{TYPE} needs a {{"type": "sql_database", "connection_string"}} artifact in tool_context', "tool_context"
        )
    allow = settings.tools.database_query.allow
    for spec in found:
        if not any(fnmatch.fnmatchcase(spec.connection_string, pattern) for pattern in allow):
            raise Invalid(
                f"connection string {spec.shown!r} is not allowed on this server (tools.database_query.allow)",
                f"{spec.field}.connection_string",
            )


def _first_keyword(sql: str) -> str:
    """The statement's first word, past whitespace, comments and parentheses ("" if none). A scan, not a
    regex over comments: linear whatever the input."""
    i, n = 0, len(sql)
    while i < n:
        if sql[i].isspace() or sql[i] == "(":
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            break
    match = _WORD.match(sql, i)
    return match.group(0).lower() if match else ""


# --- results as text -----------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """What orjson cannot write itself: bytes as a short hex preview, the rest (Decimal, intervals…) as text."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return f"\\x{data[:32].hex()}" + (f"… ({len(data)} bytes)" if len(data) > 32 else "")
    return str(value)


def _line(values: Any) -> str:
    try:
        return orjson.dumps(list(values), default=_cell).decode()
    except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits
        return orjson.dumps([v if isinstance(v, str | float | bool | None) else _cell(v) for v in values]).decode()


def render(columns: list[str], rows: list[Any], more: bool, settings: DatabaseQuerySettings) -> tuple[str, int, bool]:
    """(text, rows shown, cut?): columns, then one JSON array per row, and a note when rows or bytes were
    cut (the model must know its answer is partial)."""
    budget = settings.max_bytes - 200  # room for the closing note
    lines = ["columns: " + _line(columns)]
    used = len(lines[0].encode()) + 1
    for shown, row in enumerate(rows[: settings.max_rows]):
        line = _line(row)
        size = len(line.encode()) + 1
        if used + size > budget:
            if shown == 0:  # one huge row: its start rather than nothing
                lines.append(line.encode()[: max(0, budget - used)].decode(errors="ignore"))
            lines.append(
                f"[result cut at max_bytes ({settings.max_bytes} bytes) after {shown} rows; "
                "select fewer columns or rows]"
            )
            return "\n".join(lines), shown, True
        lines.append(line)
        used += size
    shown = min(len(rows), settings.max_rows)
    if more:
        lines.append(f"[only the first {shown} rows are shown (max_rows); add LIMIT, WHERE or aggregates]")
    else:
        lines.append(f"({shown} row{'' if shown == 1 else 's'})")
    return "\n".join(lines), shown, more


Schema = tuple[list[tuple[str, str, str]], bool]  # (table, column, type) triples, and whether there were more


def _schema_text(schema: Schema, limit: int) -> str:
    """`table: column type, …` lines, within `limit` characters."""
    columns, truncated = schema
    tables: dict[str, list[str]] = {}
    for table, column, kind in columns:
        tables.setdefault(table, []).append(f"{column} {kind}".strip())
    lines: list[str] = []
    used = 0
    for table, cols in tables.items():
        line = f"  {table}: {', '.join(cols)}"
        if used + len(line) > limit:
            truncated = True
            break
        lines.append(line)
        used += len(line) + 1
    if not lines:
        lines.append("  (no tables visible)")
    if truncated:
        lines.append("  … more tables not listed: query the catalog (sqlite_master / information_schema) for them")
    return "\n".join(lines)


# --- SQLite --------------------------------------------------------------------------------------------------

# What a read needs: SELECT, reading columns, functions, recursive CTEs; the pragma table-valued functions
# (pragma_table_info…) read the schema table. Everything else (writes, ATTACH, PRAGMA settings) is denied.
_SQLITE_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_SQLITE_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_SQLITE_SCHEMA = (
    "SELECT m.name, p.name, p.type FROM sqlite_master m JOIN pragma_table_info(m.name) p "
    "WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.cid LIMIT ?"
)


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in _SQLITE_ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _SQLITE_READ_PRAGMAS:  # arg2 is their table, not a value
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 in ("sqlite_master", "sqlite_schema"):
        return sqlite3.SQLITE_OK  # how SQLite reports the pragma functions' schema reads (the file is read-only)
    return sqlite3.SQLITE_DENY


class SqliteDatabase:
    """One SQLite file, read-only, used from worker threads one query at a time."""

    def __init__(self, spec: DatabaseSpec, settings: DatabaseQuerySettings) -> None:
        self.spec = spec
        self.settings = settings
        self.conn: sqlite3.Connection | None = None
        self.deadline = 0.0
        self.lock = threading.Lock()  # a thread left running by a cancelled call still owns the connection

    async def open(self) -> Schema:
        return await asyncio.to_thread(self._open)

    def _open(self) -> Schema:
        assert self.spec.path is not None
        uri = f"file:{quote(self.spec.path)}?mode=ro"  # quoted: the path cannot add URI parameters
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=self.settings.timeout_s
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(16 * 1024 * 1024, self.settings.max_bytes))
            conn.set_authorizer(_authorize)
            conn.set_progress_handler(self._past_deadline, 1000)
            self.conn = conn
            _, rows, more = self._fetch(_SQLITE_SCHEMA, MAX_SCHEMA_COLUMNS, (MAX_SCHEMA_COLUMNS + 1,))
        except BaseException:
            self.conn = None
            conn.close()
            raise
        return [(t, c, k) for t, c, k in rows], more

    def _past_deadline(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0  # non-zero interrupts the statement

    def _fetch(self, sql: str, max_rows: int, params: tuple[Any, ...] = ()) -> tuple[list[str], list[Any], bool]:
        with self.lock:
            assert self.conn is not None
            self.deadline = time.monotonic() + self.settings.timeout_s
            cursor = self.conn.execute(sql, params)
            try:
                rows = cursor.fetchmany(max_rows + 1)
                columns = [d[0] for d in cursor.description or ()]
            finally:
                cursor.close()
        return columns, rows[:max_rows], len(rows) > max_rows

    async def query(self, sql: str) -> tuple[list[str], list[Any], bool]:
        try:
            return await asyncio.to_thread(self._fetch, sql, self.settings.max_rows)
        except sqlite3.Error as exc:
            message = str(exc)
            if message == "interrupted":
                raise QueryRefused(
                    f"the query was stopped at the statement timeout ({self.settings.timeout_s:g} s)"
                ) from None
            if message == "not authorized" or "readonly" in message or "read-only" in message:
                raise QueryRefused(f"refused: the database is read-only and only reads may run ({message})") from None
            raise QueryRefused(f"query failed: {message}") from None

    async def aclose(self) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.interrupt()  # a running statement stops now (thread-safe), then the lock is free

        def close() -> None:
            with self.lock:
                conn.close()

        await asyncio.to_thread(close)
        self.conn = None


# --- PostgreSQL ----------------------------------------------------------------------------------------------

_POSTGRES_SCHEMA = (
    "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_schema NOT LIKE 'pg\\_%%' "
    "ORDER BY table_schema, table_name, ordinal_position LIMIT %s"
)


class PostgresDatabase:
    """One PostgreSQL connection for the run: each query in a read-only transaction, then rolled back."""

    def __init__(self, spec: DatabaseSpec, settings: DatabaseQuerySettings) -> None:
        self.spec = spec
        self.settings = settings
        self.conn: Any = None  # psycopg.AsyncConnection, imported lazily

    async def open(self) -> Schema:
        import psycopg

        timeout_ms = max(1, int(self.settings.timeout_s * 1000))
        connect_s = max(MIN_CONNECT_S, self.settings.timeout_s)
        async with asyncio.timeout(connect_s):
            self.conn = await psycopg.AsyncConnection.connect(
                self.spec.connection_string,
                autocommit=False,
                connect_timeout=max(1, int(connect_s)),
                # The session is read-only and time-limited from its first packet, whatever a query does.
                options=f"-c default_transaction_read_only=on -c statement_timeout={timeout_ms}",
            )
            await self.conn.set_read_only(True)  # and every transaction says so itself
            try:
                async with self.conn.cursor() as cursor:
                    await cursor.execute(_POSTGRES_SCHEMA, (MAX_SCHEMA_COLUMNS + 1,))
                    rows = await cursor.fetchall()
            finally:
                await self.conn.rollback()
        columns = [(t if s == "public" else f"{s}.{t}", c, k) for s, t, c, k in rows[:MAX_SCHEMA_COLUMNS]]
        return columns, len(rows) > MAX_SCHEMA_COLUMNS

    async def query(self, sql: str) -> tuple[list[str], list[Any], bool]:
        import psycopg

        max_rows = self.settings.max_rows
        try:
            # A server-side cursor: only max_rows + 1 rows ever leave the server. EXPLAIN cannot be one
            # (its output is a plan, small).
            named = _first_keyword(sql) != "explain"
            async with self.conn.cursor(name="backstream_query") if named else self.conn.cursor() as cursor:
                await cursor.execute(sql)
                rows = await cursor.fetchmany(max_rows + 1)
                columns = [d.name for d in cursor.description or ()]
        except psycopg.errors.QueryCanceled:
            raise QueryRefused(
                f"the query was stopped at the statement timeout ({self.settings.timeout_s:g} s)"
            ) from None
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            raise QueryRefused(
                f"refused: the database is read-only and only reads may run ({_pg_message(exc)})"
            ) from None
        except psycopg.Error as exc:
            message = _pg_message(exc)
            if "data-modifying" in message:  # WITH … DELETE: DECLARE CURSOR refuses it
                raise QueryRefused(f"refused: the database is read-only and only reads may run ({message})") from None
            raise QueryRefused(f"query failed: {message}") from None
        finally:
            await self._rollback()
        return columns, rows[:max_rows], len(rows) > max_rows

    async def _rollback(self) -> None:
        import psycopg

        try:
            await self.conn.rollback()  # nothing a query did survives it (SET included)
        except psycopg.Error:
            pass  # a broken connection: the next query says so

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def _pg_message(exc: Exception) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return primary or str(exc).strip().splitlines()[0]


def _setup_reason(exc: Exception, spec: DatabaseSpec) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    return spec.scrub(_pg_message(exc) if spec.kind == "postgresql" else str(exc)) or type(exc).__name__


# --- the tool ------------------------------------------------------------------------------------------------


class DatabaseQuery:
    """database_query_v1: connects to each sql_database artifact at start and tells the model their tables."""

    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "one read-only SQL statement"},
            "database": {"type": "integer", "minimum": 0, "description": "which database (default 0)"},
        },
        "required": ["query"],
        "additionalProperties": False,
    }

    def __init__(self) -> None:
        self.description = DESCRIPTION
        self.databases: list[SqliteDatabase | PostgresDatabase] = []

    async def start(self, env: ToolEnv) -> None:
        settings = env.settings.database_query
        specs = databases(env.request.tool_context)
        summaries: list[str] = []
        for i, spec in enumerate(specs):
            db: SqliteDatabase | PostgresDatabase = (
                SqliteDatabase(spec, settings) if spec.kind == "sqlite" else PostgresDatabase(spec, settings)
            )
            self.databases.append(db)
            try:
                schema = await db.open()
            except Exception as exc:  # no password in the message: it ends the run and reaches the logs
                raise ToolSetupError(
                    f"{TYPE}: cannot open database {i} ({spec.shown}): {_setup_reason(exc, spec)}"
                ) from None
            kind = "SQLite" if spec.kind == "sqlite" else "PostgreSQL"
            about = f" — {spec.description}" if spec.description else ""
            summaries.append(
                f"database {i} ({kind}, {spec.shown}){about}\n{_schema_text(schema, MAX_SCHEMA_CHARS // len(specs))}"
            )
        self.description += "\n\nDatabases and their tables (name: column type, …):\n" + "\n".join(summaries)

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        sql, index = arguments.get("query"), arguments.get("database", 0)
        if not isinstance(sql, str) or not sql.strip() or len(sql) > MAX_QUERY_CHARS:
            return ToolOutcome(f"query must be one SQL statement of at most {MAX_QUERY_CHARS} characters", True)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.databases):
            return ToolOutcome(f"database must be an index from 0 to {len(self.databases) - 1}", True)
        keyword = _first_keyword(sql)
        if keyword not in READ_KEYWORDS:
            return ToolOutcome(
                f"refused: the database is read-only; only SELECT, WITH, VALUES, TABLE and EXPLAIN queries run "
                f"(this one starts with {keyword.upper() or 'nothing recognisable'})",
                True,
            )
        db = self.databases[index]
        try:
            columns, rows, more = await db.query(sql)
        except QueryRefused as exc:
            return ToolOutcome(db.spec.scrub(str(exc)), True)
        text, shown, cut = render(columns, rows, more, env.settings.database_query)
        return ToolOutcome(db.spec.scrub(text), extra={"database": {"index": index, "rows": shown, "truncated": cut}})

    async def aclose(self) -> None:
        for db in self.databases:
            try:
                await db.aclose()
            except Exception:
                pass  # closing a broken connection: nothing left to release
        self.databases = []


TOOLS = {TYPE: DatabaseQuery}
