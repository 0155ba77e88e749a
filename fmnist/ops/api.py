"""Wait for the Prefect API before a worker or a run starts against it.

Started while the server is down, Prefect's own commands fail with no URL (`prefect deployment run`:
a traceback ending in `ConnectError: All connection attempts failed`) or retry for minutes in silence
(`prefect worker start --type process`). The Makefile's targets wait here first: a bounded, visible
retry that names the URL it tried, then a clear error.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable

# How long `make worker-*`, `make deploy` and `make retrain-now` wait for the API by default.
API_WAIT_S = 60
# Tries come at 1, 2, 4 ... seconds apart, never more than this.
API_RETRY_CAP_S = 8


class ApiUnreachable(RuntimeError):
    """The Prefect API did not answer in the time allowed."""


def wait_for_api(
    api_url: str, timeout_s: float, say: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep
) -> int:  # type: ignore[return]  (the loop returns or raises)
    """Return the number of tries once `api_url`/health answers 200; raise ApiUnreachable after `timeout_s`."""
    health = api_url.rstrip("/") + "/health"
    started = time.monotonic()
    pause = 1.0
    for attempt in itertools.count(1):
        try:
            with urllib.request.urlopen(health, timeout=min(5.0, max(timeout_s, 0.5))) as response:
                if response.status == 200:
                    return attempt
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}"
        except (OSError, ValueError) as error:
            problem = str(getattr(error, "reason", error))
        left = timeout_s - (time.monotonic() - started)
        if left <= 0:
            raise ApiUnreachable(
                f"the Prefect API at {api_url} did not answer in {timeout_s:g} s ({attempt} tries; last: {problem}): "
                "start the server (make server), or point PREFECT_API_URL (make: PREFECT_PORT) at the one that runs"
            )
        pause = min(pause, left, API_RETRY_CAP_S)
        say(f"the Prefect API at {api_url} is not answering ({problem}); try {attempt + 1} in {pause:.1f} s")
        sleep(pause)
        pause *= 2


def api_failure(error: Exception) -> str:
    """What an HTTP error from the Prefect API says (Prefect's: the status, the URL, the server's answer, then
    " - For more information check: ..."), on one line and at most 500 characters, with the URL it was asking
    (a refused connection's message names none), never the user and password a URL may carry."""
    message = " ".join(str(error).split()).split(" - For more information")[0] or type(error).__name__
    try:
        url = str(error.request.url)  # (httpx's errors; it raises when the error has no request)
    except (AttributeError, RuntimeError):
        url = ""
    if url and url not in message:
        message = f"{url}: {message}"
    return "the Prefect API failed: " + re.sub(r"://[^/\s@]*@", "://", message)[:500]
