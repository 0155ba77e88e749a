"""Worker processes that parse big request bodies and messages, so the event loop only moves bytes: a
big body parsed on the loop, or on a thread (JSON and protobuf parsing hold the GIL), stalls every other
client. A body up to INLINE_BYTES (a few images) is parsed where it is: shipping it costs more.

The pool heals: a worker killed (the OOM killer, a native crash) breaks a `ProcessPoolExecutor` for
good, so a broken pool is replaced at once, the request that met it is parsed again on the new one, and
`ready()` is false until the replacement answers. Workers end with the server: each asks the kernel for
SIGKILL when its parent dies, so a server killed with SIGKILL leaves none behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fmnist.serving.errors import NotReady
from fmnist.serving.protos import tensorflow_serving

INLINE_BYTES = 64 << 10  # bodies up to this size are parsed on the event loop (a one-image request: ~3 KB)
PR_SET_PDEATHSIG = 1
NICENESS = 10

log = logging.getLogger(__name__)


def die_with_parent(parent: int, dying: signal.Signals) -> None:
    """In a child the server started: have the kernel send `dying` when the server dies (even by SIGKILL).
    Call it after any change of user, which clears the request."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, dying)
    if os.getppid() != parent:  # the server died before the request above took effect
        os._exit(1)


def _start_worker(parent: int) -> None:
    """A worker's start: die with the server, yield the CPU to it, and know TF Serving's messages (here, so
    that a worker that cannot fails its start, not a client's request)."""
    die_with_parent(parent, signal.SIGKILL)
    # On a machine with few cores, parsing a hostile client's big bodies must not take the CPU from the
    # event loop and the model calls.
    os.nice(NICENESS)
    tensorflow_serving.load()


def _ready() -> bool:
    return True


class BodyParsers:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.starting: asyncio.Task | None = None
        self.replaced = 0  # pools replaced after a worker died

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server process holds TensorFlow's threads, which a fork does not carry.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))

    async def start(self) -> None:
        """Start the workers and wait until each has imported what it parses with."""
        if not self.workers:
            return
        self.pool = self._new_pool()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, _ready) for _ in range(self.workers)))

    def ready(self) -> bool:
        """Whether a body can be parsed now (false while a broken pool is being replaced)."""
        if not self.workers:
            return True
        if self._broken():
            self._heal()
            return False
        return self.starting is None or self.starting.done()

    def _broken(self) -> bool:
        # The executor's own flag, set by its management thread the moment a worker dies (it has no public one).
        return self.pool is None or bool(getattr(self.pool, "_broken", False))

    def _heal(self) -> asyncio.Task:
        """Replace a broken pool, once however many requests met it."""
        if self.starting is None or self.starting.done():
            broken, self.pool = self.pool, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            self.replaced += 1
            log.error("a body parser process died; starting a new pool (%d replaced so far)", self.replaced)
            self.starting = asyncio.get_running_loop().create_task(self.start())
        return self.starting

    async def run(self, parse, body: bytes, *args, inline_bytes: int = INLINE_BYTES):
        """`parse(body, *args)`, in a worker when the body is over `inline_bytes` (0: always, for work that
        does not scale with the body's size, like inflating a PNG)."""
        if not self.workers or len(body) <= inline_bytes:
            return parse(body, *args)
        for _attempt in range(2):  # the request that met a dead worker is parsed again on the new pool
            if self._broken():
                await asyncio.shield(self._heal())
            try:
                return await asyncio.get_running_loop().run_in_executor(self.pool, parse, body, *args)
            except BrokenProcessPool:
                continue
        raise NotReady("the body parsers died twice while parsing this request; try again")

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
