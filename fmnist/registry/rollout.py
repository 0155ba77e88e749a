"""Canary rollouts: a version that passed the offline gate earns the champion's traffic on live evidence.

Under the canary policy (`PromotionParams.rollout`) a version that passes while a champion exists is
labeled `canary` and its rollout recorded as started; the judge (or an operator) then decides it once:

    rollouts/v0007/started.json   the version, when, the champion then, the gate's verdict (offline evidence)
    rollouts/v0007/decided.json   promoted | rolled_back | superseded, when, why, the live evidence summary,
                                  the start record's token (a decision names the start it decides)

Both are written create-only, so exactly one decision wins a race between a judge and an operator, on
disk and in a bucket; a decided rollout never flips. Deciding comes first, then acting on it (the
champion moves through `Registry.promote`, whose audit log entry carries the evidence; the canary label
is released): running the same decision again finishes one a crash interrupted. The champion's audit
log (`promotions/`) records champion changes only; these records sit beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from pydantic import TypeAdapter, ValidationError

from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.manifest import Decision
from fmnist.registry.versions import VERSION, Registry, RegistryError, _now, _parsed, version_number
from fmnist.storage import NotAFile, PreconditionFailed, join

log = logging.getLogger(__name__)

Outcome = Literal["promoted", "rolled_back", "superseded"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
STATUS_ROLLOUTS = 20  # rollouts `status` reads, newest first
ROLLOUT_SCAN = 200  # rollouts `rolled_back` reads, newest first (as the registry searches versions for a prior run)
MAX_REASON_CHARS = 2000  # a decision's reason, in its record and the audit log
MAX_EVIDENCE_BYTES = 16_384  # a decision's evidence summary, as JSON: a summary, not the evidence windows
AUDIT_EVIDENCE_CHARS = 600  # of that summary, what the champion's audit log entry carries
# A rollout record as written: that summary (indented), a reason of MAX_REASON_CHARS (\u-escaped: 6 bytes each)
# and the rest. Records are written no bigger and read no further: a bigger file is no record.
MAX_RECORD_BYTES = 2 * MAX_EVIDENCE_BYTES
MAX_CLOCK_SKEW_S = 300  # how far in the future a host's clock may have put a rollout's start
_DECISION = TypeAdapter(Decision)
_NOT_ITS_DECISION = "no decision of the rollout: it names no start of it (written before it started, or copied)"


@dataclass(frozen=True)
class RolloutRecord:
    """A version's canary rollout: how it started and, once decided, how it ended."""

    version: str
    started_at: str
    champion: str | None  # the champion when it started: the version it was gated against
    offline: Decision  # the gate's verdict that made it the canary
    outcome: Outcome | None = None  # None: not decided yet
    decided_at: str | None = None
    reason: str | None = None  # why it was decided so
    evidence: dict[str, Any] | None = None  # the live evidence summary the decision was made on


