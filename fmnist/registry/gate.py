"""The promotion gate: what a new version must pass to become champion, and its verdict.

An absolute floor on test accuracy, then not worse than the champion (nor than the best champion before it)
by more than a tolerance, on the same test set; or forced by the operator. `Registry` applies it when a
version is registered and again whenever the champion moved under a registration. Under the canary policy
(`rollout`), passing while a champion exists makes the version the canary, not champion
(`fmnist.registry.rollout`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fmnist.registry.manifest import Decision, VersionManifest


class PromotionParams(BaseModel):
    """The gate a new version must pass to become champion."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_accuracy: float = Field(0.80, ge=0, le=1, description="Absolute floor on test accuracy (chance is 0.10)")
    tolerance: float = Field(
        0.005,
        ge=0,
        le=1,
        description="How far below the champion, and below the best champion before it, a new version may be",
    )
    force: bool = Field(False, description="Promote whatever the metrics say (an operator's decision)")
    rollout: Literal["immediate", "canary"] = Field(
        "immediate",
        description="What passing does while a champion exists: immediate (it becomes champion) or canary (it is "
        "served as the canary, and the rollout judge promotes it on live evidence or rolls it back)",
    )


def decide(
    candidate_accuracy: float,
    test_set: str,
    champion: VersionManifest | None,
    gate: PromotionParams,
    *,
    best: VersionManifest | None = None,
) -> Decision:
    """The promotion gate: an absolute floor, then not worse than the champion beyond `gate.tolerance`.

    `best` (the manifest of the best earlier champion still in the chain that rollbacks leave) raises
    the bar when it beats the champion: measured from the champion alone, each new champion could
    be `tolerance` worse than the last, and accuracy could ratchet down a little every night.
    """
    floor, tolerance = gate.min_accuracy, gate.tolerance
    champion_version = champion.version if champion else None
    champion_accuracy = champion.metrics.test_accuracy if champion else None
    if best is not None and (best.data.test_set != test_set or champion is None):
        best = None
    if best is not None and best.metrics.test_accuracy <= champion_accuracy:
        best = None
    best_version, best_accuracy = (best.version, best.metrics.test_accuracy) if best else (None, None)

    def verdict(passed: bool, reason: str) -> Decision:
        return Decision(
            passed,
            reason,
            candidate_accuracy,
            champion_version,
            champion_accuracy,
            floor,
            tolerance,
            best_version,
            best_accuracy,
        )

    if gate.force:
        return verdict(True, "promotion forced by the operator")
    if candidate_accuracy < floor:
        return verdict(False, f"test accuracy {candidate_accuracy:.4f} is below the floor {floor:.4f}")
    if champion is None:
        return verdict(True, f"first version to clear the floor ({candidate_accuracy:.4f} >= {floor:.4f})")
    if champion.data.test_set != test_set:
        return verdict(False, f"champion {champion_version} was measured on another test set; not comparable")
    if candidate_accuracy < champion_accuracy - tolerance:
        return verdict(
            False,
            f"test accuracy {candidate_accuracy:.4f} is worse than champion {champion_version}'s "
            f"{champion_accuracy:.4f} by more than {tolerance:.4f}",
        )
    if best_accuracy is not None and candidate_accuracy < best_accuracy - tolerance:
        return verdict(
            False,
            f"test accuracy {candidate_accuracy:.4f} is worse than {best_version}'s {best_accuracy:.4f}, the best "
            f"champion so far, by more than {tolerance:.4f} (the tolerance does not add up over promotions)",
        )
    return verdict(
        True,
        f"test accuracy {candidate_accuracy:.4f} is within {tolerance:.4f} of or above champion "
        f"{champion_version}'s {champion_accuracy:.4f}",
    )
