"""The pipeline's own Prefect events: what an operator must hear about, and what starts a retrain.

Each event carries a one-line `message` (what happened, in words) in its payload; the notification
automations (`automations.yaml`) send that line, the run's name and a link to it. Inside a flow run,
Prefect relates the event to that run by itself, so the link points at the run that emitted it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fmnist.storage.files import printable

if TYPE_CHECKING:
    from fmnist.data.incoming import IncomingBatch
    from fmnist.storage.layout import StorageParams

log = logging.getLogger(__name__)

PREFIX = "fashion-mnist"
VALIDATION_FAILED = f"{PREFIX}.validation.failed"
DRIFT_DETECTED = f"{PREFIX}.drift.detected"
TRAINING_RESTARTED = f"{PREFIX}.training.restarted"
MODEL_PROMOTED = f"{PREFIX}.model.promoted"
MODEL_KEPT_BACK = f"{PREFIX}.model.kept-back"
# A canary rollout (`fmnist.registry.rollout`): started at registration, decided by the judge or an operator.
ROLLOUT_STARTED = f"{PREFIX}.rollout.started"
ROLLOUT_PROMOTED = f"{PREFIX}.rollout.promoted"
ROLLOUT_ROLLED_BACK = f"{PREFIX}.rollout.rolled-back"
# The served champion's watch (`fmnist.registry.champion_watch`): its traffic drifted from the test set's,
# or its estimated accuracy fell, over periods in a row.
CHAMPION_DRIFTED = f"{PREFIX}.champion.drifted"
CHAMPION_ESTIMATE_LOW = f"{PREFIX}.champion.estimate-low"
RUN_FAILED = f"{PREFIX}.run.failed"
BATCH_ADDED = f"{PREFIX}.batch.added"
BATCH_QUARANTINED = f"{PREFIX}.batch.quarantined"

# Prefect refuses events over its size limit (1.5 MB by default): a long list of failures is cut.
MAX_MESSAGE_CHARS = 4000


HOSTS_LABEL = f"{PREFIX}.hosts"  # "shared": every host reads the location; "this-host": a local folder


def pipeline_resource(location: str, *, shared: bool | None = None) -> dict[str, str]:
    """The resource an event is about: the pipeline whose registry (or incoming folder) is `location`;
    `shared` (when known) says whether hosts that share no disk can read it, which routes batch events
    to the single-host or the cluster deployments."""
    resource = {"prefect.resource.id": f"{PREFIX}.{location}", "prefect.resource.name": location}
    if shared is not None:
        resource[HOSTS_LABEL] = "shared" if shared else "this-host"
    return resource


def emit(
    event: str,
    location: str,
    message: str,
    *,
    flow_run_id: str | None = None,
    shared: bool | None = None,
    **payload: Any,
) -> None:
    """Emit `event` from inside a flow run; best effort: a lost event never fails the run.

    Prefect relates the event to the run it is emitted in; `flow_run_id` names the run where no run
    context is at hand (a state hook). `shared`: as `pipeline_resource`.
    """
    from prefect.events import emit_event

    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 20] + " ... (cut)"
    location, message, payload = _printable((location, message, payload))
    run = {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}
    try:
        emit_event(
            event=event,
            resource=pipeline_resource(location, shared=shared),
            related=[run] if flow_run_id else None,
            payload={"message": message, **payload},
        )
    except Exception:  # an event is a notification, never a reason to fail the pipeline
        log.warning("Could not emit the %s event", event, exc_info=True)


async def send(event: str, location: str, message: str, *, shared: bool | None = None, **payload: Any) -> None:
    """Send `event` now and wait until the server has it (for a CLI that exits right after)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    location, message, payload = _printable((location, message, payload))
    async with get_events_client(reconnection_attempts=2) as client:
        await client.emit(
            Event(
                event=event,
                resource=pipeline_resource(location, shared=shared),
                payload={"message": message, **payload},
            )
        )


def _printable(value: Any) -> Any:
    """`value` with every string in it printable (`fmnist.storage.files.printable`): a file name that is not
    UTF-8 would fail the event's JSON encoding, and the event with it."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_printable(v) for v in value)
    return value


def where_stored(storage: StorageParams) -> dict[str, str]:
    """What an event says of where its pipeline lives: the trigger it fires runs on that storage."""
    return {"data_root": storage.data.root, "registry_root": storage.registry, "incoming_dir": storage.incoming}


def emit_rollout_started(storage: StorageParams, message: str, **payload: Any) -> None:
    """A canary rollout started in `storage`'s registry: the judge deployment for the hosts that reach that
    registry (every host: in a bucket) judges it there at once."""
    shared = storage.store().direct_path(storage.registry) is None
    emit(ROLLOUT_STARTED, storage.registry, message, shared=shared, storage=where_stored(storage), **payload)


async def announce_batch(batch: IncomingBatch, storage: StorageParams) -> None:
    """Say that `batch` was added; the ad-hoc deployments' trigger retrains on the storage it names."""
    where = where_stored(storage)
    message = f"Batch {batch.name} added: {batch.rows} {batch.kind} images at {batch.path}"
    shared = storage.store().direct_path(storage.incoming) is None  # no path on this host: in a bucket
    await send(BATCH_ADDED, storage.incoming, message, shared=shared, batch=batch.name, rows=batch.rows, storage=where)
