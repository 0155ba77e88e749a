"""The model registry: immutable, self-describing versions and a champion pointer, on disk or in a bucket.

Layout under the registry root (`artifacts/` by default, or `s3://bucket/prefix`):

    versions/v0001/claim.json      the number's claim, written create-only: no two runs get one number
    versions/v0001/...             model.keras, metrics.json, history.json, *.png, model_card.md
    versions/v0001/manifest.json   lineage, metrics, the gate's verdict and every file's sha256; written
                                   create-only and last: a version folder without it does not exist
    champion.json                  the version in service; it moves only by compare-and-swap
    promotions/00000001.json       one create-only record per champion change, by sequence: the audit log
    runs/<run id>/                 each run's working folder (fmnist.run_folder)

No locks, so it works the same from many hosts on object storage: a version number is claimed by a
create-only write (a number another writer took is skipped); a version is published by the
create-only write of its manifest; the champion pointer moves by compare-and-swap (a writer that lost
reads the new champion and decides again); each change is logged once under its sequence number, by
the writer that made it or, if that one died first, by the next one to read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmnist.manifest import Decision, RunManifest, VersionManifest
from fmnist.storage import IntegrityError, PreconditionFailed, Store, StoredFile, join

MODEL = "model.keras"
VERSION = re.compile(r"v(\d{4,})")  # v0001 ... v9999, v10000 ...: anything else in versions/ is ignored
CHAMPION_MOVE_ATTEMPTS = 50
FINGERPRINT_SCAN = 200  # versions searched for an earlier run of the same fingerprint, newest first


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


class PromotionParams(BaseModel):
    """The gate a new version must pass to become champion."""

    model_config = ConfigDict(extra="forbid")

    min_accuracy: float = Field(0.80, ge=0, le=1, description="Absolute floor on test accuracy (chance is 0.10)")
    tolerance: float = Field(
        0.005,
        ge=0,
        le=1,
        description="How far below the champion, and below the best champion before it, a new version may be",
    )
    force: bool = Field(False, description="Promote whatever the metrics say (an operator's decision)")


@dataclass(frozen=True)
class Registered:
    """What a registration did: the version it published, the verdict that counted, the champion after."""

    version: str
    decision: Decision  # the gate at registration, or against a champion promoted meanwhile
    promoted: bool  # whether this version became champion
    champion: str | None


def decide(
    candidate_accuracy: float,
    test_set: str,
    champion: VersionManifest | None,
    *,
    floor: float,
    tolerance: float,
    force: bool = False,
    best: VersionManifest | None = None,
) -> Decision:
    """The promotion gate: an absolute floor, then not worse than the champion beyond `tolerance`.

    `best` (the manifest of the best earlier champion still in the chain that rollbacks leave) raises
    the bar when it beats the champion: measured from the champion alone, each new champion could
    be `tolerance` worse than the last, and accuracy could ratchet down a little every night.
    """
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

    if force:
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


class _Declined(Exception):
    """A champion move that its writer no longer wants, having seen the pointer move under it."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision


def version_number(version: str) -> int:
    """v0003 -> 3: the order of versions, and TF Serving's version number for it."""
    return int(version[1:])


