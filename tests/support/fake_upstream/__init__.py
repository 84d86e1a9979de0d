"""A scriptable fake LLM upstream speaking the OpenAI and Anthropic streaming wire formats.

It is a real HTTP/1.1 server on raw asyncio streams (requests parsed by httptools, no web
framework) so that tests control exactly what goes on the wire: token pacing, malformed
events, dropped connections, and detection of the client closing the socket mid-response.

Thread mode (tests)::

    with FakeUpstream() as fake:
        fake.script("model-x", [Reply(status=429), Reply(tokens=["a", "b"])])
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        ...

Standalone mode (benchmarks)::

    python -m tests.support.fake_upstream --port 0     # prints "READY http://127.0.0.1:PORT"

With no scripts, a model name that is a spec string such as
``"tokens=64;ttft_ms=20;delay_ms=5"`` is served per that spec (keys: tokens, ttft_ms,
delay_ms, status; also reasoning, fault, fault_after, finish). Anything else gets the
default ``Reply()``. How ``Fault.*`` and ``fault_after`` count chunks: see produce.py.

Modules: script (Reply, Fault, ToolCall, Recorded, spec strings), wire (HTTP/1.1 response
bytes), conn (a connection and its request parser), openai and anthropic (the two wire
formats), produce (pacing and faults), server (FakeUpstream), __main__ (standalone).
"""

from .script import Fault, Recorded, Reply, ToolCall
from .server import FakeUpstream

__all__ = ["FakeUpstream", "Reply", "Fault", "ToolCall", "Recorded"]
