"""Repairing the audit log and the champion pointer from what the registry still holds.

`repair_log` (`fashion-mnist repair-log`) restores the log's missing or damaged entries: those that
exactly one history explains (the search is `audit.histories`), and, with the operator's
acknowledgement, the ones the evidence cannot settle, as `lost` changes. `repair_champion`
(`fashion-mnist repair-champion`) rewrites a missing, damaged or stale `champion.json` from the log's
last change. Both work through the `Registry`'s own readers, so they see the registry exactly as every
registration and promotion does; what a champion move itself needs (`_history_evidence`, `_replayed`)
stays in `versions`.
"""

from __future__ import annotations

import contextlib
import json
import uuid

from fmnist.registry.audit import LOST, histories
from fmnist.registry.versions import MODEL, REPAIR_LOG, REPAIR_LOST, Registry, RegistryError, _entry, _now
from fmnist.storage import PreconditionFailed, join


def repair_log(registry: Registry, acknowledge_lost: bool = False) -> list[dict]:
    """Restore the audit log's missing or damaged entries from what the registry still holds (the
    champion pointer, the entries around them, the newest claim), and return those written.

    A lost entry that exactly one history consistent with all of it explains is restored as that
    change; one the evidence cannot settle is written only with `acknowledge_lost`, as a `lost` change
    with what is known of it. Every restored entry records its repair (`repair`: when, from what, and
    whether the operator acknowledged a loss); a damaged entry's bytes are kept beside it."""
    registry.store.require_conditional_writes(registry.root)
    known, damaged = _stored_entries(registry)
    stored = set(known)
    top = max(stored | set(damaged), default=0)
    pointer = registry._read_champion(damaged_ok=True)[0]
    final = None
    sequence = pointer.get("sequence") if pointer else None
    if sequence and registry._beyond(sequence, len(stored | set(damaged))):
        sequence = None  # an edited pointer: no evidence (`_state` names it damaged, for `repair-champion`)
    # A pointer at or beyond the log, and the same as its own entry if logged, is evidence; one behind
    # the log (restored from an older copy) is not: `repair-champion` rewrites it after.
    if sequence and sequence >= top and (sequence not in known or known[sequence] == _entry(pointer)):
        final, top = pointer, sequence
        known.setdefault(sequence, _entry(pointer))
    if (evidence := registry._history_evidence()) and evidence[1] > top:
        top, final = evidence[1], None  # changes the newest claim saw that neither the log nor the pointer has
    missing = [s for s in range(1, top + 1) if s not in known]
    if stored >= set(range(1, top + 1)):
        raise RegistryError(f"{registry.log_root}: the audit log is whole ({top} changes); nothing to repair")
    found = histories(known, top, final)
    settled = found is not None and len(found) == 1 and all(None not in found[0][s][:2] for s in missing)
    if missing and not settled and not acknowledge_lost:
        raise _unsettled(registry, missing, found)
    history = found[0] if found and len(found) == 1 else {}
    written = []
    for sequence in range(1, top + 1):
        if sequence in stored:
            continue
        if sequence in known:  # the pointer's own change, not logged yet
            entry = known[sequence]
            note = f"from {registry.champion_file}, the change it records"
        elif settled:
            event, version, replaced = history[sequence]
            entry = _restored(registry, sequence, event, version, replaced, known)
            note = "the only history that fits the log's other entries" + (
                f" and {registry.champion_file}" if final else ""
            )
        else:
            event, version, replaced = history.get(sequence, (LOST, None, None))
            before, after = known.get(sequence - 1), known.get(sequence + 1)
            version = version or (after or {}).get("replaced")
            replaced = replaced or (before or {}).get("version")
            event = LOST if None in (event, version) else event
            entry = _restored(registry, sequence, event, version, replaced, known)
            note = "not enough evidence: what is known of it, kept with the operator's acknowledgement"
        entry["repair"] = {"at": _now(), "by": "fashion-mnist repair-log", "evidence": note}
        entry["repair"]["acknowledged"] = not settled and sequence not in known
        _write_entry(registry, sequence, entry, damaged.get(sequence))
        written.append(entry)
    return written


