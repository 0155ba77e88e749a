"""What became of a version, as `fashion-mnist versions` lists it."""

from __future__ import annotations

from fmnist.registry.manifest import Decision


def version_status(version: str, gate: Decision, champion: str | None, ever_champion: set[str]) -> str:
    """Kept back by its gate; promoted (the champion, or a champion before it: `ever_champion`, from the
    audit log); or passed the gate and never champion (its run stopped before the pointer moved, or another
    version won the race). The gate's reason follows."""
    if not gate.passed:
        return f"kept back: {gate.reason}"
    if version in ever_champion or version == champion:
        return f"promoted: {gate.reason}"
    return f"passed the gate, never champion: {gate.reason}"
