"""The server's log cannot be filled by one repeated error: a line of the same kind (whatever its
numbers) is written at most PER_WINDOW times a window, and the next one after says how many were held."""

from __future__ import annotations

import logging

import pytest

from fmnist.serving.log_limits import PER_WINDOW, RepeatedLines, RepeatLimiter, nginx_kind


@pytest.fixture
def written() -> list[str]:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    handler.addFilter(RepeatedLines())
    logger = logging.getLogger("tests.log_limits")
    logger.addHandler(handler)
    logger.propagate = False
    yield lines
    logger.removeHandler(handler)


def test_an_error_repeated_per_accept_is_written_a_few_times(written: list[str]) -> None:
    logger = logging.getLogger("tests.log_limits")
    for number in range(10_000):
        logger.error("socket.accept() out of system resource: fd %d", number)
    logger.error("another kind of line")
    assert len(written) == PER_WINDOW + 1
    assert written[-1] == "another kind of line"


def test_the_lines_held_back_are_counted_when_the_window_rolls() -> None:
    limiter = RepeatLimiter(per_window=2, window_s=0.0)  # every line opens a new window
    assert limiter.admit("a") == (True, 0)
    limiter = RepeatLimiter(per_window=1, window_s=3600)
    assert [limiter.admit("a")[0] for _ in range(4)] == [True, False, False, False]
    limiter.window_s = 0.0
    assert limiter.admit("a") == (True, 3)


def test_kinds_remembered_are_bounded() -> None:
    limiter = RepeatLimiter()
    for number in range(5000):
        limiter.admit(f"kind {number} " + "x" * (number % 7))
    assert len(limiter.kinds) <= 1024


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            "2026/12/06 13:13:09 [error] 5943#5943: *1207 client intended to send too large body: 20000000 bytes, "
            'client: 127.0.0.2, server: , request: "POST /v1/models/x:predict HTTP/1.1"',
            "error client intended to send too large body: # bytes",
        ),
        (
            "2026/12/06 13:13:09 [crit] 12#12: accept4() failed (24: Too many open files)",
            "crit accept#() failed (#: Too many open files)",
        ),
    ],
)
def test_an_nginx_line_is_known_by_its_level_and_message(line: str, kind: str) -> None:
    assert nginx_kind(line) == kind
    assert nginx_kind(line.replace("127.0.0.2", "127.0.0.99").replace("*1207", "*5")) == kind
