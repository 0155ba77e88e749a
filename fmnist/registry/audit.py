"""Rebuilding lost audit-log entries from what the registry still holds.

A change's entry names its version, the version it replaced and its event (promote or rollback). The
entries around a lost one and the champion pointer (its version and its chain of earlier champions,
`previous`) constrain it: change k replaced change k-1's version, change k+1 replaced change k's, a
rollback makes champion the last of `previous` again, and replaying every change must end at the
pointer. `histories` tries each event for each lost change and keeps the histories that satisfy
every constraint: one such history, with every version named, is evidence enough; several, or a
version nothing names, is not (the operator acknowledges the loss: `repair-log --acknowledge-lost`).
The repair that runs this search and writes the entries it settles is `fmnist.registry.log_repair`.
"""

from __future__ import annotations

LOST = "lost"  # the event of an entry restored without evidence of what the change was
SEARCH_BUDGET = 20_000  # steps of the search before it gives up (then: not enough evidence)
MAX_LOST = 200  # lost changes searched at most; beyond, not enough evidence
# Changes the log can be missing past its entries: a change numbered beyond them (an entry's name, the
# pointer's or a claim's sequence) is a stray or edited record, never a range of that size to restore.
MAX_UNLOGGED = 10_000


class Unknown:
    """A version no evidence has named (yet)."""

    __slots__ = ()


class _Stop(Exception):
    pass


def histories(known: dict[int, dict], top: int, final: dict | None) -> list[dict[int, tuple]] | None:
    """Up to two histories of changes 1..`top` consistent with the `known` entries and the champion
    record `final` (None: unknown); each maps every lost change to (event, version, replaced), a
    version None where nothing names it. None: the search gave up (too many lost changes)."""
    if top - len([s for s in known if s <= top]) > MAX_LOST:
        return None
    found: list[dict[int, tuple]] = []
    steps = [0]
    final_stack = tuple(final["previous"]) if final else None

    def resolve(x, bound):
        while isinstance(x, Unknown) and x in bound:
            x = bound[x]
        return x

    def same(x, y, bound):
        x, y = resolve(x, bound), resolve(y, bound)
        if x is y or (not isinstance(x, Unknown) and not isinstance(y, Unknown) and x == y):
            return bound
        if x is None or y is None:  # a change that replaced nothing comes only first
            return None
        return {**bound, x: y} if isinstance(x, Unknown) else {**bound, y: x} if isinstance(y, Unknown) else None

    def pushed(stack, current):
        if stack is None:
            return None
        return (*stack, current) if current is not None else ()

    def walk(seq, current, stack, bound, choices) -> None:
        while seq <= top:
            steps[0] += 1
            if steps[0] > SEARCH_BUDGET:
                raise _Stop
            if final_stack is not None and stack is not None and abs(len(stack) - len(final_stack)) > top - seq + 1:
                return
            entry = known.get(seq)
            if entry is None:
                break
            if entry["event"] == LOST:  # restored before without evidence: what came before is unknown
                current, stack, seq = entry.get("version") or Unknown(), None, seq + 1
                continue
            if (bound := same(entry.get("replaced"), current, bound)) is None:
                return
            if entry["event"] == "rollback":
                if stack is not None:
                    if not stack or (bound := same(stack[-1], entry["version"], bound)) is None:
                        return
                    stack = stack[:-1]
            else:
                stack = pushed(stack, current)
            current, seq = entry["version"], seq + 1
        if seq > top:
            if final is not None:
                if (bound := same(current, final["version"], bound)) is None:
                    return
                if stack is not None:
                    if len(stack) != len(final_stack):
                        return
                    for mine, theirs in zip(stack, final_stack, strict=True):
                        if (bound := same(mine, theirs, bound)) is None:
                            return
            found.append({s: tuple(_named(resolve(x, bound)) for x in c) for s, c in choices.items()})
            if len(found) > 1:
                raise _Stop
            return
        promoted = Unknown()
        walk(seq + 1, promoted, pushed(stack, current), bound, {**choices, seq: ("promote", promoted, current)})
        if current is not None and (stack is None or stack):
            back = Unknown() if stack is None else stack[-1]
            popped = None if stack is None else stack[:-1]
            walk(seq + 1, back, popped, bound, {**choices, seq: ("rollback", back, current)})

    try:
        walk(1, None, (), {}, {})
    except _Stop:
        if steps[0] > SEARCH_BUDGET:
            return None
    return found


def _named(x):
    return None if isinstance(x, Unknown) else x
