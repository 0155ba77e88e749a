"""The model registry: immutable, self-describing versions and a champion pointer, on disk or in a bucket.

Layout under the registry root (`artifacts/` by default, or `s3://bucket/prefix`):

    versions/v0001/claim.json      the number's claim, written create-only: no two runs get one number
    versions/v0001/...             model.keras, metrics.json, history.json, *.png, model_card.md
    versions/v0001/manifest.json   lineage, metrics, the gate's verdict and every file's sha256; written
                                   create-only and last: a version folder without it does not exist
    champion.json                  the version in service; it moves only by compare-and-swap
    promotions/00000001.json       one create-only record per champion change, by sequence: the audit log
    runs/<run id>/                 each run's working folder (fmnist.training.run_folder)

No locks, so it works the same from many hosts on object storage: a version number is claimed by a
create-only write (a number another writer took is skipped); a version is published by the
create-only write of its manifest; the champion pointer moves by compare-and-swap (a writer that lost
reads the new champion and decides again); each change is logged once under its sequence number, by
the writer that made it or, if that one died first, by the next one to read it. A log or pointer that
lost records is repaired from what the registry still holds by `fmnist.registry.log_repair`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from fmnist.registry.audit import LOST, MAX_UNLOGGED
from fmnist.registry.gate import PromotionParams, decide
from fmnist.registry.manifest import Decision, RunManifest, VersionManifest
from fmnist.storage import IntegrityError, PreconditionFailed, Store, StoredFile, join
from fmnist.storage.layout import StorageParams

MODEL = "model.keras"
VERSION = re.compile(r"v(\d{4,})")  # v0001 ... v9999, v10000 ...: anything else in versions/ is ignored
CHAMPION_MOVE_ATTEMPTS = 50
CLAIM_ATTEMPTS = 100  # version numbers tried before a registration gives up, saying which
LOG_ENTRY = re.compile(r"(\d{8,})\.json")  # promotions/00000001.json; anything else there is not an entry
SHA256 = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_SCAN = 200  # versions searched for an earlier run of the same fingerprint, newest first
REPAIR_LOG = "`fashion-mnist repair-log`"
ACKNOWLEDGE = "--acknowledge-lost"
REPAIR_LOST = f"`fashion-mnist repair-log {ACKNOWLEDGE}`"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


class NotRegistered(RegistryError):
    """A version folder with a manifest that no registration made: no claim of its number, or a manifest
    naming another version (a folder copied in). It is never labeled, promoted, served or exported."""


@dataclass(frozen=True)
class Registered:
    """What a registration did: the version it published, the verdict that counted, the champion after."""

    version: str
    decision: Decision  # the gate at registration, or against a champion promoted meanwhile
    promoted: bool  # whether this version became champion
    champion: str | None
    canary: bool = False  # passed under the canary policy: to be served as the canary (`rollout.Rollouts.start`)


class _Declined(Exception):
    """A champion move that its writer no longer wants, having seen the pointer move under it (`canary`: the
    candidate still passes, but now that there is a champion the canary policy holds it back as a canary)."""

    def __init__(self, decision: Decision, *, canary: bool = False) -> None:
        self.decision = decision
        self.canary = canary


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
        self.claims_root = join(root, "claims")

    @classmethod
    def of(cls, storage: StorageParams) -> Registry:
        """The registry a run's storage names, through that storage's store."""
        return cls(storage.store(), storage.registry)

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
            record = VersionManifest.model_validate(self.store.read_json(location))
        except FileNotFoundError:
            raise self._unknown(version) from None
        except IntegrityError as exc:
            raise RegistryError(f"{exc}; the version's manifest is damaged") from exc
        except ValidationError as exc:
            errors = exc.errors()
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in errors[:4])
            more = f"; and {len(errors) - 4} more" if len(errors) > 4 else ""
            raise RegistryError(f"{location}: the version's manifest is damaged ({problems}{more})") from None
        self._check_registered(version, record)
        return record

    def _check_registered(self, version: str, record: VersionManifest) -> None:
        """NotRegistered unless a registration of this registry made `version`: its manifest names its own
        folder, and this registry's claim of its number, `claims/vNNNN.json`, exists (the same bytes as the
        folder's `claim.json` where both are there). A version from before `claims/` (its `claim.json`
        names no version, or it has none) counts if it is numbered below every claim there. Every reader of
        a version (label, promote, serve, export, the gate) passes here."""
        folder = join(self.versions_root, version)
        claim = join(self.claims_root, f"{version}.json")
        problem = None
        if record.version != version:
            problem = f"its manifest names {record.version!r}, not {version!r}"
        else:
            outer = self._read(claim)
            inner = self._read(join(folder, "claim.json"))
            if outer is not None:
                if inner is not None and inner[0] != outer[0]:
                    problem = f"its claim.json is not this registry's claim of {version} ({claim} holds other bytes)"
            elif not self._from_before_claims(version, inner):
                problem = f"no claim of {version} in this registry ({claim} is missing)"
        if problem:
            raise NotRegistered(
                f"{folder} is not a registered version: {problem}; no registration of this registry made it (a "
                "folder copied in?), so it is never labeled, promoted, served or exported. `fashion-mnist versions` "
                "lists the registered versions; `fashion-mnist promote VERSION` replaces it where it is champion, "
                "`fashion-mnist label NAME --clear` where it is labeled; delete the folder to be rid of it"
            )

    def _from_before_claims(self, version: str, inner: tuple[bytes, str] | None) -> bool:
        """Whether `version` was registered before `claims/` was written: its `claim.json` is a claim of that
        time (a JSON object with no version and no token), or it has none (before claim files), and every
        number in `claims/` is above it (claims are taken above every number there is)."""
        if inner is not None:
            try:
                old = _parsed(inner[0])
            except ValueError:
                return False
            if not isinstance(old, dict) or {"version", "token"} & old.keys():
                return False
        claims = [n.removesuffix(".json") for n in self.store.listdir(self.claims_root)]
        return all(version_number(n) > version_number(version) for n in claims if VERSION.fullmatch(n))

    def _read(self, location: str) -> tuple[bytes, str] | None:
        """The registry file at `location` and its etag (None: there is none); a folder where the file
        should be raises, naming it (read as missing, it is a dead end: no write can replace it)."""
        try:
            found = self.store.read_versioned(location)
        except Exception:  # what a backend makes of a folder (s3fs: an object with no etag) is its own
            if not self.store.is_dir(location):
                raise
            found = None
        if found is None:
            self.refuse_folder(location)
        return found

    def refuse_folder(self, location: str) -> None:
        """Raise, naming it, if a folder is where the registry keeps the file `location`: read as missing,
        it is a dead end (no write can replace it)."""
        if self.store.is_dir(location):
            raise RegistryError(
                f"{location} is a folder where the registry keeps a file: rename it out of the way (or remove "
                "it, once what it holds is saved), then run the command again"
            )

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
        """A new version number, claimed create-only, above every number ever claimed or in service.

        A claim is written twice, `claims/vNNNN.json` then `versions/vNNNN/claim.json`, and the next
        number is derived from both folders and the champion chain, so deleting a version's folder (or
        one claim) never makes its number free again. The claim carries a token of this writer's own:
        a create that meets its own bytes after a lost acknowledgement is this writer's claim.
        """
        self.store.require_conditional_writes(self.root)
        token = uuid.uuid4().hex
        number = self._highest_number() + 1
        tried = []
        for _ in range(CLAIM_ATTEMPTS):
            version = f"v{number:04d}"
            tried.append(version)
            claim = json.dumps({**claimant, "version": version, "token": token}).encode()
            try:
                self.store.create(join(self.claims_root, f"{version}.json"), claim)
                self.store.create(join(self.versions_root, version, "claim.json"), claim)
                return version
            except PreconditionFailed:
                number += 1  # another writer's (or one left by a crash): never reused
        raise RegistryError(
            f"{self.root}: no version number could be claimed after {CLAIM_ATTEMPTS} attempts "
            f"({tried[0]} to {tried[-1]} were taken); are other runs registering at this very moment?"
        )

    def _highest_number(self) -> int:
        """The highest version number claimed, published or named by the champion chain."""
        names = self.store.listdir(self.versions_root)
        names += [n.removesuffix(".json") for n in self.store.listdir(self.claims_root)]
        if record := self._read_champion(damaged_ok=True)[0]:
            names += [record["version"], *record["previous"]]
        return max((version_number(n) for n in names if VERSION.fullmatch(n)), default=0)

    def register(
        self,
        files: dict[str, StoredFile],
        manifest: RunManifest,
        gate: PromotionParams,
        *,
        model_card: Callable[[VersionManifest], str] | None = None,
    ) -> Registered:
        """Publish a new version of `files` (each verified against its sha256); promote it if it passes the gate.

        `model_card` turns the version's final manifest (with its number and verdict) into markdown.
        """
        # First the champion and the gate: damage stops the registration before a number is taken.
        current = self.champion_record()
        decision = self._gate(manifest, current, gate)
        # The champion change the claim saw: evidence, if the pointer and the log are ever both lost,
        # that the registry had a champion (see `_history_evidence`).
        seen = {"champion": current["version"] if current else None, "champion_sequence": _sequence_of(current)}
        version = self._claim_version({"flow_run_id": manifest.flow_run_id, "claimed_at": _now(), **seen})
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
        return self._promote_if_passed(version, record, decision, gate)

    def promote_registered(self, version: str, gate: PromotionParams) -> Registered:
        """Gate again a version that passed but never became champion (its run stopped before the
        champion moved, or another version won the race), against today's champion; promote it if it passes
        (never by force: that was the first run's decision to make). A version whose canary rollout ended
        without promoting it is refused: only the operator puts it in service."""
        from fmnist.registry.rollout import Rollouts  # it builds on this module

        if ended := Rollouts(self).ended_without_promotion(version):
            raise RegistryError(
                f"{version} was {ended}; the gate does not promote it again: `fashion-mnist promote {version}` "
                "does, by hand"
            )
        if damaged := self.damaged_files(version):
            raise RegistryError(f"{version} is damaged ({', '.join(damaged)}); not promoting it")
        record = self.manifest(version)
        gate = gate.model_copy(update={"force": False})
        decision = self._gate(record, self.champion_record(), gate)
        return self._promote_if_passed(version, record, decision, gate)

    def _gate(self, record: RunManifest, current: dict | None, gate: PromotionParams) -> Decision:
        """The gate's verdict on the candidate `record` (a manifest) against the champion record `current`
        and the best of the champions before it (those a rollback has not taken back)."""
        if current is None:
            return decide(record.metrics.test_accuracy, record.data.test_set, None, gate)
        earlier = []
        for version in current["previous"]:
            with contextlib.suppress(RegistryError):  # a version deleted since: no longer a yardstick
                earlier.append(self.manifest(version))
        best = max(earlier, key=lambda m: m.metrics.test_accuracy, default=None)
        champion = self.manifest(current["version"])
        return decide(record.metrics.test_accuracy, record.data.test_set, champion, gate, best=best)

    def _promote_if_passed(
        self, version: str, record: VersionManifest, decision: Decision, gate: PromotionParams
    ) -> Registered:
        if not decision.passed:
            return Registered(version, decision, False, decision.champion_version)
        if _held_as_canary(gate, decision.champion_version):
            return Registered(version, decision, False, decision.champion_version, canary=True)
        try:
            self._move_champion(lambda current: self._promotion(current, version, record, decision, gate))
        except _Declined as declined:
            return Registered(version, declined.decision, False, self.champion(), canary=declined.canary)
        return Registered(version, decision, True, version)

    def _promotion(
        self, current: dict | None, version: str, record: VersionManifest, decision: Decision, gate: PromotionParams
    ) -> dict:
        """The champion record that makes `version` champion, if it still passes against `current`."""
        in_service = current["version"] if current else None
        if in_service != decision.champion_version and not gate.force:
            # Another version was promoted since the gate ran: the candidate must beat that one.
            decision = self._gate(record, current, gate)
            if not decision.passed or _held_as_canary(gate, in_service):
                raise _Declined(decision, canary=decision.passed)
        return _next_record(current, version, decision.reason, "promote", record.files[MODEL])

    # --- the champion -----------------------------------------------------------------------------

    def _read_champion(self, *, damaged_ok: bool = False) -> tuple[dict | None, str | None]:
        """The champion pointer's record as written, and its etag; (None, None) if there is none.

        A pointer that is not a record raises, or with `damaged_ok` reads as none, with the etag to replace it by.
        """
        found = self._read(self.champion_file)
        if found is None:
            return None, None
        data, etag = found
        try:
            record = _pointer(_parsed(data))
        except ValueError as exc:
            if damaged_ok:
                return None, etag
            raise self._damaged(f"the champion pointer is damaged ({exc})") from None
        return record, etag

    def _damaged(self, problem: str) -> RegistryError:
        return RegistryError(
            f"{self.champion_file}: {problem}; `fashion-mnist repair-champion` restores it from the audit log "
            f"({self.log_root}), `fashion-mnist promote VERSION` replaces it"
        )

    def _state(self) -> tuple[dict | None, str | None, int]:
        """The champion record, its etag and the audit log's last sequence number, checked together.

        The pointer must be the log's last change, or the one change after it whose writer has not
        logged it yet. A pointer behind the log (restored from an older copy), beside it (edited), or a
        missing pointer while the log records changes, is damage: it raises, naming the repair.
        """
        for _ in range(CHAMPION_MOVE_ATTEMPTS):
            record, etag = self._read_champion()
            # Listed after the pointer was read: every change before the one read is logged by then.
            last = self._last_sequence()
            if record is None:
                if last and self.store.read_versioned(self.champion_file) is not None:
                    continue  # the first champion was set (and logged) since the pointer was read
                if last:
                    raise self._damaged(f"missing, though the audit log records {last} champion changes")
                if evidence := self._history_evidence():
                    raise RegistryError(
                        f"{self.champion_file} and the audit log ({self.log_root}) are both missing, but the "
                        f"registry had a champion ({evidence[0]}): it is not empty, and no version is taken for a "
                        f"first one. {REPAIR_LOST} records the lost changes in the log; then "
                        "`fashion-mnist promote VERSION` names the champion"
                    )
                return None, None, 0
            sequence = record.get("sequence")
            if sequence is None:  # a pointer from before the audit log
                if last:
                    raise self._damaged("it has no sequence number, though the audit log records changes")
                return record, etag, 0
            if sequence == last + 1 or (sequence == last and _entry(self._logged_entry(sequence)) == _entry(record)):
                return record, etag, last
            if self._beyond(sequence, last):
                raise self._damaged(f"it is change {sequence}, beyond any the audit log of {last} changes can lead to")
            if sequence > last + 1:
                raise RegistryError(
                    f"{self.champion_file}: it is change {sequence}, but the audit log ({self.log_root}) ends at "
                    f"change {last}: entries are missing; {REPAIR_LOG} restores them from the pointer, the entries "
                    "around them and the versions' claims and manifests"
                )
            if (now := self.store.read_versioned(self.champion_file)) is None or now[1] != etag:
                continue  # moved since it was read: check the new one
            raise self._damaged(
                f"it is change {sequence} ({record['version']}), but the audit log records "
                + (f"change {sequence} differently" if sequence == last else f"changes up to {last}")
                + ": it was restored from an older copy or edited"
            )
        raise RegistryError(f"{self.champion_file}: still changing after {CHAMPION_MOVE_ATTEMPTS} reads; try again")

    def champion_record(self) -> dict | None:
        """The champion's record, checked against the audit log (see `_state`); None before the first promotion."""
        return self._state()[0]

    def champion(self) -> str | None:
        record = self.champion_record()
        return record["version"] if record else None

    def _move_champion(self, change: Callable[[dict | None], dict], *, repair: bool = False) -> dict:
        """Compare-and-swap the champion pointer to `change(current)`; re-read and retry when another wins.

        `repair`: a damaged pointer is replaced instead of refused (an operator's promote), and the
        change is made from the champion the audit log records.
        """
        self.store.require_conditional_writes(self.root)
        for attempt in range(CHAMPION_MOVE_ATTEMPTS):
            try:
                current, etag, last = self._state()
            except RegistryError:
                if not repair:
                    raise
                pointer, etag = self._read_champion(damaged_ok=True)
                current, last = self._replayed(), self._last_sequence()
                ahead = _sequence_of(pointer)
                if ahead > last + 1 and not self._beyond(ahead, last):
                    raise RegistryError(
                        f"{self.champion_file} is change {ahead} ({pointer['version']}), but the audit log "
                        f"({self.log_root}) ends at change {last}: the pointer is the evidence of the lost changes, "
                        f"and this change would overwrite it; {REPAIR_LOG} restores them first"
                    ) from None
                if current is None and (evidence := self._history_evidence()):
                    raise RegistryError(
                        f"the audit log ({self.log_root}) is empty, but the registry had a champion "
                        f"({evidence[0]}): {REPAIR_LOST} records the lost changes first, so that "
                        "this change does not start the history again"
                    ) from None
                if current is not None and current["version"] is None:
                    current = None  # the last change was lost: the new one replaces an unknown champion
            else:
                if current and current.get("sequence") == last + 1:
                    self._log(current)  # its writer may have died before logging it
                    last += 1
            new = change(current)
            # The token makes this writer's pointer its own: a write that meets these bytes was this one.
            new.update(sequence=last + 1, token=uuid.uuid4().hex)
            try:
                self.store.replace(self.champion_file, json.dumps(new, indent=1).encode(), etag)
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # spread the retries of racing writers
                continue
            self._log(new)
            return new
        raise RegistryError(f"{self.champion_file}: still changing after {CHAMPION_MOVE_ATTEMPTS} attempts; try again")

    def _log(self, record: dict) -> None:
        """Log the change `record` made under its sequence number, once: an entry already there must be it."""
        entry = _entry(record)
        location = join(self.log_root, f"{record['sequence']:08d}.json")
        try:
            self.store.create(location, json.dumps(entry).encode())
        except PreconditionFailed:  # logged already, by its writer or by a reader before us
            if _entry(self._logged_entry(record["sequence"])) != entry:
                raise self._damaged(f"the audit log records change {record['sequence']} otherwise") from None

    def _sequences(self) -> list[int]:
        """The audit log's sequence numbers, in order; names that are no entry (temporary files) are skipped.
        A number beyond any the log can have reached (`_beyond`) raises, naming the stray file."""
        numbers = sorted(int(m[1]) for n in self.store.listdir(self.log_root) if (m := LOG_ENTRY.fullmatch(n)))
        if numbers and self._beyond(numbers[-1], len(numbers)):
            stray = [n for n in numbers if self._beyond(n, len(numbers))]
            more = f" and {len(stray) - 1} more like it" if len(stray) > 1 else ""
            raise RegistryError(
                f"{join(self.log_root, f'{stray[0]:08d}.json')}{more}: change {stray[0]} is beyond any this registry "
                f"can have reached (its log holds {len(numbers)} entries, and at most {MAX_UNLOGGED} more changes "
                f"are ever restored as lost): a stray file, not an entry; move it out of {self.log_root}, then run "
                "the command again"
            )
        return numbers

    @staticmethod
    def _beyond(sequence: int, entries: int) -> bool:
        """Whether change `sequence` is beyond any a registry whose log holds `entries` entries can have
        reached: more than `MAX_UNLOGGED` changes past them is a stray or edited record, not lost entries."""
        return sequence > entries + MAX_UNLOGGED

    def _last_sequence(self) -> int:
        """The audit log's last sequence number (0: empty), once its numbers are checked to run 1, 2, ... on."""
        sequences = self._sequences()
        if missing := sorted(set(range(1, len(sequences) + 1)) - set(sequences)):
            raise RegistryError(
                f"{self.log_root}: the audit log misses change {missing[0]} ({len(missing)} missing in all): "
                f"{REPAIR_LOG} restores them from the champion pointer, the entries around them and the versions' "
                "claims and manifests (or restore them from a backup)"
            )
        return sequences[-1] if sequences else 0

    def _logged_entry(self, sequence: int) -> dict:
        location = join(self.log_root, f"{sequence:08d}.json")
        try:
            if (found := self._read(location)) is None:
                raise ValueError("missing")
            entry = _parsed(found[0])
            if not isinstance(entry, dict) or entry.get("sequence") != sequence:
                raise ValueError(f"not the record of change {sequence}")
            if entry.get("event") == LOST:  # restored by repair-log with what the evidence told, maybe no version
                _pointer({**entry, "version": entry.get("version") or "v0000"}, log=True)
            else:
                _pointer(entry, log=True)
        except ValueError as exc:
            raise RegistryError(
                f"{location}: a damaged audit log entry ({exc}); {REPAIR_LOG} restores it from the registry's "
                "evidence (or restore it from a backup)"
            ) from None
        return entry

    def promotions(self) -> list[dict]:
        """Every champion change, in order (the audit log); a damaged or missing entry raises, naming it."""
        return [self._logged_entry(sequence) for sequence in range(1, self._last_sequence() + 1)]

    def _replayed(self) -> dict | None:
        """The champion record the audit log leads to (as `_next_record` built each), or None if it is empty.

        After a change the log lost (`repair-log --acknowledge-lost`), no earlier champion is a rollback
        target; a lost last change with no version gives a record whose version is None."""
        entries = self.promotions()
        previous: list[str] = []
        for entry in entries:
            if entry["event"] == LOST:
                previous = []
            elif entry["event"] == "rollback":
                previous = previous[:-1]
            else:
                previous = [*previous, entry["replaced"]] if entry["replaced"] else []
        return {**_entry(entries[-1]), "previous": previous} if entries else None

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

    def _history_evidence(self) -> tuple[str, int] | None:
        """Why the registry must have had a champion, and the change it had reached at least; None if nothing
        says so. The newest claim records the champion its registration saw (`register`); a version gated
        against a champion names it in its manifest. What the last claim cannot know (changes after it, such
        as the first version's own promotion) leaves no evidence once the pointer and the log are both gone."""
        claims = [n.removesuffix(".json") for n in self.store.listdir(self.claims_root) if n.endswith(".json")]
        claims = sorted((n for n in claims if VERSION.fullmatch(n)), key=version_number)
        if claims:
            location = join(self.claims_root, f"{claims[-1]}.json")
            with contextlib.suppress(FileNotFoundError, IntegrityError):
                claim = self.store.read_json(location)
                if isinstance(claim, dict) and isinstance(claim.get("champion"), str):
                    sequence = claim.get("champion_sequence")
                    sequence = sequence if type(sequence) is int and sequence > 0 else 1
                    if self._beyond(sequence, entries := len(self._sequences())):
                        raise RegistryError(
                            f"{location}: its champion_sequence {sequence} is beyond any change this registry can "
                            f"have reached (its log holds {entries} entries, and at most {MAX_UNLOGGED} more changes "
                            f"are ever restored as lost): a stray or edited claim; move it out of {self.claims_root} "
                            f"(a {self.versions_root}/{claims[-1]} folder then counts for nothing: delete it too), "
                            "then run the command again"
                        )
                    return f"{location} was claimed while {claim['champion']} was champion, change {sequence}", sequence
        for version in reversed(self.versions()[-1:]):
            with contextlib.suppress(RegistryError):
                if gated := self.manifest(version).gate.champion_version:
                    return f"{version} was gated against champion {gated}", 1
        return None

    def prior_version(self, fingerprint: str) -> VersionManifest | None:
        """The manifest of the newest of the last `FINGERPRINT_SCAN` versions made from exactly this data,
        code and parameters."""
        for version in reversed(self.versions()[-FINGERPRINT_SCAN:]):
            try:
                manifest = self.manifest(version)
            except NotRegistered:  # a folder copied in: no run of this registry's
                continue
            if manifest.fingerprint == fingerprint:
                return manifest
        return None

    def ever_champion(self) -> set[str]:
        """Every version that has been champion (the audit log, and the pointer)."""
        return ({e["version"] for e in self.promotions()} | {self.champion()}) - {None}

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


def _held_as_canary(gate: PromotionParams, champion: str | None) -> bool:
    """Whether a version that passed `gate` becomes the canary rather than champion: under the canary policy,
    once there is a champion to compare it with on live traffic (the first version is promoted), and unless
    the operator forced the promotion."""
    return gate.rollout == "canary" and champion is not None and not gate.force


def _pointer(record: Any, *, log: bool = False) -> dict:
    """`record` if it is a champion pointer (or, with `log`, an audit log entry); else ValueError saying why.

    Fields that pointers from before them lack (`sequence`, `previous`, `model_sha256`) may be absent.
    """
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not isinstance(record.get("version"), str) or not VERSION.fullmatch(record["version"]):
        raise ValueError(f"no version in it (version: {record.get('version')!r})")
    sequence = record.get("sequence")
    if sequence is not None and (type(sequence) is not int or sequence < 1):
        raise ValueError(f"sequence {sequence!r} is not a number from 1")
    previous = record.setdefault("previous", []) if not log else []
    if not isinstance(previous, list) or not all(isinstance(v, str) and VERSION.fullmatch(v) for v in previous):
        raise ValueError("previous is not a list of versions")
    if (model := record.get("model_sha256")) is not None and not (isinstance(model, str) and SHA256.fullmatch(model)):
        raise ValueError("model_sha256 is not a sha256")
    for name in ("event", "replaced", "reason", "at"):
        if (value := record.get(name)) is not None and not isinstance(value, str):
            raise ValueError(f"{name} is not text")
    return record


def _parsed(data: bytes) -> Any:
    """`data` as JSON, or ValueError saying why not (a nesting too deep to parse included): every registry
    file read with its etag goes through here, as `Store.read_json` does for the others."""
    try:
        return Store.parse_json(data, "")
    except IntegrityError as exc:
        raise ValueError(str(exc).removeprefix(": ")) from None


def _sequence_of(record: dict | None) -> int:
    return (record.get("sequence") or 0) if record else 0


def _entry(record: dict) -> dict:
    """The audit log entry of the change that made the champion record `record`."""
    return {k: record.get(k) for k in ("sequence", "at", "event", "version", "replaced", "reason", "model_sha256")}


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
