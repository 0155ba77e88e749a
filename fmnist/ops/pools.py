"""The work pools the deployments run on, created or updated with their concurrency limits in one process,
as `prefect work-pool create --type process --overwrite` and `set-concurrency-limit` would: each of those is
a Python start of its own (about 1.5 CPU-s), and six of them were most of `make deploy`'s own time."""

from __future__ import annotations

import re

POOL_TYPE = "process"
MAX_LIMIT = 1000
# What Prefect's API accepts in a name, kept simpler: letters, digits, '-', '_' and '.'.
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def pool_limit(text: str) -> tuple[str, int]:
    """`NAME=LIMIT` (a pool and how many runs it takes at once), or a ValueError that says what is wrong."""
    name, equals, limit = text.partition("=")
    if not POOL_NAME.fullmatch(name):
        raise ValueError(f"{text!r}: a pool's name is letters, digits, '.', '-' or '_' (at most 100)")
    if not equals or not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise ValueError(f"{text!r}: give NAME=LIMIT, LIMIT a whole number of runs from 1 to {MAX_LIMIT}")
    return name, int(limit)


def apply_pools(limits: dict[str, int]) -> dict[str, str]:
    """Create each pool, or update it (its template to the installed Prefect's default, unpaused, its limit);
    what was done to each, by name. A pool of another type is refused, naming it, before anything changes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        existing = {}
        for name in limits:
            try:
                existing[name] = client.read_work_pool(name)
            except ObjectNotFound:
                continue
            if existing[name].type != POOL_TYPE:
                raise ValueError(
                    f"work pool {name!r} is of type {existing[name].type!r}, not {POOL_TYPE!r}: "
                    "delete it (prefect work-pool delete) or name another"
                )
        for name, limit in limits.items():
            if name in existing:
                update = WorkPoolUpdate(base_job_template=template, is_paused=False, concurrency_limit=limit)
                client.update_work_pool(name, update)
                done[name] = f"updated (at most {limit} at once)"
            else:
                pool = WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template, concurrency_limit=limit)
                client.create_work_pool(pool)
                done[name] = f"created (at most {limit} at once)"
    return done
