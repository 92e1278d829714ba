"""The instance protocol's framing and the output attribution, without processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from nimbus.executor.output import OutputReader
from nimbus.executor.protocol import (
    HEADER,
    INVOKE,
    RESULT,
    SENTINEL_PREFIX,
    decode_frames,
    encode_frame,
)


def test_frames_round_trip_and_split_anywhere() -> None:
    rid = uuid.uuid4().bytes
    wire = (
        encode_frame(INVOKE, rid, 12.5, 0, b'{"a": 1}')
        + encode_frame(RESULT, rid, 0.25, 2048, b"")
        + encode_frame(RESULT, rid, 1.0, 7, b"x" * 70000)
    )
    for cut in (1, 7, HEADER.size, HEADER.size + 3, 100, len(wire) - 1):
        buf = bytearray(wire[:cut])
        frames = decode_frames(buf)
        buf += wire[cut:]
        frames += decode_frames(buf)
        assert not buf
        assert [(f.kind, f.request_id, f.seconds, f.number, len(f.body)) for f in frames] == [
            (INVOKE, rid, 12.5, 0, 8),
            (RESULT, rid, 0.25, 2048, 0),
            (RESULT, rid, 1.0, 7, 70000),
        ]
        assert frames[0].body == b'{"a": 1}'


def test_partial_header_is_kept() -> None:
    buf = bytearray(b"\x00\x00")
    assert decode_frames(buf) == [] and buf == b"\x00\x00"


def _reader(max_bytes: int = 1 << 20) -> tuple[OutputReader, list[tuple[str, str]], bytes]:
    lines: list[tuple[str, str]] = []
    token = b"tok"
    reader = OutputReader(
        lambda rid, msg, platform=False: lines.append((rid, msg)), token, max_bytes
    )
    return reader, lines, SENTINEL_PREFIX + token + b"\n"


def test_output_is_attributed_to_invocations_by_sentinel() -> None:
    async def run() -> None:
        reader, lines, end = _reader()
        init = reader.open("")
        a = reader.open("A")
        reader.data_received(b"init says hi\n" + end + b"a1\na2 partial")
        assert init.done.done() and not a.done.done()
        reader.finish(a, ["END A"])  # the result came before the sentinel
        assert ("A", "END A") not in lines
        reader.data_received(b" line" + end[:4])
        reader.data_received(end[4:])
        assert a.done.done()
        b = reader.open("B")
        reader.data_received(b"b1\n" + end)
        reader.finish(b, ["END B"])  # the sentinel came first: emitted at once
        assert lines == [
            ("", "init says hi"),
            ("A", "a1"),
            ("A", "a2 partial line"),
            ("A", "END A"),
            ("B", "b1"),
            ("B", "END B"),
        ]

    asyncio.run(run())


def test_output_over_the_cap_is_truncated_with_a_marker() -> None:
    async def run() -> None:
        reader, lines, end = _reader(max_bytes=10)
        reader.open("A")
        reader.data_received(b"12345\n6789012345\nmore\n" + end)
        assert lines[0] == ("A", "12345")
        assert "truncated" in lines[1][1]
        assert len(lines) == 2

    asyncio.run(run())


def test_eof_flushes_pending_output_and_trailers() -> None:
    async def run() -> None:
        reader, lines, _ = _reader()
        a = reader.open("A")
        reader.data_received(b"last words")
        reader.finish(a, ["END A"])
        reader.connection_lost(None)
        assert lines == [("A", "last words"), ("A", "END A")]
        assert reader.closed.done()

    asyncio.run(run())


def test_an_oversized_reply_is_skipped_not_buffered() -> None:
    async def run() -> None:
        from nimbus.executor.protocol import ERROR, Channel

        ch = Channel(max_frame=100)
        reply = ch.next_frame()
        rid = uuid.uuid4().bytes
        wire = encode_frame(RESULT, rid, 0.5, 7, b"x" * 1000)
        for i in range(0, len(wire), 64):  # arrives in pieces
            ch.data_received(wire[i : i + 64])
            assert len(ch._buffer) < 200
        frame = await reply
        assert frame.kind == ERROR and b"Function.ResponseSizeTooLarge" in frame.body
        assert b"(1000 bytes)" in frame.body
        # The stream stays in step: the next frame is read normally.
        nxt = ch.next_frame()
        ch.data_received(encode_frame(RESULT, rid, 0.1, 1, b"ok"))
        assert (await nxt).body == b"ok"

    asyncio.run(run())


def test_unrequested_frames_close_the_channel() -> None:
    async def run() -> None:
        from nimbus.executor.protocol import Channel

        class Transport:
            closed = False

            def close(self) -> None:
                self.closed = True

        ch = Channel()
        t = Transport()
        ch.connection_made(t)  # type: ignore[arg-type]
        for _ in range(Channel.MAX_EARLY + 1):
            ch.data_received(encode_frame(RESULT, bytes(16), 0, 0, b"spam"))
        assert t.closed

    asyncio.run(run())


def test_output_outside_invocations_is_capped() -> None:
    async def run() -> None:
        from nimbus.executor.output import ORPHAN_MAX

        reader, lines, _ = _reader()
        chunk = b"y" * 1000 + b"\n"
        for _ in range(ORPHAN_MAX // len(chunk) + 10):
            reader.data_received(chunk)
        assert len(lines) <= ORPHAN_MAX // len(chunk) + 2
        assert "outside any invocation" in lines[-1][1]

    asyncio.run(run())


def test_a_cancelled_invocation_kills_its_instance() -> None:
    async def run() -> None:
        from nimbus.executor.instance import Instance, State
        from nimbus.executor.protocol import Channel
        from nimbus.models import FunctionSpec, Version

        class Proc:
            pid = 1
            returncode = None
            killed = False

            def kill(self) -> None:
                self.killed = True

        class Transport:
            def writelines(self, data: object) -> None:
                pass

            def close(self) -> None:
                pass

        ch = Channel()
        ch.connection_made(Transport())  # type: ignore[arg-type]
        reader, _, _ = _reader()
        proc = Proc()
        version = Version(FunctionSpec(name="f"), 1, "0" * 64, None, 0.0)
        inst = Instance("i", version, proc, ch, reader, lambda r, m, platform=False: None, 1.0)  # type: ignore[arg-type]
        task = asyncio.create_task(inst.invoke("r", bytes(16), b"{}"))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert proc.killed and inst.state is State.DEAD

    asyncio.run(run())