class Registry:
    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root
        self.versions_root = join(root, "versions")
        self.champion_file = join(root, "champion.json")
        self.log_root = join(root, "promotions")

    # --- versions ---------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Published versions (those whose manifest is written), in number order."""
        published = {
            path.split("/")[0]
            for path in self.store.find(self.versions_root)
            if path.count("/") == 1 and path.endswith("/manifest.json")
        }
        return sorted((v for v in published if VERSION.fullmatch(v)), key=version_number)

    def _unknown(self, version: str) -> RegistryError:
        known = ", ".join(self.versions()) or "none"
        return RegistryError(f"no version {version!r} in {self.root} (versions: {known})")

    def version_dir(self, version: str) -> str:
        if not VERSION.fullmatch(version) or not self.store.exists(join(self.versions_root, version, "manifest.json")):
            raise self._unknown(version)
        return join(self.versions_root, version)

    def manifest(self, version: str) -> VersionManifest:
        if not VERSION.fullmatch(version):
            raise self._unknown(version)
        location = join(self.versions_root, version, "manifest.json")
        try:
            return VersionManifest.model_validate(self.store.read_json(location))
        except FileNotFoundError:
            raise self._unknown(version) from None
        except IntegrityError as exc:
            raise RegistryError(f"{exc}; the version's manifest is damaged") from exc
        except ValidationError as exc:
            errors = exc.errors()
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in errors[:4])
            more = f"; and {len(errors) - 4} more" if len(errors) > 4 else ""
            raise RegistryError(f"{location}: the version's manifest is damaged ({problems}{more})") from None

    def damaged_files(self, version: str) -> list[str]:
        """Files of `version` that are missing or no longer hash to its manifest (empty: intact)."""
        files = self.manifest(version).files
        folder = join(self.versions_root, version)
        damaged = []
        for name, digest in files.items():
            try:
                if self.store.sha256(join(folder, name)) != digest:
                    damaged.append(name)
            except FileNotFoundError:
                damaged.append(name)
        return damaged

    def file(self, version: str, name: str) -> StoredFile:
        """A file of `version` and the sha256 its manifest records for it."""
        files = self.manifest(version).files
        if name not in files:
            raise RegistryError(f"{version} has no {name}")
        return StoredFile(join(self.versions_root, version, name), files[name])

    def _claim_version(self, claimant: dict) -> str:
        """A new version number, claimed create-only: numbers another writer holds are skipped."""
        taken = [version_number(n) for n in self.store.listdir(self.versions_root) if VERSION.fullmatch(n)]
        number = max(taken, default=0) + 1
        while True:
            version = f"v{number:04d}"
            try:
                self.store.create(join(self.versions_root, version, "claim.json"), json.dumps(claimant).encode())
                return version
            except PreconditionFailed:
                number += 1

    def register(
        self,
        files: dict[str, StoredFile],
        manifest: RunManifest,
        *,
        floor: float,
        tolerance: float,
        force: bool = False,
        model_card: Callable[[VersionManifest], str] | None = None,
    ) -> Registered:
        """Publish a new version of `files` (each verified against its sha256); promote it if it passes the gate.

        `model_card` turns the version's final manifest (with its number and verdict) into markdown.
        """
        current = self.champion_record()  # first: a damaged pointer stops the registration before a number is taken
        version = self._claim_version({"flow_run_id": manifest.flow_run_id, "claimed_at": _now()})
        decision = self._gate(manifest, current, floor=floor, tolerance=tolerance, force=force)
        folder = join(self.versions_root, version)
        hashes = {}
        for name, file in files.items():
            # Checked against the hash the run recorded, before and after the copy: what was
            # evaluated is what is kept.
            stored = join(folder, name)
            self.store.put_file(self.store.local_copy(file), stored)
            if (found := self.store.sha256(stored)) != file.sha256:
                raise IntegrityError(f"{stored}: the copy hashes to {found}, not the recorded {file.sha256}")
            hashes[name] = file.sha256
        record = VersionManifest.model_validate(
            {**manifest.to_json(), "version": version, "registered_at": _now(), "gate": asdict(decision)}
        )
        if model_card:
            card = model_card(record).encode()
            self.store.write_bytes(join(folder, "model_card.md"), card)
            hashes["model_card.md"] = hashlib.sha256(card).hexdigest()
        record = record.model_copy(update={"files": dict(sorted(hashes.items()))})
        self.store.create(join(folder, "manifest.json"), json.dumps(record.to_json(), indent=1).encode())
        return self._promote_if_passed(version, record, decision, force)

    def promote_registered(self, version: str, *, floor: float, tolerance: float) -> Registered:
        """Gate again a version that passed but never became champion (its run stopped before the
        champion moved, or another version won the race), against today's champion; promote it if it passes."""
        if damaged := self.damaged_files(version):
            raise RegistryError(f"{version} is damaged ({', '.join(damaged)}); not promoting it")
        record = self.manifest(version)
        decision = self._gate(record, self.champion_record(), floor=floor, tolerance=tolerance)
        return self._promote_if_passed(version, record, decision, force=False)

    def _gate(self, record: RunManifest, current: dict | None, **gate: Any) -> Decision:
        """The gate's verdict on the candidate `record` (a manifest) against the champion record `current`
        and the best of the champions before it (those a rollback has not taken back)."""
        if current is None:
            return decide(record.metrics.test_accuracy, record.data.test_set, None, **gate)
        earlier = []
        for version in current["previous"]:
            with contextlib.suppress(RegistryError):  # a version deleted since: no longer a yardstick
                earlier.append(self.manifest(version))
        best = max(earlier, key=lambda m: m.metrics.test_accuracy, default=None)
        champion = self.manifest(current["version"])
        return decide(record.metrics.test_accuracy, record.data.test_set, champion, best=best, **gate)

    def _promote_if_passed(self, version: str, record: VersionManifest, decision: Decision, force: bool) -> Registered:
        if not decision.passed:
            return Registered(version, decision, False, decision.champion_version)
        try:
            self._move_champion(lambda current: self._promotion(current, version, record, decision, force))
        except _Declined as declined:
            return Registered(version, declined.decision, False, self.champion())
        return Registered(version, decision, True, version)

    def _promotion(
        self, current: dict | None, version: str, record: VersionManifest, decision: Decision, force: bool
    ) -> dict:
        """The champion record that makes `version` champion, if it still passes against `current`."""
        in_service = current["version"] if current else None
        if in_service != decision.champion_version and not force:
            # Another version was promoted since the gate ran: the candidate must beat that one.
            decision = self._gate(record, current, floor=decision.floor, tolerance=decision.tolerance)
            if not decision.passed:
                raise _Declined(decision)
        return _next_record(current, version, decision.reason, "promote", record.files[MODEL])

    # --- the champion -----------------------------------------------------------------------------

    def _read_champion(self, *, damaged_ok: bool = False) -> tuple[dict | None, str | None]:
        """The champion record and its etag; (None, None) before the first promotion.

        A damaged pointer raises, or with `damaged_ok` reads as no champion, with the etag to replace it by.
        """
        found = self.store.read_versioned(self.champion_file)
        if found is None:
            return None, None
        data, etag = found
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not VERSION.fullmatch(str(record.get("version"))):
                raise ValueError("no version in it")
        except ValueError as exc:
            if damaged_ok:
                return None, etag
            raise RegistryError(
                f"{self.champion_file}: the champion pointer is damaged ({exc}); `fashion-mnist repair-champion` "
                "restores it from the audit log, `fashion-mnist promote VERSION` replaces it"
            ) from exc
        return record, etag

    def champion_record(self) -> dict | None:
        return self._read_champion()[0]

    def champion(self) -> str | None:
        record = self.champion_record()
        return record["version"] if record else None

    def _move_champion(self, change: Callable[[dict | None], dict], *, repair: bool = False) -> dict:
        """Compare-and-swap the champion pointer to `change(current)`; re-read and retry when another wins.

        `repair`: a damaged pointer is replaced instead of refused (an operator's promote).
        """
        for attempt in range(CHAMPION_MOVE_ATTEMPTS):
            current, etag = self._read_champion(damaged_ok=repair)
            if current:
                self._log(current)  # its writer may have died before logging it
            new = change(current)
            if current is None:
                new["sequence"] = max((e["sequence"] for e in self.promotions()), default=0) + 1
            try:
                self.store.replace(self.champion_file, json.dumps(new, indent=1).encode(), etag)
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # spread the retries of racing writers
                continue
            self._log(new)
            return new
        raise RegistryError(f"{self.champion_file}: still changing after {CHAMPION_MOVE_ATTEMPTS} attempts; try again")

    def _log(self, record: dict) -> None:
        if "sequence" not in record:
            return  # a pointer from before the audit log had sequence numbers
        entry = {k: record.get(k) for k in ("sequence", "at", "event", "version", "replaced", "reason", "model_sha256")}
        with contextlib.suppress(PreconditionFailed):  # logged already, by its writer or by a reader before us
            self.store.create(join(self.log_root, f"{record['sequence']:08d}.json"), json.dumps(entry).encode())

    def promotions(self) -> list[dict]:
        """Every champion change, in order (the audit log)."""
        return [self.store.read_json(join(self.log_root, name)) for name in self.store.listdir(self.log_root)]

    def _vouched_model(self, version: str) -> str:
        """The sha256 of `version`'s model, once its files verify and its model is the one it was
        champion with before (if ever): an edited model with an edited manifest is refused."""
        if damaged := self.damaged_files(version):
            raise RegistryError(f"{version} is damaged ({', '.join(damaged)})")
        model = self.manifest(version).files[MODEL]
        for entry in self.promotions():
            if entry["version"] == version and entry.get("model_sha256") not in (None, model):
                raise RegistryError(
                    f"{version}'s model hashes to {model}, not the {entry['model_sha256']} it was champion with "
                    f"(promotions/{entry['sequence']:08d}.json): its files were replaced"
                )
        return model

    def promote(self, version: str, reason: str) -> None:
        """Make `version` the champion by hand, if its files are intact (this also replaces a damaged pointer)."""
        try:
            model = self._vouched_model(version)
        except RegistryError as exc:
            raise RegistryError(f"refusing to promote {version}: {exc}") from exc

        def promotion(current: dict | None) -> dict:
            if current and current["version"] == version:
                raise RegistryError(f"{version} is already the champion")
            return _next_record(current, version, reason, "promote", model)

        self._move_champion(promotion, repair=True)

    def rollback(self, reason: str = "rolled back by the operator") -> str:
        """Make the previous champion the champion again, checked as `promote` checks; return its version."""

        def rollback(current: dict | None) -> dict:
            if not current or not current["previous"]:
                raise RegistryError("there is no earlier champion to roll back to")
            previous = current["previous"][-1]
            try:
                model = self._vouched_model(previous)
            except RegistryError as exc:
                raise RegistryError(f"cannot roll back to {previous}: {exc}") from exc
            return _next_record(current, previous, reason, "rollback", model)

        return self._move_champion(rollback)["version"]

    def repair_champion(self) -> dict:
        """Rewrite a damaged or missing champion pointer from the audit log's last entry; return it."""
        record, etag = self._read_champion(damaged_ok=True)
        if record is not None:
            raise RegistryError(f"{self.champion_file} is intact (champion {record['version']}); nothing to repair")
        entries = self.promotions()
        if not entries:
            raise RegistryError(f"no audit log in {self.log_root} to restore the champion pointer from")
        previous: list[str] = []
        for entry in entries:  # replayed as _next_record built each pointer
            if entry["event"] == "rollback":
                previous = previous[:-1]
            else:
                previous = [*previous, entry["replaced"]] if entry["replaced"] else []
        last = entries[-1]
        model = last.get("model_sha256") or self._vouched_model(last["version"])
        record = {**last, "previous": previous, "model_sha256": model}
        self.store.replace(self.champion_file, json.dumps(record, indent=1).encode(), etag)
        return record

    def prior_version(self, fingerprint: str) -> VersionManifest | None:
        """The manifest of the newest of the last `FINGERPRINT_SCAN` versions made from exactly this data,
        code and parameters."""
        for version in reversed(self.versions()[-FINGERPRINT_SCAN:]):
            if (manifest := self.manifest(version)).fingerprint == fingerprint:
                return manifest
        return None

    def ever_champion(self) -> set[str]:
        """Every version that has been champion (the audit log, and the pointer)."""
        return {e["version"] for e in self.promotions()} | ({self.champion()} - {None})

    def champion_model(self, record: dict | None = None) -> StoredFile:
        """The champion's model file and the sha256 it was put in service with (of the champion record
        `record`, read from the pointer when not given)."""
        record = record or self.champion_record()
        if record is None:
            raise RegistryError(f"no champion in {self.root}: no version has been promoted yet")
        version = record["version"]
        model = self.file(version, MODEL)
        promoted = record.get("model_sha256", model.sha256)  # pointers from before it was recorded
        if model.sha256 != promoted:
            raise RegistryError(
                f"{version}'s manifest records model sha256 {model.sha256}, but it was made champion with "
                f"{promoted}: its files were replaced; promote a version that verifies"
            )
        return model


def _next_record(current: dict | None, version: str, reason: str, event: str, model_sha256: str) -> dict[str, Any]:
    """The champion record after `event` makes `version` champion; `previous` lists earlier champions.

    `model_sha256` is the model put in service: loading the champion checks the file against it, so
    a model and manifest edited together in the version's folder are still refused.
    """
    if current is None:
        previous: list[str] = []
    elif event == "rollback":
        previous = current["previous"][:-1]
    else:
        previous = [*current["previous"], current["version"]]
    return {
        "sequence": current.get("sequence", 0) + 1 if current else 1,
        "version": version,
        "at": _now(),
        "event": event,
        "replaced": current["version"] if current else None,
        "reason": reason,
        "previous": previous,
        "model_sha256": model_sha256,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
