"""Event ids and SSE framing (events.py)."""

from __future__ import annotations

import time

import orjson

from backstream.events import Event, _crockford, _UlidClock, new_event_id, sse_frame

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def decode_ulid(ulid: str) -> int:
    value = 0
    for ch in ulid:
        value = value * 32 + CROCKFORD.index(ch)
    return value


def test_event_ids_are_time_ordered_ulids() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert all(i.startswith("evt_") and len(i) == 30 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for i in (ids[0], ids[-1]):
        ms = decode_ulid(i[4:]) >> 80
        assert before <= ms <= after


def test_ulids_count_up_across_the_low_bits_carry() -> None:
    """Within a millisecond the random field counts up; past its cached low 20 bits the head changes too."""
    clock = _UlidClock()
    first = clock.next()
    clock._low = (1 << 20) - 2  # two ids before the carry (same millisecond: _last_ms stays ahead)
    clock._last_ms += 10_000  # stay in "the same millisecond" for the whole test
    clock._head = _crockford(clock._last_ms, 10) + _crockford(clock._high, 12)
    ids = [clock.next() for _ in range(4)]
    values = [decode_ulid(i) for i in ids]
    assert values == [values[0] + k for k in range(4)], "consecutive 128-bit values through the carry"
    assert ids[0][:22] != ids[1][:22] and ids == sorted(ids) and first < ids[0]


def test_frame_is_one_event_with_one_data_line() -> None:
    e = Event.build(7, "text_delta", "msg_1", delta="a\n\ndata: injected\r\nid: 9")
    frame = e.frame_bytes()
    assert frame.startswith(b"id: 7\nevent: text_delta\ndata: {") and frame.endswith(b"}\n\n")
    assert frame.count(b"\n") == 4, "newlines inside the data are escaped"
    assert orjson.loads(frame.split(b"data: ", 1)[1])["delta"] == "a\n\ndata: injected\r\nid: 9"
    assert e.frame_bytes() is frame, "built once, shared"
    assert sse_frame(1, "x", b"{}") == b"id: 1\nevent: x\ndata: {}\n\n"
