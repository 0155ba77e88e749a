"""What became of a version, as `fashion-mnist versions` lists it."""

from __future__ import annotations

from fmnist.registry.manifest import Decision
from fmnist.registry.rollout import RolloutRecord


def version_status(
    version: str,
    gate: Decision,
    champion: str | None,
    ever_champion: set[str],
    rollout: RolloutRecord | None = None,
) -> str:
    """Kept back by its gate; promoted (the champion, or a champion before it: `ever_champion`, from the
    audit log); a canary (`rollout`: undecided, rolled back or superseded, and why); or passed the gate and
    never champion (its run stopped before the pointer moved, or another version won the race). The gate's
    reason follows, or the rollout's."""
    if not gate.passed:
        return f"kept back: {gate.reason}"
    if version in ever_champion or version == champion:
        return f"promoted: {gate.reason}"
    if rollout is not None and rollout.outcome is None:
        return f"canary since {rollout.started_at}, undecided: {gate.reason}"
    if rollout is not None:
        return f"{rollout.outcome.replace('_', ' ')} in its canary: {rollout.reason}"
    return f"passed the gate, never champion: {gate.reason}"
