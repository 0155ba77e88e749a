"""The model registry: immutable, self-describing versions and a champion pointer.

Layout under the registry root (`artifacts/` by default):

    versions/v0001/        model.keras, metrics.json, history.json, *.png, model_card.md, manifest.json
    champion.json          the version in service, the earlier champions (for rollback), why and when
    promotions.jsonl       every champion change, appended
    .lock                  held while a version is numbered and written or the champion changes

A version folder is written whole (temp folder + rename) and never changed afterwards; its manifest
lists the sha256 of every file, so a damaged version is detected before it is used. Registrations
from several processes at once each get their own number, in order, under the lock.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from fmnist.files import atomic_dir, atomic_write_text, sha256_file

VERSION_PREFIX = "v"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Decision:
    """Whether a candidate became champion, and the numbers that decided it."""

    promoted: bool
    reason: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    floor: float
    tolerance: float


def decide(
    candidate_accuracy: float,
    test_set: str,
    champion: dict | None,
    *,
    floor: float,
    tolerance: float,
    force: bool = False,
) -> Decision:
    """The promotion gate: an absolute floor, then not worse than the champion beyond `tolerance`."""
    champion_version = champion["version"] if champion else None
    champion_accuracy = champion["metrics"]["test_accuracy"] if champion else None

    def verdict(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, reason, candidate_accuracy, champion_version, champion_accuracy, floor, tolerance)

    if force:
        return verdict(True, "promotion forced by the operator")
    if candidate_accuracy < floor:
        return verdict(False, f"test accuracy {candidate_accuracy:.4f} is below the floor {floor:.4f}")
    if champion is None:
        return verdict(True, f"first version to clear the floor ({candidate_accuracy:.4f} >= {floor:.4f})")
    if champion["data"]["test_set"] != test_set:
        return verdict(False, f"champion {champion_version} was measured on another test set; not comparable")
    if candidate_accuracy < champion_accuracy - tolerance:
        return verdict(
            False,
            f"test accuracy {candidate_accuracy:.4f} is worse than champion {champion_version}'s "
            f"{champion_accuracy:.4f} by more than {tolerance:.4f}",
        )
    return verdict(
        True,
        f"test accuracy {candidate_accuracy:.4f} is within {tolerance:.4f} of or above champion "
        f"{champion_version}'s {champion_accuracy:.4f}",
    )


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions_dir = root / "versions"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.name.startswith(VERSION_PREFIX))

    def version_dir(self, version: str) -> Path:
        path = self.versions_dir / version
        if not (path / "manifest.json").is_file():
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"no version {version!r} in {self.root} (versions: {known})")
        return path

    def manifest(self, version: str) -> dict:
        return json.loads((self.version_dir(version) / "manifest.json").read_text())

    def damaged_files(self, version: str) -> list[str]:
        """Files of `version` that are missing or no longer hash to its manifest (empty: intact)."""
        folder = self.version_dir(version)
        return [
            name
            for name, digest in self.manifest(version)["files"].items()
            if not (folder / name).is_file() or sha256_file(folder / name) != digest
        ]

    def champion_record(self) -> dict | None:
        path = self.root / "champion.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def champion(self) -> str | None:
        record = self.champion_record()
        return record["version"] if record else None

    def register(
        self,
        files: dict[str, Path],
        manifest: dict,
        *,
        floor: float,
        tolerance: float,
        force: bool = False,
        model_card: Callable[[dict], str] | None = None,
    ) -> tuple[str, Decision]:
        """Store a new version; make it champion if it passes the gate. Returns its id and the decision.

        `model_card` turns the version's final manifest (with its number and decision) into markdown.
        """
        with self._locked():
            existing = self.versions()
            number = int(existing[-1].removeprefix(VERSION_PREFIX)) + 1 if existing else 1
            version = f"{VERSION_PREFIX}{number:04d}"
            champion = self.champion()
            decision = decide(
                manifest["metrics"]["test_accuracy"],
                manifest["data"]["test_set"],
                self.manifest(champion) if champion else None,
                floor=floor,
                tolerance=tolerance,
                force=force,
            )
            record = {**manifest, "version": version, "registered_at": _now(), "decision": asdict(decision)}
            with atomic_dir(self.versions_dir / version) as tmp:
                for name, source in files.items():
                    shutil.copyfile(source, tmp / name)
                if model_card:
                    (tmp / "model_card.md").write_text(model_card(record))
                record["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
                (tmp / "manifest.json").write_text(json.dumps(record, indent=1))
            if decision.promoted:
                self._set_champion(version, decision.reason)
        return version, decision

    def promote(self, version: str, reason: str) -> None:
        """Make `version` the champion by hand, if its files are intact."""
        with self._locked():
            if damaged := self.damaged_files(version):
                raise RegistryError(f"{version} is damaged ({', '.join(damaged)}); refusing to promote it")
            if self.champion() == version:
                raise RegistryError(f"{version} is already the champion")
            self._set_champion(version, reason)

    def rollback(self, reason: str = "rolled back by the operator") -> str:
        """Make the previous champion the champion again; return its version."""
        with self._locked():
            record = self.champion_record()
            if not record or not record["previous"]:
                raise RegistryError("there is no earlier champion to roll back to")
            *earlier, previous = record["previous"]
            self._write_champion(previous, reason, earlier, event="rollback", replaced=record["version"])
            return previous

    def _set_champion(self, version: str, reason: str) -> None:
        record = self.champion_record()
        if record is None:
            self._write_champion(version, reason, [], event="promote", replaced=None)
        else:
            earlier = [*record["previous"], record["version"]]
            self._write_champion(version, reason, earlier, event="promote", replaced=record["version"])

    def _write_champion(
        self, version: str, reason: str, earlier: list[str], *, event: str, replaced: str | None
    ) -> None:
        at = _now()
        atomic_write_text(
            self.root / "champion.json",
            json.dumps({"version": version, "since": at, "reason": reason, "previous": earlier}, indent=1),
        )
        line = {"at": at, "event": event, "version": version, "replaced": replaced, "reason": reason}
        with open(self.root / "promotions.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")

    def champion_if_current(self, fingerprint: str) -> str | None:
        """The champion if it was made from exactly this data, code and parameters and is intact."""
        champion = self.champion()
        if champion is None or self.manifest(champion).get("fingerprint") != fingerprint:
            return None
        return None if self.damaged_files(champion) else champion

    def champion_model_path(self) -> tuple[Path, str]:
        """The champion's model file and the sha256 it must have."""
        champion = self.champion()
        if champion is None:
            raise RegistryError(f"no champion in {self.root}: no version has been promoted yet")
        return self.version_dir(champion) / "model.keras", self.manifest(champion)["files"]["model.keras"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