def _stored_entries(registry: Registry) -> tuple[dict[int, dict], dict[int, tuple[bytes, str]]]:
    """The log's entries as stored: those that read (as `_entry` gives them), and the damaged ones' bytes
    and etags, by sequence."""
    known: dict[int, dict] = {}
    damaged: dict[int, tuple[bytes, str]] = {}
    for sequence in registry._sequences():
        try:
            known[sequence] = _entry(registry._logged_entry(sequence))
        except RegistryError:
            if found := registry._read(join(registry.log_root, f"{sequence:08d}.json")):
                damaged[sequence] = found
    return known, damaged


def _unsettled(registry: Registry, missing: list[int], found: list[dict[int, tuple]] | None) -> RegistryError:
    """The refusal to restore the `missing` changes unacknowledged, saying why the histories `found` (None:
    the search gave up) do not settle them."""
    why = (
        "the search gave up"
        if found is None
        else "no history fits the other entries and champion.json"
        if not found
        else "more than one history fits"
        if len(found) > 1
        else "no entry, claim or pointer names their versions"
    )
    return RegistryError(
        f"{registry.log_root}: change{'s' if len(missing) > 1 else ''} {_span(missing)} cannot be restored from "
        f"what the registry holds ({why}); {REPAIR_LOST} records them as lost, with what is "
        "known of them (or restore them from a backup)"
    )


def _restored(
    registry: Registry, sequence: int, event: str, version: str | None, replaced: str | None, known: dict[int, dict]
) -> dict:
    """The entry of lost change `sequence`, with the model hash its version had (from another entry of it,
    or its manifest)."""
    model = next((e.get("model_sha256") for e in known.values() if e["version"] == version), None)
    if model is None and version:
        with contextlib.suppress(RegistryError):
            model = registry.manifest(version).files.get(MODEL)
    reason = "lost from the audit log; restored by `fashion-mnist repair-log`"
    return {
        "sequence": sequence,
        "at": None,
        "event": event,
        "version": version,
        "replaced": replaced,
        "reason": reason,
        "model_sha256": model,
    }


def _write_entry(registry: Registry, sequence: int, entry: dict, damaged: tuple[bytes, str] | None) -> None:
    """Write a restored entry: create-only where none is, else over the damaged one (its bytes kept beside
    it) by compare-and-swap, so a writer that logged the change meanwhile is never overwritten."""
    location = join(registry.log_root, f"{sequence:08d}.json")
    data = json.dumps(entry).encode()
    if damaged is None:
        try:
            registry.store.create(location, data)
        except PreconditionFailed:
            if _entry(registry._logged_entry(sequence)) != _entry(entry):
                raise RegistryError(f"{location} was written by another writer meanwhile; run again") from None
        return
    kept = join(registry.log_root, f"{sequence:08d}.damaged-{uuid.uuid4().hex[:8]}.json")
    registry.store.write_bytes(kept, damaged[0])
    try:
        registry.store.replace(location, data, damaged[1])
    except PreconditionFailed:
        raise RegistryError(f"{location} was rewritten by another writer meanwhile; run again") from None


def repair_champion(registry: Registry) -> dict:
    """Rewrite a missing, damaged or stale champion pointer from the audit log's last change, once that
    version verifies; return the record written."""
    try:
        record, _, _ = registry._state()
    except RegistryError:
        pass
    else:
        if record is None:
            raise RegistryError(f"no champion and no audit log in {registry.root}: nothing to repair")
        raise RegistryError(f"{registry.champion_file} is intact (champion {record['version']}); nothing to repair")
    _, etag = registry._read_champion(damaged_ok=True)
    record = registry._replayed()
    if record is None:
        raise RegistryError(
            f"no audit log in {registry.log_root} to restore the champion pointer from: {REPAIR_LOG} "
            "restores the log from what the registry holds, `fashion-mnist promote VERSION` names a champion"
        )
    if record["version"] is None:
        raise RegistryError(
            f"the audit log's last change ({record['sequence']}) was lost and names no version: "
            "`fashion-mnist promote VERSION` names the champion"
        )
    try:
        registry._vouched_model(record["version"])
    except RegistryError as exc:
        raise RegistryError(
            f"the audit log's champion {record['version']} does not verify ({exc}); "
            "`fashion-mnist promote VERSION` makes a version that does the champion"
        ) from exc
    registry.store.replace(registry.champion_file, json.dumps(record, indent=1).encode(), etag)
    return record


def _span(sequences: list[int]) -> str:
    """The first five of `sequences` and how many more: a message's list of lost changes."""
    return ", ".join(map(str, sequences[:5])) + (f" and {len(sequences) - 5} more" if len(sequences) > 5 else "")
