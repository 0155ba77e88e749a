"""Logs that an attacker cannot fill: a line repeated (the same message, whatever its numbers) is written
at most `PER_WINDOW` times a `WINDOW_S`, then counted, and the count is written when the next like it
comes after the window. One error per request or per accept (a full descriptor table made asyncio log a
traceback per accept, 6 MB/s) costs a few lines a minute.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict

PER_WINDOW = 5
WINDOW_S = 60.0
MAX_KINDS = 1024  # kinds of line remembered; the least recently seen is forgotten
NUMBERS = re.compile(r"\d+")
NGINX_PREFIX = re.compile(r"^[\d/: ]*\[(\w+)\] [\d#]+: (?:\*\d+ )?")


class RepeatLimiter:
    def __init__(self, per_window: int = PER_WINDOW, window_s: float = WINDOW_S) -> None:
        self.per_window, self.window_s = per_window, window_s
        self.kinds: OrderedDict[str, list] = OrderedDict()  # kind -> [window start, written, suppressed]

    def admit(self, kind: str) -> tuple[bool, int]:
        """Whether a line of `kind` is written now, and how many like it were held back before it."""
        now = time.monotonic()
        seen = self.kinds.pop(kind, None)
        if seen is None or now - seen[0] >= self.window_s:
            held_back = seen[2] if seen else 0
            seen = [now, 0, 0]
        else:
            held_back = 0
        self.kinds[kind] = seen
        if len(self.kinds) > MAX_KINDS:
            self.kinds.popitem(last=False)
        if seen[1] < self.per_window:
            seen[1] += 1
            return True, held_back
        seen[2] += 1
        return False, held_back


class RepeatedLines(logging.Filter):
    """A logging filter: a record's kind is its logger, message template and exception type."""

    def __init__(self) -> None:
        super().__init__()
        self.limiter = RepeatLimiter()

    def filter(self, record: logging.LogRecord) -> bool:
        exception = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = f"{record.name}|{NUMBERS.sub('#', str(record.msg))[:200]}|{exception}"
        admitted, held_back = self.limiter.admit(kind)
        if admitted and held_back:
            record.msg = f"{record.msg} ({held_back:,} lines like this held back in the last {WINDOW_S:g} s)"
        return admitted


def limit_repeats(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (the root's, by default)."""
    repeated = RepeatedLines()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(repeated)


def nginx_kind(line: str) -> str:
    """An nginx error-log line's kind: its level and message up to the client's address, numbers aside."""
    message = NGINX_PREFIX.sub(r"\1 ", line)
    return NUMBERS.sub("#", message.split(", client:")[0])[:200]
