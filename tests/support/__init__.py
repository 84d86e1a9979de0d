"""Test support shared by tests/ and bench/: server processes, SSE parsing, run helpers, the fake upstream.

server       ServerProcess (`backstream serve` as a subprocess), free_port, fake_models, REDIS_URL, LOG_DIR, SECRETS
sse          parse_sse and friends (frames of a complete or partial SSE body)
runs         background-run helpers: start, watch, watch_first, wait_status, wait_events, check_run, Watcher
replicas     server configs for replicas on Redis and for the SQLite store (faults, replicas, bench/faults.py)
own_redis    a redis-server of a test's own, to kill and restart
logs         the end-of-session check that no server log holds a registered credential
mcp_server   a real MCP server (the official SDK) on loopback
tls          a self-signed certificate and the contexts that trust it
fake_upstream  the scriptable OpenAI/Anthropic upstream (also `python -m tests.support.fake_upstream`)
"""
