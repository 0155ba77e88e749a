from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist.dataset import DataLayout, DatasetSpec
from tests.helpers import write_mirror


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetSpec]:
    """A local mirror folder with a small generated dataset, and the spec pinning its files."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, write_mirror(folder)


@pytest.fixture
def layout(tmp_path: Path) -> DataLayout:
    return DataLayout(tmp_path / "data")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _StallingHandler(_QuietHandler):
    """Sends the headers and a few bytes, then goes silent: a server that hangs mid-download."""

    stall_s = 5.0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b")
        self.wfile.flush()
        time.sleep(self.stall_s)


def _serve(handler: type[http.server.BaseHTTPRequestHandler], folder: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_mirror_of() -> Iterator:
    """Serve a folder over HTTP on a free loopback port: `url = http_mirror_of(folder)`."""
    servers = []

    def start(folder: Path) -> str:
        gen = _serve(_QuietHandler, folder)
        servers.append(gen)
        return next(gen)

    yield start
    for gen in servers:
        gen.close()


@pytest.fixture
def stalling_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve(_StallingHandler, tmp_path)
