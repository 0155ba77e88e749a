"""What keeps one client from locking the others out: deadlines on connections and bodies, and a
budget on the bytes of bodies the server holds at once.

uvicorn times out a connection only between requests (its keep-alive); a connection that never sends
a complete request head, or that drips a body, is held for ever, and 256 such were enough to refuse
every other client. `GuardedH11Protocol` gives each request head `header_s` from its first byte (or
from the connection's opening), closes a connection whose client had not finished its request when
the answer went out (uvicorn would otherwise keep reading what it drips), and at the connection limit
closes the longest-open connections that are waiting for a request, to make room. The body deadline and
the byte budget are kept by `read_body`, which every handler reads its body through.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fmnist.serving.errors import Busy, TooLarge, TooSlow


def guarded_protocol(header_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with a deadline on each request head (uvicorn's `http=` takes the class)."""

    class GuardedH11Protocol(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None
        opened_at = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.opened_at = self.loop.time()
            self._arm()
            if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
                self._make_room()

        def _waiting(self) -> bool:
            """No request in progress: between requests, or its head not in yet."""
            return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

        def _make_room(self) -> None:
            """At the connection limit, close the longest-open connections that are waiting for a request
            head, so that connections opened and left silent cannot refuse everyone else."""
            waiting = sorted((c for c in self.connections if c is not self and c._waiting()), key=lambda c: c.opened_at)
            for connection in waiting[: len(self.connections) - self.limit_concurrency + 1]:
                connection._close_with_408("the server is at its connection limit and this one sent no request")
                self.connections.discard(connection)

        def _arm(self) -> None:
            self._disarm()
            self.header_deadline = self.loop.call_later(header_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def _head_too_slow(self) -> None:
            self.header_deadline = None
            self._close_with_408(f"no complete request head within {header_s:g} s")

        def _close_with_408(self, why: str) -> None:
            if not self.transport.is_closing():
                body = json.dumps({"error": f"{why}; the connection is closed"}).encode()
                head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                self.transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and self.header_deadline is None:
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # its head is in; the body has its own deadline

        def on_response_complete(self) -> None:
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and not self.transport.is_closing():
                # Answered before its body was in (a 408, a 413): what the client still sends is not read.
                self.server_state.total_requests += 1
                self.transport.close()
                return
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class BodyBudget:
    """The bytes of request bodies the server holds at once, across requests."""

    def __init__(self, limit: int, on_change=None) -> None:
        self.limit = limit
        self.held = 0
        self.on_change = on_change  # called with the bytes held after each change

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise Busy(
                f"the server holds {self.held:,} bytes of request bodies, near its budget of {self.limit:,}; "
                "try again shortly"
            )
        self._set(self.held + size)

    def give(self, size: int) -> None:
        self._set(self.held - size)

    def _set(self, held: int) -> None:
        self.held = held
        if self.on_change:
            self.on_change(held)


async def read_body(receive, headers, limit: int, budget: BodyBudget, deadline_s: float, held: list[int]) -> bytes:
    """A request's body, refused as soon as it passes `limit` bytes (413), takes longer than
    `deadline_s` (408) or would take the server past its budget (429). Each byte read is taken from
    `budget`, and added to `held[0]`, which the caller gives back when the request is answered."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {int(declared):,} bytes; at most {limit:,} are accepted")
    if declared.isdigit():
        budget.take(int(declared))  # all of it up front: a held upload cannot grow past the budget
        held[0] += int(declared)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise TooSlow("the client went away before its body was in")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the body is over {limit:,} bytes, the most accepted")
                if size > held[0]:
                    budget.take(size - held[0])
                    held[0] = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise TooSlow(f"the body was not in within {deadline_s:g} s ({size:,} bytes came)") from None
    return b"".join(chunks)
