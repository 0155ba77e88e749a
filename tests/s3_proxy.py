"""A TCP proxy on 127.0.0.1 in front of the test S3 server that loses conditional writes, the way a network does.

- `lose_answers = N`: the next N create-only or compare-and-swap PUTs (`If-None-Match` / `If-Match`) reach
  the server, which writes them, and their answers are dropped with the connection: the client retries a
  write that has landed.
- `lose_requests = N`: the next N such PUTs are dropped, with the connection, before the server sees them.
- `lose_every_first = True`: every other such PUT's answer is lost, so each write's first attempt lands
  unanswered and its retry meets it.
- `down = True`: the store is gone (stopped, its host lost): every connection is dropped, open or new,
  until it is set back to False. `down_after_puts = N`: it goes down at the (N+1)th PUT from now, which
  never reaches it (the store stopped in the middle of an upload).
- `ignore_conditions = True`: such PUTs lose their condition on the way and land unconditionally, as on a
  store that ignores `If-None-Match` / `If-Match` (the server must not check signatures: the headers were
  signed).

Requests carry a Content-Length (botocore does not pipeline), so the proxy knows where each one ends, and
the answer read after a conditional PUT's headers is that PUT's (after any `100 Continue`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

_HEAD_END = b"\r\n\r\n"


@dataclass
class LossyProxy:
    upstream: tuple[str, int]
    listener: socket.socket
    lose_answers: int = 0
    lose_requests: int = 0
    lose_every_first: bool = False
    ignore_conditions: bool = False
    down: bool = False
    down_after_puts: int | None = None
    answers_lost: int = 0
    requests_lost: int = 0
    conditional_puts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _take(self, kind: str) -> bool:
        with self._lock:
            if kind == "answers" and self.lose_every_first and self.conditional_puts % 2 == 1:
                self.answers_lost += 1
                return True
            if getattr(self, f"lose_{kind}") > 0:
                setattr(self, f"lose_{kind}", getattr(self, f"lose_{kind}") - 1)
                setattr(self, f"{kind}_lost", getattr(self, f"{kind}_lost") + 1)
                return True
        return False

    def _goes_down(self, head: bytes) -> bool:
        with self._lock:
            if head.startswith(b"PUT ") and self.down_after_puts is not None:
                if self.down_after_puts == 0:
                    self.down, self.down_after_puts = True, None
                else:
                    self.down_after_puts -= 1
            return self.down

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        if self.down:
            _close(client)
            return
        upstream = socket.create_connection(self.upstream, timeout=30)
        lose_answer = threading.Event()
        threading.Thread(target=self._answers, args=(upstream, client, lose_answer), daemon=True).start()
        buffer = b""
        try:
            while True:
                while _HEAD_END not in buffer:
                    data = client.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(_HEAD_END, 1)
                if self._goes_down(head):
                    return  # the connection drops with the store
                conditional = head.startswith(b"PUT ") and any(
                    line.lower().startswith((b"if-none-match:", b"if-match:")) for line in head.split(b"\r\n")
                )
                if conditional:
                    with self._lock:
                        self.conditional_puts += 1
                if conditional and self._take("requests"):
                    return  # never forwarded: the connection drops
                if conditional and self._take("answers"):
                    lose_answer.set()
                if conditional and self.ignore_conditions:
                    head = b"\r\n".join(
                        line
                        for line in head.split(b"\r\n")
                        if not line.lower().startswith((b"if-none-match:", b"if-match:"))
                    )
                upstream.sendall(head + _HEAD_END)
                remaining = _content_length(head)
                while remaining > 0:  # the body, as it comes (after a 100 Continue, with Expect)
                    if not buffer:
                        buffer = client.recv(65536)
                        if not buffer:
                            return
                    part, buffer = buffer[:remaining], buffer[remaining:]
                    upstream.sendall(part)
                    remaining -= len(part)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, lose_answer: threading.Event) -> None:
        """Forward the server's answers; when told, read the next final answer whole and drop it, and the connection."""
        buffer = b""
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    return
                if not lose_answer.is_set():
                    client.sendall(data)
                    continue
                buffer += data
                while _HEAD_END in buffer:
                    head, rest = buffer.split(_HEAD_END, 1)
                    if head.split(b" ", 2)[1].startswith(b"1"):  # 100 Continue: the body may come
                        client.sendall(head + _HEAD_END)
                        buffer = rest
                        continue
                    while len(rest) < _content_length(head):
                        rest += upstream.recv(65536)
                    return  # the server has written it; the client never hears so
        except OSError:
            pass
        finally:
            _close(client, upstream)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@contextmanager
def lossy_proxy(endpoint: str) -> Iterator[LossyProxy]:
    """A proxy in front of the S3 server at `endpoint`, on a free loopback port, stopped at the end."""
    host, port = endpoint.removeprefix("http://").split(":")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    proxy = LossyProxy((host, int(port)), listener)
    threading.Thread(target=proxy.serve, daemon=True).start()
    try:
        yield proxy
    finally:
        listener.close()