class Rollouts:
    """The canary rollouts of `registry`, under `<root>/rollouts/`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.root = join(registry.root, "rollouts")

    def _file(self, version: str, name: str) -> str:
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise RegistryError(f"{str(version)[:64]!r} is not a version (v0001, v0002, ...)")
        return join(self.root, version, name)

    # --- starting --------------------------------------------------------------------------------

    def start(self, version: str, decision: Decision) -> RolloutRecord:
        """Serve `version` as the canary and record its rollout as started, with the gate's verdict
        `decision`; an active rollout of another version is decided `superseded` first. Running it again
        after a crash finishes it; a version whose rollout was decided is refused. A promotion decided and not
        carried out is left as it is: only the judge carries it out, if the evidence still says so (a decision's
        file alone vouches for nothing); `rollout status` shows it, and `fashion-mnist promote` makes it by hand."""
        if (decided := self._decided(version)) is not None:
            raise RegistryError(
                f"{version}'s canary rollout was decided {decided['outcome']} at {decided['at']} "
                f"({decided['reason']}); a decided rollout never starts again: `fashion-mnist promote {version}` "
                "makes it champion by hand"
            )
        if not decision.passed:
            raise RegistryError(f"{version} did not pass the gate ({decision.reason}): no canary rollout for it")
        active = self.active()
        if active is not None and active.version != version:
            # Whatever stands once this is written (a judge's decision may have won the race) ends it.
            try:
                self._write_decision(active.version, "superseded", f"superseded by {version}, a newer canary", {})
            except RegistryError as exc:  # a file there that is no decision: it keeps no newer canary back
                log.warning("%s stays undecided, no longer the canary: %s", active.version, exc)
        started = self._started(version)
        if started is None:
            record = {
                "version": version,
                "at": _now(),
                "champion": decision.champion_version,
                "decision": asdict(decision),
                "token": uuid.uuid4().hex,  # makes the record this writer's own (`Store.create`)
            }
            # Before the label: a canary in service always has its rollout on record. PreconditionFailed:
            # another writer started it meanwhile (a rerun of the same registration).
            with contextlib.suppress(PreconditionFailed):
                self.registry.store.create(self._file(version, "started.json"), _encoded(record))
            started = self._started(version)
        labels = Labels(self.registry)
        if labels.records().get(CANARY, {}).get("version") != version:
            labels.set(CANARY, version, f"canary rollout started: {decision.reason}")
        return _rollout(started, None)

    # --- reading ---------------------------------------------------------------------------------

    def active(self) -> RolloutRecord | None:
        """The rollout in progress: the version labeled canary, started and not yet decided (None: none;
        a canary labeled by hand is no rollout)."""
        version = Labels(self.registry).records().get(CANARY, {}).get("version")
        if version is None or (started := self._started(version)) is None or self._decided(version) is not None:
            return None
        if (problem := self._not_this_registrys(started)) is not None:
            raise RegistryError(
                f"{self._file(version, 'started.json')}: {problem}: it cannot be judged. Move the record aside "
                f"(keep it: it is the rollout's history), then `fashion-mnist label {CANARY} --clear` stops "
                f"serving {version} as the canary"
            )
        return _rollout(started, None)

    def _not_this_registrys(self, started: dict) -> str | None:
        """Why the start record `started` is no rollout the registry made (None: it is one). Only a version
        that passed the gate starts one, after its registration: a record that says otherwise was written by
        hand (or copied), and its own claim of the gate's verdict is no evidence."""
        version, champion = started["version"], started.get("champion")
        if champion is not None and not self.registry.store.exists(
            join(self.registry.versions_root, champion, "manifest.json")
        ):
            return (
                f"the rollout was gated against champion {champion}, which is no version of {self.registry.root} "
                "(deleted, or the record is not this registry's)"
            )
        manifest = self.registry.manifest(version)
        if not manifest.gate.passed:
            return f"a rollout of {version}, which did not pass the gate ({manifest.gate.reason[:200]})"
        try:
            registered = datetime.fromisoformat(manifest.registered_at)
            early = datetime.fromisoformat(started["at"]) < registered
        except (ValueError, TypeError):  # not a time, or one with no time zone: no order to tell
            return f"{version}'s manifest says it was registered at {manifest.registered_at[:64]!r}, not a time"
        if early:
            return f"it started at {started['at']}, before {version} was registered ({manifest.registered_at})"
        return None

    def record(self, version: str) -> RolloutRecord | None:
        """`version`'s rollout (None: it had none)."""
        started = self._started(version)
        return _rollout(started, self._decided(version)) if started else None

    def status(self) -> list[RolloutRecord]:
        """The newest `STATUS_ROLLOUTS` rollouts, newest first."""
        return [r for v in self._newest(STATUS_ROLLOUTS) if (r := self.record(v)) is not None]

    def rolled_back(self) -> set[str]:
        """The versions rolled back in their canary, among the newest `ROLLOUT_SCAN` rollouts."""
        return {v for v in self._newest(ROLLOUT_SCAN) if (d := self._decided(v)) and d["outcome"] == "rolled_back"}

    def ended_without_promotion(self, version: str) -> str | None:
        """Why the gate never makes `version` champion again, if its rollout ended without promoting it
        (rolled back, or superseded by a newer canary); None if not."""
        decided = self._decided(version)
        if decided is None or decided["outcome"] == "promoted":
            return None
        how = "rolled back" if decided["outcome"] == "rolled_back" else "superseded"
        return f"{how} in its canary on {decided['at'][:10]}: {decided['reason']}"

    def _newest(self, count: int) -> list[str]:
        names = [n for n in self.registry.store.listdir(self.root) if VERSION.fullmatch(n)]
        return sorted(names, key=version_number, reverse=True)[:count]

    # --- deciding --------------------------------------------------------------------------------

    def promote(self, version: str, reason: str, evidence: dict) -> RolloutRecord:
        """Decide `version`'s rollout `promoted` and make it champion (through `Registry.promote`, the
        evidence summary in its audit log entry); then release the canary label. Running it again finishes
        an interrupted promotion; a rollout decided otherwise is refused."""
        if self._decided(version) is None:
            try:  # before deciding: a decision that cannot be carried out would never flip
                self.registry._vouched_model(version)
            except RegistryError as exc:
                raise RegistryError(f"refusing to promote canary {version}: {exc}") from exc
        decided = self._decide(version, "promoted", reason, evidence)
        # Champion already (made so by hand during its rollout, or by a racing finisher): nothing to move.
        if self.registry.champion() != version and not self._promoted_since(version, decided["champion_sequence"]):
            summary = json.dumps(decided["evidence"], separators=(",", ":"), sort_keys=True)
            if len(summary) > AUDIT_EVIDENCE_CHARS:
                summary = summary[: AUDIT_EVIDENCE_CHARS - 4] + " ..."
            try:
                self.registry.promote(
                    version,
                    f"canary rollout promoted: {decided['reason']}; evidence {summary} "
                    f"(in full: {self._file(version, 'decided.json')})",
                )
            except RegistryError:
                if not self._promoted_since(version, decided["champion_sequence"]):
                    raise  # not a racing finisher of the same promotion that got there first
        Labels(self.registry).release(CANARY, version)
        return self.record(version)

    def roll_back(self, version: str, reason: str, evidence: dict) -> RolloutRecord:
        """Decide `version`'s rollout `rolled_back` and release the canary label (the champion never moved).
        The gate remembers: it never promotes `version` again (`fashion-mnist promote` by hand still can)."""
        self._decide(version, "rolled_back", reason, evidence)
        Labels(self.registry).release(CANARY, version)
        return self.record(version)

    def supersede(self, version: str, reason: str, evidence: dict) -> RolloutRecord:
        """Decide `version`'s rollout `superseded` (what it was gated against changed under it: the champion
        moved by hand) and release the canary label; the champion never moved for it, and the gate keeps it
        back as it keeps a rolled-back one."""
        self._decide(version, "superseded", reason, evidence)
        Labels(self.registry).release(CANARY, version)
        return self.record(version)

    def unfinished(self) -> RolloutRecord | None:
        """A rollout a crash left decided but not carried out: its version is still labeled canary (a
        promotion not made, or a label not released). None if there is none."""
        version = Labels(self.registry).records().get(CANARY, {}).get("version")
        if version is None or self._decided(version) is None:
            return None
        return self.record(version)

    def finish_decided(self) -> RolloutRecord | None:
        """Carry out the `unfinished` rollout's decision, and return it; None if there is none. The judge runs
        it before judging (`active` no longer names a decided rollout). A promotion that can no longer be
        made (the champion moved on since, the canary's files are damaged) releases the label and raises."""
        if (record := self.unfinished()) is None:
            return None
        if record.outcome == "promoted":
            try:
                return self.promote(record.version, record.reason, record.evidence)
            except RegistryError:
                Labels(self.registry).release(CANARY, record.version)  # no longer served as a canary
                raise
        Labels(self.registry).release(CANARY, record.version)
        return self.record(record.version)

    def _decide(self, version: str, outcome: Outcome, reason: str, evidence: dict) -> dict:
        """The active rollout `version` decided `outcome`, or its decision already written if that is
        `outcome` too (a rerun finishing it, or a racing decider that agreed); any other decision is refused."""
        if self._decided(version) is None:
            active = self.active()
            # Read again after: a decision written meanwhile ends the rollout, and is what to answer with.
            if (active is None or active.version != version) and self._decided(version) is None:
                raise RegistryError(self._not_active(version, active))
        decided = self._write_decision(version, outcome, reason, evidence)
        if decided["outcome"] != outcome:
            raise RegistryError(
                f"{version}'s canary rollout was already decided {decided['outcome']} at {decided['at']} "
                f"({decided['reason']}): a decided rollout never flips. `fashion-mnist rollout status` shows it; "
                f"`fashion-mnist promote {version}` makes it champion by hand"
            )
        return decided

    def _write_decision(self, version: str, outcome: Outcome, reason: str, evidence: dict) -> dict:
        """Write `version`'s decision create-only, unless one is there; return the one that stands."""
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise RegistryError(f"a rollout decision needs a reason of 1 to {MAX_REASON_CHARS} characters")
        reason = " ".join(reason.split())  # one line: the audit log and `rollout status` show it as one
        if not isinstance(evidence, dict):
            raise RegistryError("a rollout decision's evidence is a JSON object (the judge's summary)")
        try:
            evidence_json = json.dumps(evidence, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise RegistryError(f"a rollout decision's evidence is not plain JSON ({exc!r:.200})") from None
        if len(evidence_json) > MAX_EVIDENCE_BYTES:
            raise RegistryError(
                f"a rollout decision's evidence is {len(evidence_json)} bytes of JSON; at most {MAX_EVIDENCE_BYTES}"
            )
        if (decided := self._decided(version)) is not None:
            return decided
        champion = self.registry.champion_record()
        record = {
            "version": version,
            "started": (self._started(version) or {}).get("token"),  # the start it decides (`_decided`)
            "outcome": outcome,
            "at": _now(),
            "reason": reason,
            "evidence": json.loads(evidence_json),
            "champion_sequence": (champion or {}).get("sequence") or 0,  # how far the audit log had come
            "token": uuid.uuid4().hex,  # makes the record this writer's own (`Store.create`)
        }
        try:
            self.registry.store.create(self._file(version, "decided.json"), _encoded(record))
        except PreconditionFailed:  # another decision won the race: it stands
            if (decided := self._decided(version)) is None:  # or a file there that is no decision of it
                raise RegistryError(
                    f"{self._file(version, 'decided.json')}: {_NOT_ITS_DECISION}; move it aside (keep it), then "
                    f"decide {version}'s rollout again"
                ) from None
            return decided
        return record

    def _not_active(self, version: str, active: RolloutRecord | None) -> str:
        if active is None:
            return f"{version} is not the canary of a rollout in progress: no rollout is active in {self.root}"
        return (
            f"{version} is not the canary of the rollout in progress: {active.version} is "
            f"(`fashion-mnist rollout status` shows it)"
        )

    def _promoted_since(self, version: str, sequence: int) -> bool:
        """Whether the audit log records `version` made champion after change `sequence` (the decision's);
        RegistryError if the champion moved to another version since, which the decision did not foresee."""
        registry = self.registry
        later = [registry._logged_entry(s) for s in range(sequence + 1, registry._last_sequence() + 1)]
        if any(e["version"] == version and e["event"] == "promote" for e in later):
            return True
        if later:
            raise RegistryError(
                f"{version}'s rollout was decided promoted after change {sequence} of the champion's audit log, but "
                f"the champion has moved since ({later[-1]['version']} now) without it: not overriding that; "
                f"`fashion-mnist promote {version}` makes it champion by hand"
            )
        return False

    # --- the records -----------------------------------------------------------------------------

    def _started(self, version: str) -> dict | None:
        return self._load(version, "started.json", _check_started)

    def _decided(self, version: str) -> dict | None:
        """`version`'s decision; None if there is none, or if the file names no start of its rollout (its
        `started` is not the start record's token): written before the rollout started, or copied from
        another, it is no decision. Ignored, it never keeps a version that passed the gate from its rollout,
        and never decides one; deciding it is refused until it is moved aside (`_write_decision`)."""
        decided = self._load(version, "decided.json", _check_decided)
        if decided is None:
            return None
        started = self._started(version)
        if started is None or decided.get("started") != started.get("token"):
            log.warning("%s: %s", self._file(version, "decided.json"), _NOT_ITS_DECISION)
            return None
        return decided

    def _load(self, version: str, name: str, check) -> dict | None:
        """The record `name` of `version`'s rollout, validated (None: there is none); damage raises,
        naming the file, the problem and the way out."""
        location = self._file(version, name)
        try:
            if (data := self._read_bounded(location)) is None:
                return None
            record = _parsed(data)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if record.get("version") != version:
                raise ValueError(f"it names version {str(record.get('version'))[:64]!r}, not its folder's {version}")
            check(record)
        except ValueError as exc:
            after = (
                f"the rollout is then undecided: `fashion-mnist rollout abort {version}` (or `rollout promote`) "
                "decides it again while it is the canary"
                if name == "decided.json"
                else f"{version} then has no rollout on record (`fashion-mnist label {CANARY} --clear` stops "
                "serving it as the canary)"
            )
            raise RegistryError(
                f"{location}: a damaged rollout record ({exc}); move it aside (keep it: it is the rollout's "
                f"history); {after}"
            ) from None
        return record

    def _read_bounded(self, location: str) -> bytes | None:
        """The file at `location`, read no further than MAX_RECORD_BYTES (None: there is none); ValueError for
        a bigger file, or anything that is no file (a FIFO, a device, a file where the version's folder is)."""
        try:
            if (data := self.registry.store.read_at_most(location, MAX_RECORD_BYTES)) is None:
                raise ValueError(f"over {MAX_RECORD_BYTES:,} bytes: no rollout record is")
        except FileNotFoundError:  # none, or a folder there (refused, named); never read again unbounded
            self.registry.refuse_folder(location)
            return None
        except NotAFile as exc:
            raise ValueError(str(exc).removeprefix(f"{location}: ")) from None
        return data


def _encoded(record: dict) -> bytes:
    data = json.dumps(record, indent=1).encode()
    if len(data) > MAX_RECORD_BYTES:  # its readers would refuse it
        raise RegistryError(f"a rollout record of {len(data):,} bytes; at most {MAX_RECORD_BYTES:,}")
    return data


def _check_started(record: dict) -> None:
    _check_time(record, "at")
    started = datetime.fromisoformat(record["at"])
    if started.tzinfo is None:
        raise ValueError("at has no time zone")
    if started > datetime.now(UTC) + timedelta(seconds=MAX_CLOCK_SKEW_S):  # its time so far would be negative
        raise ValueError(f"it started at {record['at']}, in the future")
    if (champion := record.get("champion")) is not None and not (
        isinstance(champion, str) and VERSION.fullmatch(champion)
    ):
        raise ValueError("champion is not a version")
    if champion == record["version"]:
        raise ValueError("its champion is the canary itself")
    if not _offline(record).passed:
        raise ValueError("its decision did not pass the gate")


def _offline(started: dict) -> Decision:
    """The gate's verdict a start record keeps; ValueError naming the field that is not one's."""
    try:  # strict, and from JSON (where an object may stand for the dataclass): "yes" is no bool
        return _DECISION.validate_json(json.dumps(started.get("decision")), strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"decision: {'.'.join(map(str, error['loc'])) or 'top level'}: {error['msg']}") from None


def _check_decided(record: dict) -> None:
    _check_time(record, "at")
    if record.get("outcome") not in OUTCOMES:
        raise ValueError(f"outcome {str(record.get('outcome'))[:64]!r} is none of {', '.join(OUTCOMES)}")
    if not isinstance(record.get("reason"), str):
        raise ValueError("reason is not text")
    if not isinstance(record.get("evidence"), dict):
        raise ValueError("evidence is not a JSON object")
    sequence = record.get("champion_sequence")
    if type(sequence) is not int or sequence < 0:
        raise ValueError("champion_sequence is not a number from 0")


def _check_time(record: dict, name: str) -> None:
    try:
        datetime.fromisoformat(record[name])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{name} is not a time") from None


def _rollout(started: dict, decided: dict | None) -> RolloutRecord:
    return RolloutRecord(
        started["version"],
        started["at"],
        started.get("champion"),
        _offline(started),
        *((decided["outcome"], decided["at"], decided["reason"], decided["evidence"]) if decided else ()),
    )
