"""The work pools the deployments run on, created or updated with their concurrency limits in one process,
as `prefect work-pool create --type process --overwrite` and `set-concurrency-limit` would: each of those is
a Python start of its own (about 1.5 CPU-s), and six of them were most of `make deploy`'s own time."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import httpx

from fmnist.ops.api import api_failure

POOL_TYPE = "process"
MAX_LIMIT = 1000
# Letters, digits, '-', '_' and '.', as Prefect's API accepts them; and not its reserved prefix.
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_PREFIX = "prefect"
REQUEST_TIMEOUT_S = 15  # each request's (Prefect's client tries a failed one up to 5 more times)


class PoolsError(RuntimeError):
    """A pool could not be applied; says what was applied before it, and what was not."""


def pool_limit(text: str) -> tuple[str, int]:
    """`NAME=LIMIT` (a pool and how many runs it takes at once), or a ValueError that says what is wrong."""
    name, equals, limit = text.partition("=")
    if not POOL_NAME.fullmatch(name):
        raise ValueError(f"{text!r}: a pool's name is letters, digits, '.', '-' or '_' (at most 100)")
    if name.lower().startswith(RESERVED_PREFIX):
        raise ValueError(f"{text!r}: Prefect keeps the names starting with {RESERVED_PREFIX!r} for its own pools")
    if not equals or not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise ValueError(f"{text!r}: give NAME=LIMIT, LIMIT a whole number of runs from 1 to {MAX_LIMIT}")
    return name, int(limit)


def apply_pools(limits: dict[str, int], say: Callable[[str], None] = print) -> None:
    """Create each pool, or update it (its template to the installed Prefect's default, unpaused, its limit),
    saying so as each is done. A pool of another type is refused before any is changed (its template would
    be overwritten); a pool made or deleted meanwhile by someone else is updated or made instead. On a failure,
    a PoolsError names the pools applied and those not."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    applied: list[str] = []
    with get_client(httpx_settings={"timeout": REQUEST_TIMEOUT_S}, sync_client=True) as client:
        try:
            existing = set()
            for name in limits:
                with contextlib.suppress(ObjectNotFound):  # (made below)
                    refuse_another_type(client.read_work_pool(name))
                    existing.add(name)
            for name, limit in limits.items():
                done = upsert(client, name, limit, template, exists=name in existing)
                say(f"work pool {name!r} {done} (at most {limit} at once)")
                applied.append(name)
        except (PoolsError, httpx.HTTPError) as exc:  # (Prefect's HTTP errors are httpx's)
            left = [name for name in limits if name not in applied]
            problem = exc if isinstance(exc, PoolsError) else api_failure(exc)
            raise PoolsError(
                f"{problem}; applied: {', '.join(applied) or 'none'}; not applied: {', '.join(left)} (run it again)"
            ) from exc


def refuse_another_type(pool) -> None:
    if pool.type != POOL_TYPE:
        raise PoolsError(
            f"work pool {pool.name!r} is of type {pool.type!r}, not {POOL_TYPE!r}: delete it (prefect work-pool "
            "delete) or name another"
        )


def upsert(client, name: str, limit: int, template: dict, exists: bool) -> str:
    """Update the pool if it `exists`, else create it; the other if another client made or deleted it since it
    was read (once more: a pool made meanwhile is read first, to refuse another type)."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    for _attempt in range(2):
        try:
            if exists:
                update = WorkPoolUpdate(base_job_template=template, is_paused=False, concurrency_limit=limit)
                client.update_work_pool(name, update)
                return "updated"
            pool = WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template, concurrency_limit=limit)
            client.create_work_pool(pool)
            return "created"
        except ObjectNotFound:  # deleted meanwhile: make it
            exists = False
        except ObjectAlreadyExists:  # made meanwhile
            refuse_another_type(client.read_work_pool(name))
            exists = True
    raise PoolsError(f"work pool {name!r} was made and deleted by someone else twice while it was applied")
