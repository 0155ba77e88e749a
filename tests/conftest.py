from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset, download_dataset
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout
from tests.helpers import write_mirror
from tests.seaweedfs import S3Server, seaweedfs
from tests.tiers import MAY_TRAIN, HeavyImports, outside_tier

HEAVY_IMPORTS = HeavyImports()
sys.meta_path.insert(0, HEAVY_IMPORTS)


def watched_for_tensorflow(item: pytest.Item):
    """A test outside the tiers that may train fails if it, or a fixture it sets up, imports TensorFlow."""
    if any(item.get_closest_marker(tier) for tier in MAY_TRAIN):
        return (yield)
    HEAVY_IMPORTS.watch()
    try:
        result = yield
    finally:
        refused = HEAVY_IMPORTS.stop()
    if refused:
        pytest.fail(f"{refused[0]} ({len(refused)} imports refused): {outside_tier(refused[0])}", pytrace=False)
    return result


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(watched_for_tensorflow)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(watched_for_tensorflow)


PREFECT_WORKERS_DRAIN_S = 10  # how long a module's end waits for Prefect's event and log workers to send what they hold


@pytest.fixture(scope="module", autouse=True)
def prefect_workers_end_with_the_module() -> Iterator[None]:
    """Prefect's event and log workers are one per process, and keep the server URL they were made with: a
    module that ran flows against its own server (then stopped it) left them sending the next module's events
    there, and that module's task runs were never recorded. Each module's end stops them (bounded), so the next
    module's first event makes workers for its own server."""
    yield
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        EventsWorker.drain_all(timeout=PREFECT_WORKERS_DRAIN_S)
        APILogWorker.drain_all(timeout=PREFECT_WORKERS_DRAIN_S)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files in the order that keeps the processes of make test busy (xdist hands each file whole to the
    next free process, in this order): the e2e file with the most tests first (minutes, mostly waiting on
    servers, workers and triggers), the files that train or start servers beside it (seconds a test), then the
    other e2e files (not all waiting at once: the cores once idled through two e2e files' setups), and last
    the many quick in-process files, which even out the processes' ends (a long file last left one
    process idle for minutes). A file keeps its tests together, in their order."""
    e2e_tests = Counter(item.path for item in items if item.get_closest_marker("e2e"))
    first = max(e2e_tests, key=e2e_tests.get) if e2e_tests else None

    def rank(item: pytest.Item) -> int:
        if item.path == first:
            return 0
        if any(item.get_closest_marker(tier) for tier in ("training", "processes")):
            return 1
        return 2 if item.get_closest_marker("e2e") else 3

    file_rank: dict[Path, int] = {}
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, 3), rank(item))
    items.sort(key=lambda item: file_rank[item.path])


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetSpec]:
    """A local mirror folder with a small generated dataset, and the spec pinning its files."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, write_mirror(folder)


@pytest.fixture
def layout(tmp_path: Path) -> DataLayout:
    return DataLayout(str(tmp_path / "data"))


@pytest.fixture
def raw(mirror: tuple[Path, DatasetSpec], layout: DataLayout, store: Store) -> RawDataset:
    """`mirror`'s dataset downloaded into `layout`'s raw folder (a module may give either fixture its own value)."""
    folder, spec = mirror
    return download_dataset(spec, [str(folder)], store, layout.raw)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store with this test's own scratch folder (used only for s3:// locations)."""
    return Store(scratch=tmp_path / "scratch", timeout_s=10)


# Each storage backend, as a way to make a root of a test's own there. A test that takes `root` (or a
# fixture built on it) runs once per backend: a new backend is its module and one line here.
BACKEND_ROOTS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "local": lambda request, tmp_path: str(tmp_path / "root"),
    "s3": lambda request, tmp_path: request.getfixturevalue("bucket") + "/root",  # a real S3 server's bucket
}


@pytest.fixture(params=list(BACKEND_ROOTS))
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder of this test's own on each storage backend in turn: the same test runs on every one."""
    return BACKEND_ROOTS[request.param](request, tmp_path)


@pytest.fixture
def data_layout(root: str) -> DataLayout:
    """A data root on each storage backend in turn."""
    return DataLayout(root + "/data")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _StallingHandler(QuietHandler):
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
def serve_with() -> Iterator:
    """Serve a folder with a request handler of the test's own: `url = serve_with(Handler, folder)`."""
    servers = []

    def start(handler: type[http.server.BaseHTTPRequestHandler], folder: Path) -> str:
        gen = _serve(handler, folder)
        servers.append(gen)
        return next(gen)

    yield start
    for gen in servers:
        gen.close()


@pytest.fixture
def http_mirror_of(serve_with) -> Callable[[Path], str]:
    """Serve a folder over HTTP on a free loopback port: `url = http_mirror_of(folder)`."""
    return functools.partial(serve_with, QuietHandler)


@pytest.fixture
def stalling_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve(_StallingHandler, tmp_path)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server (SeaweedFS) for the session, on free loopback ports."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard AWS variables set for this test, pointing at the session's S3 server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    """A new, empty bucket of this test's own, as an s3:// URL."""
    return f"s3://{s3_env.new_bucket()}"


# The serving tests in this process: the application on stub models (no TensorFlow), one per test module.
@pytest.fixture(scope="module")
def stub_registry(tmp_path_factory: pytest.TempPathFactory):
    """A registry of two stub versions, v0001 the champion and v0002 kept back (tests/serving_helpers)."""
    from tests.serving_helpers import write_stub_registry

    return write_stub_registry(tmp_path_factory.mktemp("stub-registry"))


@pytest.fixture(scope="module")
def app(stub_registry):
    """The application serving `stub_registry`, its lifespan running, through Starlette's test client."""
    from tests.serving_helpers import app_client

    with app_client(stub_registry) as client:
        yield client


@pytest.fixture
def canary(stub_registry, app) -> Iterator[str]:
    """v0002 labeled canary, and served as it; the label cleared after."""
    from tests.serving_helpers import labeled_canary

    with labeled_canary(stub_registry, app):
        yield "v0002"
