"""The registry's invariants under random histories (hypothesis stateful testing), on disk and in SeaweedFS.

Random sequences of registrations, promotions, rollbacks and repairs, with a crash at any write of a
registration or a promotion, and files deleted, torn, restored from an older copy or added anywhere in
the registry. After every step:
- no version number is issued twice, and each is above every number issued before it;
- the champion's model verifies, or the registry says it is damaged and names the repair;
- the audit log runs 1, 2, ... with no gap, and holds every champion change exactly once (the one a
  crash left unlogged is logged by the next change);
- an interrupted change leaves the champion as it was before the change or as it would be after it.

`make test` runs a few examples per store (FMNIST_STATE_EXAMPLES), `make test-slow` many more;
FMNIST_STATE_RANDOM=1 draws new histories instead of the same ones every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from fmnist.registry.log_repair import repair_champion, repair_log
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import IntegrityError, Store, StoredFile, join
from tests.helpers import GATE, run_manifest

EXAMPLES = int(os.environ.get("FMNIST_STATE_EXAMPLES", "8"))  # per store, in make test (about 25 s in a bucket)
SLOW_EXAMPLES = 300  # per store, in make test-slow
# What a refusal must say: which repair to run, or what is damaged and where.
REPAIRS = (
    "repair-champion",
    "repair-log",
    "promote VERSION",
    "restore",
    "damaged",
    "no version",
    "no champion",
    "already the",
)


FIELDS = ("sequence", "event", "version", "replaced", "model_sha256")  # what a restored log entry must get right


class Crash(Exception):
    """The process died at this write."""


class CrashingStore(Store):
    """A store whose `crash_at`-th write (counted from 1) dies before it is made."""

    def __init__(self, store: Store, crash_at: int) -> None:
        super().__init__(scratch=store.scratch, timeout_s=store.timeout_s)
        self.crash_at = crash_at
        self.writes = 0

    def _write(self) -> None:
        self.writes += 1
        if self.writes == self.crash_at:
            raise Crash(f"crashed at write {self.writes}")

    def create(self, location: str, data: bytes) -> None:
        self._write()
        super().create(location, data)

    def replace(self, location: str, data: bytes, etag: str | None) -> None:
        self._write()
        super().replace(location, data, etag)

    def write_bytes(self, location: str, data: bytes) -> None:
        self._write()
        super().write_bytes(location, data)

    def put_file(self, local: Path, location: str) -> None:
        self._write()
        super().put_file(local, location)


def refusal_names_a_repair(exc: RegistryError) -> bool:
    return any(hint in str(exc) for hint in REPAIRS)


def machine_for(store: Store, new_root) -> type[RuleBasedStateMachine]:
    class RegistryStates(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.registry = Registry(store, new_root())
            self.issued: list[str] = []
            self.damage: dict[str, bytes | None] = {}  # location -> what it held before (None: nothing)
            self.damaged_with: dict[str, bytes | None] = {}  # location -> what the damage left there
            self.pointer_backups: list[bytes] = []
            self.runs = 0

        # --- the operations -------------------------------------------------------------------

        def _register(self, registry: Registry, accuracy: float):
            self.runs += 1
            tag = f"run-{self.runs}"
            files = {}
            for name in ("model.keras", "metrics.json"):
                data = f"{name} of {tag}".encode()
                location = join(self.registry.root, "runs", tag, name)
                store.write_bytes(location, data)
                files[name] = StoredFile(location, hashlib.sha256(data).hexdigest())
            return registry.register(files, run_manifest(accuracy), GATE)

        def _attempt(self, action):
            """Run `action`; a refusal is allowed only while damage is outstanding, and must name a repair."""
            try:
                return action()
            except RegistryError as exc:
                assert refusal_names_a_repair(exc), f"a refusal that names no repair: {exc}"
                return None

        @rule(accuracy=st.sampled_from([0.70, 0.82, 0.85, 0.88, 0.90]))
        def register(self, accuracy: float) -> None:
            registered = self._attempt(lambda: self._register(self.registry, accuracy))
            claimed = self._issue_claims()
            if registered is None:
                assert not claimed, f"a refused registration claimed {claimed}"
                return
            if registered.version not in claimed:
                self._issue(registered.version)
            if registered.promoted:
                assert self.registry.champion() == registered.version

        @rule(accuracy=st.sampled_from([0.85, 0.90]), crash_at=st.integers(1, 9))
        def register_and_crash(self, accuracy: float, crash_at: int) -> None:
            before = self._champion_or_none()
            crashing = Registry(CrashingStore(store, crash_at), self.registry.root)
            try:
                registered = self._attempt(lambda: self._register(crashing, accuracy))
            except Crash:
                registered = None
            claimed = self._issue_claims()  # a number claimed before the crash is issued, if never published
            assert len(claimed) <= 1
            if registered is not None and registered.version not in claimed:
                self._issue(registered.version)
            after = self._champion_or_none()
            assert after in {before, *claimed, registered.version if registered else before}

        @rule(data=st.data())
        def promote(self, data: st.DataObject) -> None:
            if self.issued:
                version = data.draw(st.sampled_from(self.issued))
                self._attempt(lambda: self.registry.promote(version, "by the machine"))

        @rule(data=st.data(), crash_at=st.integers(1, 3))
        def promote_and_crash(self, data: st.DataObject, crash_at: int) -> None:
            """Writes of a promotion: the log entry its predecessor's writer left out, the pointer, its log entry."""
            if not self.issued:
                return
            version = data.draw(st.sampled_from(self.issued))
            before = self._champion_or_none()
            crashing = Registry(CrashingStore(store, crash_at), self.registry.root)
            with contextlib.suppress(Crash):
                self._attempt(lambda: crashing.promote(version, "by the machine"))
            assert self._champion_or_none() in {before, version}

        @rule()
        def rollback(self) -> None:
            try:
                self.registry.rollback()
            except RegistryError as exc:
                assert (
                    refusal_names_a_repair(exc) or "no earlier champion" in str(exc) or "cannot roll back" in str(exc)
                )

        @rule()
        def repair(self) -> None:
            try:
                record = repair_champion(self.registry)
            except RegistryError as exc:
                assert "nothing to repair" in str(exc) or refusal_names_a_repair(exc), str(exc)
                return
            assert record["version"] in self.issued
            self.pointer_backups.clear()  # a repaired pointer is rewritten: its older copies are not older by bytes

        @rule()
        def repair_log(self) -> None:
            """Restores lost log entries from the evidence: each one restored unacknowledged is the change lost."""
            try:
                written = repair_log(self.registry)
            except RegistryError as exc:
                assert "nothing to repair" in str(exc) or refusal_names_a_repair(exc), str(exc)
                return
            for restored in written:
                location = join(self.registry.log_root, f"{restored['sequence']:08d}.json")
                if (original := self.damage.get(location)) is not None:
                    lost = json.loads(original)
                    assert [restored[k] for k in FIELDS] == [lost[k] for k in FIELDS], (restored, lost)
                    self.damage.pop(location)
                    self.damaged_with.pop(location)

        # --- damage ----------------------------------------------------------------------------

        def _damage(self, location: str, new: bytes | None) -> None:
            current = found[0] if (found := store.read_versioned(location)) else None
            if location not in self.damage or current != self.damaged_with[location]:
                self.damage[location] = current  # what a good change left there since is the original now
            self.damaged_with[location] = new
            if new is None:
                store.delete(location)
            else:
                store.write_bytes(location, new)

        @rule()
        def back_up_the_pointer(self) -> None:
            if found := store.read_versioned(self.registry.champion_file):
                self.pointer_backups.append(found[0])

        @rule(kind=st.sampled_from(["delete", "tear", "restore-older"]))
        def damage_the_pointer(self, kind: str) -> None:
            found = store.read_versioned(self.registry.champion_file)
            if kind == "delete" and found:
                self._damage(self.registry.champion_file, None)
            elif kind == "tear" and found:
                self._damage(self.registry.champion_file, found[0][: len(found[0]) // 2])
            elif kind == "restore-older" and self.pointer_backups and found and self.pointer_backups[0] != found[0]:
                self._damage(self.registry.champion_file, self.pointer_backups[0])

        @rule(kind=st.sampled_from(["stray", "tear", "delete"]), data=st.data())
        def damage_the_log(self, kind: str, data: st.DataObject) -> None:
            root = self.registry.log_root
            if kind == "stray":
                self._damage(join(root, f".part-{uuid.uuid4().hex}-00000009.json"), b'{"seq')
                return
            entries = [n for n in store.listdir(root) if not n.startswith(".")]
            if entries:
                location = join(root, data.draw(st.sampled_from(entries)))
                self._damage(location, b'{"sequence": 1, "ver' if kind == "tear" else None)

        @rule(kind=st.sampled_from(["foreign-folder", "foreign-file", "tear-manifest", "swap-model"]), data=st.data())
        def damage_a_version(self, kind: str, data: st.DataObject) -> None:
            versions = self.registry.versions()
            if kind == "foreign-folder":
                self._damage(join(self.registry.versions_root, "v9x", "notes.txt"), b"not a version")
            elif kind == "foreign-file":
                self._damage(join(self.registry.versions_root, "README"), b"not a version")
            elif versions:
                version = data.draw(st.sampled_from(versions))
                name = "manifest.json" if kind == "tear-manifest" else "model.keras"
                self._damage(join(self.registry.versions_root, version, name), b"{torn or swapped")

        @precondition(lambda self: self.damage)
        @rule()
        def restore_from_backup(self) -> None:
            """The operator puts back what is still damaged (what a change or a repair rewrote since is left)."""
            for location, original in self.damage.items():
                found = store.read_versioned(location)
                if (found[0] if found else None) != self.damaged_with[location]:
                    continue
                if original is None:
                    store.delete(location)
                else:
                    store.write_bytes(location, original)
            self.damage.clear()
            self.damaged_with.clear()

        # --- the invariants ------------------------------------------------------------------------

        def _issue(self, version: str) -> None:
            assert version not in self.issued, f"{version} issued twice"
            number = int(version[1:])
            assert all(int(v[1:]) < number for v in self.issued), f"{version} is not above {self.issued}"
            self.issued.append(version)

        def _issue_claims(self) -> list[str]:
            """The numbers claimed since the last look, in order, each checked as it is issued."""
            names = {n.removesuffix(".json") for n in store.listdir(join(self.registry.root, "claims"))}
            claimed = sorted(names - set(self.issued))
            for version in claimed:
                self._issue(version)
            return claimed

        def _champion_or_none(self) -> str | None:
            try:
                return self.registry.champion()
            except RegistryError:
                return "damaged"

        @invariant()
        def the_champion_verifies_or_the_damage_is_named(self) -> None:
            try:
                model = self.registry.champion_model()
                store.local_copy(model)  # hashes to what the champion was promoted with
            except RegistryError as exc:
                assert refusal_names_a_repair(exc), str(exc)
                assert self.damage or "no champion" in str(exc), f"damage reported with none made: {exc}"
            except (IntegrityError, FileNotFoundError):
                assert self.damage, "the champion's model is missing or changed with no damage made"

        @invariant()
        def the_audit_log_is_whole_and_matches_the_pointer(self) -> None:
            if self.damage:
                return
            entries = self.registry.promotions()
            assert [e["sequence"] for e in entries] == list(range(1, len(entries) + 1))
            record = self.registry.champion_record()
            if record is not None:
                assert record["sequence"] in (len(entries), len(entries) + 1)  # +1: its writer crashed first
                assert record["version"] in self.issued
            assert all(e["version"] in self.issued for e in entries)

    return RegistryStates


def run_machine(store: Store, base: str, examples: int) -> None:
    def new_root() -> str:
        return join(base, uuid.uuid4().hex[:12])

    run_state_machine_as_test(
        machine_for(store, new_root),
        settings=settings(
            max_examples=examples,
            stateful_step_count=25,
            deadline=None,
            # The same histories in every run (a failure comes back when run again), unless asked otherwise.
            derandomize=os.environ.get("FMNIST_STATE_RANDOM") is None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )


def test_registry_invariants_hold_under_random_histories(root: str, store: Store) -> None:
    run_machine(store, root, EXAMPLES)


@pytest.mark.slow
def test_registry_invariants_hold_under_many_random_histories(root: str, store: Store) -> None:
    run_machine(store, root, SLOW_EXAMPLES)


def test_the_machine_catches_a_registry_that_reissues_numbers(tmp_path: Path, store: Store, monkeypatch) -> None:
    """The machine itself can fail: with numbers claimed from the folders listed now (the old way), deleting a
    version's folder reissues its number, and the machine says so."""
    monkeypatch.setattr(Registry, "_claim_version", _claim_from_the_listing)
    machine = machine_for(store, lambda: join(str(tmp_path), uuid.uuid4().hex[:12]))()
    machine.register(0.70)
    store.delete(join(machine.registry.versions_root, "v0001"))
    with pytest.raises(AssertionError, match="v0001 issued twice"):
        machine.register(0.70)


def _claim_from_the_listing(self: Registry, claimant: dict) -> str:
    names = [n for n in self.store.listdir(self.versions_root) if n.startswith("v")]
    version = f"v{max((int(n[1:]) for n in names), default=0) + 1:04d}"
    self.store.create(join(self.versions_root, version, "claim.json"), json.dumps(claimant).encode())
    return version


def test_a_crash_before_the_log_is_written_is_logged_by_the_next_change(tmp_path: Path, store: Store) -> None:
    machine = machine_for(store, lambda: join(str(tmp_path), "r"))()
    machine.register(0.85)
    # Writes of a registration: the store's conditional-write probe, two claims, two files, the
    # manifest, the pointer, then the log entry.
    machine.register_and_crash(0.90, crash_at=8)
    record = json.loads(store.read_bytes(machine.registry.champion_file))
    assert record["version"] == "v0002" and [e["sequence"] for e in machine.registry.promotions()] == [1]
    machine.the_audit_log_is_whole_and_matches_the_pointer()
    machine.register(0.90)
    assert [e["version"] for e in machine.registry.promotions()] == ["v0001", "v0002", "v0003"]
