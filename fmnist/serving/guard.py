"""What keeps one client from locking the others out: deadlines on connections and bodies, and one
budget on the bytes of bodies the server holds at once, for REST and gRPC alike.

uvicorn times out a connection only between requests (its keep-alive); a connection that never sends
a complete request head, or that drips a body, is held for ever, and 256 such were enough to refuse
every other client. `GuardedH11Protocol` gives each request head `header_s` from its first byte (or
from the connection's opening), closes a connection whose client had not finished its request when
the answer went out (uvicorn would otherwise keep reading what it drips), and at the connection limit
closes the connections that have waited longest on their clients (silent, or holding a body) to make
room. The body deadline is kept by `read_body`, which every REST handler reads its body through, and
the byte budget by `BodyBudget`: bytes are counted as they arrive, and a request still waiting on its
client gives its place to one that sends.
"""

from __future__ import annotations

import asyncio
import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fmnist.serving.errors import Busy, TooLarge, TooSlow


def guarded_protocol(header_s: float, send_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the server's guards (uvicorn's `http=` takes the class): a deadline on
    each request head and on each answer's delivery, and room made at `max_connections`."""

    class GuardedH11Protocol(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None
        write_deadline: asyncio.TimerHandle | None = None
        waiting_since = 0.0  # since the connection opened, or since its last request began
        heard = False  # bytes of a request have come since the last answer (or the opening)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.waiting_since = self.loop.time()
            self._arm()
            if len(self.connections) > max_connections:
                self._make_room()

        def _waiting_on_client(self) -> bool:
            """Waiting for its client: between requests, its head not in yet, its body still arriving with no
            answer begun, or an answer it does not read."""
            if self.transport.is_closing():
                return False
            if self.cycle is None or self.cycle.response_complete or self.flow.write_paused:
                return True
            return not self.cycle.response_started and self.conn.their_state == h11.SEND_BODY

        def _make_room(self) -> None:
            """Past the connection limit, close the connections that have waited longest on their clients
            (silent, a head dripped, a body held, an answer unread), so that such connections cannot refuse
            everyone else."""
            waiting = sorted(
                (c for c in self.connections if c is not self and c._waiting_on_client()), key=lambda c: c.waiting_since
            )
            for connection in waiting[: len(self.connections) - max_connections]:
                connection._close_to_make_room()
                self.connections.discard(connection)

        def _close_to_make_room(self) -> None:
            if self.heard or not (self.cycle is None or self.cycle.response_complete):
                self._close_with_408("the server is at its connection limit and this one kept it waiting")
            else:
                # An idle keep-alive connection is closed without a word, as HTTP allows: a 408 on it would be
                # taken for the answer to the next request its client (the edge, say) sends on it.
                self.transport.close()

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
            self._close_with(b"408 Request Timeout", f"{why}; the connection is closed")

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot read: a 400 in the server's error form (uvicorn's is plain text)."""
            self._close_with(b"400 Bad Request", f"Malformed request: {msg[:200]}")

        def _close_with(self, status: bytes, message: str) -> None:
            """Answer `status` with an `{"error": message}` body, outside h11's state, and close."""
            if not self.transport.is_closing():
                body = json.dumps({"error": message}).encode()
                head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % status
                self.transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and self.header_deadline is None:
                self._arm()
            self.heard = True
            super().data_received(data)
            if between_requests and self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # its head is in; the body has its own deadline
                self.waiting_since = self.loop.time()

        def pause_writing(self) -> None:
            """The client does not read its answer: it has `send_s` to make room for the rest."""
            super().pause_writing()
            if self.write_deadline is None:
                self.write_deadline = self.loop.call_later(send_s, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_deadline is not None:
                self.write_deadline.cancel()
                self.write_deadline = None

        def on_response_complete(self) -> None:
            self.heard = False
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and not self.transport.is_closing():
                # Answered before its body was in (a 408, a 413): what the client still sends is not read.
                self.server_state.total_requests += 1
                self.transport.close()
                return
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self.write_deadline is not None:
                self.write_deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class ConcurrencyLimit:
    """At most `limit` requests answered at once; beyond, a 503 in the server's error form at once (uvicorn's
    own limit answered plain text, and counted idle connections too)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit
        self.answering = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.answering >= self.limit:
            body = json.dumps({"error": f"the server is answering {self.limit} requests, its most; try again"})
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            return await send({"type": "http.response.body", "body": body.encode()})
        self.answering += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.answering -= 1


class Claim:
    """One request's share of the byte budget: the bytes of its body that have arrived. While its body is
    still arriving the request waits on its client, and may be cut off to make room for another."""

    def __init__(self, budget: BodyBudget, client: str) -> None:
        self.budget = budget
        self.client = client  # the address it came from (behind the edge, the one the edge forwards)
        self.bytes = 0
        self.arriving = True
        self.since = time.monotonic()
        self.task = asyncio.current_task()
        self.cut_off: str | None = None  # why it was cut off to make room, once it was

    def take(self, size: int) -> None:
        self.budget.take(self, size)

    def arrived(self) -> None:
        """Its body is in: it is being answered, and is no longer cut off to make room."""
        self.arriving = False
        self.budget.awaiting.pop(self, None)

    def raise_if_cut_off(self) -> None:
        """Turn the cancellation `BodyBudget` used to cut this claim's request off into a 408 or a
        DEADLINE_EXCEEDED (called from the request's own task, in its `except CancelledError`)."""
        if self.cut_off is None:
            return
        if self.task is not None:
            self.task.uncancel()
        raise TooSlow(self.cut_off)

    def __enter__(self) -> Claim:
        self.budget.claims.add(self)
        return self

    def __exit__(self, *exc) -> None:
        self.budget.release(self)


class BodyBudget:
    """The bytes of request bodies the server holds at once, across requests and protocols, counted as
    they arrive (a declared Content-Length or message size takes nothing).

    When a request's next bytes would pass the budget, the requests still waiting on their clients are cut
    off to make room: the longest waiting of the address that holds the most. A client that holds bodies
    almost complete, or drips them, loses its place to the one that sends, and a flood from one address
    cannot cut off another's single request. Only when every byte held belongs to a body already in (real
    load) is the request refused (429)."""

    def __init__(self, limit: int, largest_message: int, on_change=None) -> None:
        self.limit = limit
        self.held = 0
        self.on_change = on_change  # called with the bytes held after each change
        self.claims: set[Claim] = set()
        # gRPC core holds a call's message until it is whole, where the budget cannot count it: so at most
        # this many calls wait for their message at once. Each holds up to the largest message accepted, in
        # pieces, then joined, then copied out: up to three times its size (with twice, 40 held calls grew
        # the process by 83 MiB against a 40 MiB budget).
        self.max_awaiting = max(limit // (3 * largest_message), 1)
        self.awaiting: dict[Claim, None] = {}  # in the order they began waiting

    def claim(self, client: str) -> Claim:
        return Claim(self, client)

    def take(self, claim: Claim, size: int) -> None:
        while self.held + size > self.limit:
            waiting = [c for c in self.claims if c.arriving and c is not claim and c.cut_off is None and c.bytes]
            if not waiting:
                raise Busy(
                    f"the server holds {self.held:,} bytes of request bodies being answered, near its budget of "
                    f"{self.limit:,}; try again shortly"
                )
            victim = heaviest_first(waiting, lambda c: c.bytes)
            self.cut_off(victim, "cut off to make room: the server's byte budget is full")
        claim.bytes += size
        self._set(self.held + size)

    def await_message(self, claim: Claim) -> None:
        """`claim`'s gRPC call waits for its message: beyond `max_awaiting` such calls, the longest waiting
        of the address with the most waiting is cut off."""
        while len(self.awaiting) >= self.max_awaiting:  # (a claim leaves `awaiting` when released or arrived)
            victim = heaviest_first(list(self.awaiting), lambda c: 1)
            self.cut_off(victim, "cut off to make room: too many calls are waiting for their message")
        self.awaiting[claim] = None

    def cut_off(self, claim: Claim, why: str) -> None:
        """Stop waiting for `claim`'s client: its bytes are given back now, its request ends with a 408."""
        claim.cut_off = why
        self.release(claim)
        if claim.task is not None:
            claim.task.cancel()

    def release(self, claim: Claim) -> None:
        self.claims.discard(claim)
        self.awaiting.pop(claim, None)
        if claim.bytes:
            self._set(self.held - claim.bytes)
            claim.bytes = 0

    def _set(self, held: int) -> None:
        self.held = held
        if self.on_change:
            self.on_change(held)


def heaviest_first(claims: list[Claim], weight) -> Claim:
    """The claim to cut off: of the address whose claims weigh most, the one that has waited longest."""
    totals: dict[str, int] = {}
    for claim in claims:
        totals[claim.client] = totals.get(claim.client, 0) + weight(claim)
    heaviest = max(totals.values())
    return min((c for c in claims if totals[c.client] == heaviest), key=lambda c: c.since)


def client_address(peer: str | None, forwarded: str | None) -> str:
    """Who a request comes from: its peer, or behind the edge (a loopback peer) the address the edge forwards."""
    peer = peer or "unknown"
    if forwarded and (peer.startswith("127.") or peer == "::1"):
        return forwarded.split(",")[-1].strip()[:64]
    return peer


async def read_body(receive, headers, limit: int, claim: Claim, deadline_s: float) -> bytes:
    """A request's body, refused as soon as it passes `limit` bytes (413) or takes longer than
    `deadline_s` (408). Each byte is taken from the budget as it arrives (`claim`), never as declared."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {int(declared):,} bytes; at most {limit:,} are accepted")
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
                claim.take(len(chunk))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise TooSlow(f"the body was not in within {deadline_s:g} s ({size:,} bytes came)") from None
    except asyncio.CancelledError:
        claim.raise_if_cut_off()
        raise
    claim.arrived()
    return b"".join(chunks)
