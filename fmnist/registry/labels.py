"""Version labels: names an operator gives to versions so that clients can ask for them by name.

`stable` is the champion (the pointer in `champion.json`), never written here. Other labels, such as
`canary`, live in `labels.json` at the registry root, one record each, moved by compare-and-swap as
the pointer is:

    {"canary": {"version": "v0007", "model_sha256": "...", "at": "...", "reason": "..."}}

A label is set only on a registered version whose files verify, and its record keeps the model's
sha256: the server loads a labeled model only if it still hashes to it, as it does the champion's.

A damaged `labels.json` (not JSON, or a record that is not a label's) is never rewritten by setting a
label, which would drop the labels it holds: `fashion-mnist label NAME --clear` removes NAME and the
records that cannot be read, keeps every readable one, and says what it removed.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

from fmnist.registry.versions import CHAMPION_MOVE_ATTEMPTS, SHA256, VERSION, Registry, RegistryError, _now, _parsed
from fmnist.storage import PreconditionFailed, join

STABLE = "stable"  # the champion's label
CANARY = "canary"  # the label a canary rollout serves its candidate under (`fmnist.registry.rollout`)
LABEL = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # canary, shadow-2, ...: what a URL path segment can carry
MAX_LABELS = 8  # besides stable: each labeled version is a model the server holds in memory


class Labels:
    """The labels of `registry`, beside its champion."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.file = join(registry.root, "labels.json")

    def _read(self) -> tuple[dict[str, dict], str | None]:
        labels, problems, etag = self._parse()
        too_many = len(labels) > MAX_LABELS
        if too_many:
            problems.append(f"{len(labels)} labels; at most {MAX_LABELS}")
        if problems:
            kept = f"keeping {', '.join(labels)}" if labels else "no label in it can be read"
            if too_many:  # only clearing one of them brings it within
                kept = f"NAME one of {', '.join(labels)}; keeping the others"
            raise RegistryError(
                f"{self.file} is damaged ({'; '.join(problems)}); `fashion-mnist label NAME --clear` removes label "
                f"NAME and the records that cannot be read ({kept}); then set labels again"
            )
        return labels, etag

    def _parse(self) -> tuple[dict[str, dict], list[str], str | None]:
        """The readable label records (more than `MAX_LABELS` of them is damage too: `_read`), the problems of
        the records that cannot be read, and the file's etag."""
        found = self.registry._read(self.file)
        if found is None:
            return {}, [], None
        data, etag = found
        try:
            content = _parsed(data)
        except ValueError as exc:
            return {}, [str(exc)], etag
        if not isinstance(content, dict):
            return {}, ["not a JSON object"], etag
        labels, problems = {}, []
        for name, record in content.items():
            try:
                labels[name] = _record(name, record)
            except ValueError as exc:
                problems.append(str(exc))
        return labels, problems, etag

    def records(self) -> dict[str, dict]:
        """Each label's record (not `stable`: that is the champion's)."""
        return self._read()[0]

    def set(self, name: str, version: str, reason: str) -> dict:
        """Point label `name` at `version`, once its files verify; return the label's record."""
        _check_name(name)
        try:
            model = self.registry._vouched_model(version)
        except RegistryError as exc:
            raise RegistryError(f"refusing to label {version} {name!r}: {exc}") from exc
        record = {"version": version, "model_sha256": model, "at": _now(), "reason": reason}

        def change(labels: dict[str, dict]) -> dict[str, dict]:
            if name not in labels and len(labels) >= MAX_LABELS:
                raise RegistryError(f"{len(labels)} labels already ({', '.join(labels)}); at most {MAX_LABELS}")
            return {**labels, name: record}

        self._move(change)
        return record

    def clear(self, name: str) -> list[str]:
        """Remove label `name` (the server stops serving it). From a damaged file, also the records that
        cannot be read; every readable one is kept. Returns what was removed besides `name`: the damage."""
        _check_name(name)
        removed: list[str] = []

        def change(labels: dict[str, dict], problems: list[str]) -> dict[str, dict]:
            if name not in labels and len(labels) > MAX_LABELS:
                # Nothing here to drop: which of the readable labels to keep is the operator's choice.
                raise RegistryError(
                    f"no label {name!r}; {self.file} holds {len(labels)} labels, at most {MAX_LABELS}: "
                    f"`fashion-mnist label NAME --clear` with NAME one of {', '.join(labels)} removes one"
                    + (f" (and the records that cannot be read: {'; '.join(problems)})" if problems else "")
                )
            if name not in labels and not problems:
                raise RegistryError(f"no label {name!r} (labels: {', '.join(labels) or 'none'})")
            removed[:] = problems
            return {k: v for k, v in labels.items() if k != name}

        self._move(change, damaged_ok=True)
        return removed

    def release(self, name: str, version: str) -> bool:
        """Remove label `name` if it still names `version` (a decided canary); False if it names another
        version or none: a label moved on since is someone else's to clear."""

        def change(labels: dict[str, dict]) -> dict[str, dict]:
            if labels.get(name, {}).get("version") != version:
                return labels  # moved on between the read below and this write
            return {k: v for k, v in labels.items() if k != name}

        if self.records().get(name, {}).get("version") != version:
            return False
        self._move(change)
        return True

    def _move(self, change, *, damaged_ok: bool = False) -> None:
        """Compare-and-swap labels.json to `change(labels)` (with `damaged_ok`, `change(labels, problems)`:
        the readable records and what could not be read); re-read and retry when another writer wins."""
        store = self.registry.store
        store.require_conditional_writes(self.registry.root)
        for attempt in range(CHAMPION_MOVE_ATTEMPTS):
            if damaged_ok:
                labels, problems, etag = self._parse()
                new = change(labels, problems)
            else:
                labels, etag = self._read()
                new = change(labels)
            try:
                store.replace(self.file, json.dumps(new, indent=1).encode(), etag)
                return
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))
        raise RegistryError(f"{self.file}: still changing after {CHAMPION_MOVE_ATTEMPTS} attempts; try again")


def _check_name(name: str) -> None:
    if name == STABLE:
        raise RegistryError(f"{STABLE!r} is the champion's label: `fashion-mnist promote VERSION` moves it")
    if not LABEL.fullmatch(name):
        raise RegistryError(f"label {name!r}: a label is a lowercase letter, then up to 31 of a-z, 0-9, _ and -")


def _record(name: str, record: Any) -> dict:
    """Label `name`'s record in `labels.json`; ValueError naming its problem."""
    if name == STABLE or not LABEL.fullmatch(name):
        raise ValueError(f"{name[:64]!r} is not a label name")
    if not isinstance(record, dict):
        raise ValueError(f"label {name!r} is not a record")
    if not (isinstance(record.get("version"), str) and VERSION.fullmatch(record["version"])):
        raise ValueError(f"label {name!r} names no version")
    if not (isinstance(record.get("model_sha256"), str) and SHA256.fullmatch(record["model_sha256"])):
        raise ValueError(f"label {name!r} has no model sha256")
    return record
