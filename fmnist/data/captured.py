"""The record files feedback capture writes (`fmnist.serving.capture`) and review reads
(`fmnist.ops.review`): `<data_root>/feedback/records/<stamp>-<tag>-n<count>.parquet`.

Each file holds up to RECORDS_PER_FILE records and says how many in its name, so the records kept
are counted from a listing. A file is written whole (a temporary file renamed, or one PUT) and never
edited: compaction writes a file's remaining records under the same stamp and tag with the new count,
then deletes the old one. A compaction stopped between the two leaves both; the one with the smaller
count is the newer (a subset of the other), and the next compaction deletes the older.

Review reads the files a column at a time: the offer is chosen from ids and confidences alone (a heap
of at most the review's size), and only the chosen records' images are read, a file at a time.
"""

from __future__ import annotations

import heapq
import io
import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmnist.data.dataset import IMAGE_SIZE, NUM_CLASSES
from fmnist.storage import StorageError, Store, join

RECORDS = "records"
RECORDS_PER_FILE = 1024
RECORD_FILE = re.compile(r"(\d{8}T\d{12})-([0-9a-f]{8})-n(\d{4})\.parquet")
PIXELS = IMAGE_SIZE * IMAGE_SIZE
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("request", pa.string()),
        ("at", pa.string()),
        ("version", pa.string()),
        ("label", pa.string()),
        ("predicted", pa.int8()),
        ("confidence", pa.float32()),
        ("image", pa.binary(PIXELS)),
    ]
)
RECORD_ID = re.compile(r"[0-9a-f]{32}")
NAME_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9:.+_-]{0,63}")  # versions, labels, times
SUMMARY = ["id", "at", "version", "label", "predicted", "confidence"]  # what an offer is chosen from
MERGED_BELOW = RECORDS_PER_FILE // 2  # files holding fewer records than this are merged into fuller ones
MAX_MERGED_FILES = 4096  # small files merged by one compaction: a submit's clean-up stays bounded
MERGING = "merging.json"  # beside records/: the sources of a merge under way


log = logging.getLogger(__name__)


class RecordFileError(ValueError):
    """A file in the records folder that is not a record file; the message names it."""


@dataclass(frozen=True, order=True)
class Candidate:
    """A captured record as an offer is chosen: lowest confidence first, then oldest."""

    confidence: float
    at: str
    id: str
    version: str
    label: str
    predicted: int
    source: str  # the record file's name


@dataclass(frozen=True)
class Compaction:
    records_freed: int  # reviewed records removed from the folder
    files_before: int
    files_after: int


def records_folder(feedback: str) -> str:
    return join(feedback, RECORDS)


def record_file_name(records: int, stamp: str | None = None, tag: str | None = None) -> str:
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}-{tag or uuid.uuid4().hex[:8]}-n{records:04d}.parquet"


def records_in(name: str) -> int:
    """The records a file of the folder holds, by its name; a file not named by capture counts as full."""
    matched = RECORD_FILE.fullmatch(name)
    return int(matched.group(3)) if matched else RECORDS_PER_FILE


def encode(table: pa.Table) -> bytes:
    """One parquet file of records, in memory."""
    out = io.BytesIO()
    pq.write_table(table.cast(SCHEMA), out, compression="zstd")
    return out.getvalue()


def record_files(store: Store, feedback: str) -> list[str]:
    """The record files' names, oldest first (a name starts with its time), those a stopped compaction
    left twice included. Other files there are not capture's, and neither read nor changed."""
    return sorted(n for n in store.listdir(records_folder(feedback)) if RECORD_FILE.fullmatch(n))


def read_table(store: Store, feedback: str, name: str, columns: list[str] | None = None) -> pa.Table:
    """The columns asked for of one record file; read from the file itself where it has a path."""
    location = join(records_folder(feedback), name)
    path = store.direct_path(location)
    try:
        table = pq.read_table(path if path else io.BytesIO(store.read_bytes(location)), columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise RecordFileError(f"{location}: not a parquet file ({exc}); move it out of the records folder") from None
    expected = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    if not table.schema.equals(expected):
        raise RecordFileError(f"{location}: not a feedback record file (its columns are {table.schema.names})")
    return table


def candidates(store: Store, feedback: str, excluded: set[str]) -> Iterator[Candidate]:
    """Every record not in `excluded`, file by file, without its image. A record capture could not
    have written is an error naming its file: its fields become folder names and ledger entries."""
    names = record_files(store, feedback)
    for name in sorted(set(names) - superseded(names)):
        for row in read_table(store, feedback, name, SUMMARY).to_pylist():
            if problem := _strange(row):
                raise RecordFileError(
                    f"{join(records_folder(feedback), name)}: a record capture did not write ({problem}); "
                    "move the file out of the records folder"
                )
            if row["id"] not in excluded:
                yield Candidate(**row, source=name)


def _strange(row: dict) -> str | None:
    """What in a record read back is not what capture writes (None: nothing)."""
    if not isinstance(row["id"], str) or not RECORD_ID.fullmatch(row["id"]):
        return f"id {str(row['id'])[:40]!r}"
    for field in ("version", "label", "at"):
        if not isinstance(row[field], str) or not NAME_FIELD.fullmatch(row[field]):
            return f"{field} {str(row[field])[:40]!r}"
    if row["predicted"] is None or not 0 <= row["predicted"] < NUM_CLASSES:
        return f"predicted {row['predicted']!r}"
    if row["confidence"] is None or not 0.0 <= row["confidence"] <= 1.0:
        return f"confidence {row['confidence']!r}"
    return None


def lowest_confidence(store: Store, feedback: str, excluded: set[str], limit: int) -> tuple[list[Candidate], int]:
    """The `limit` least confident records not in `excluded`, and how many such records there are.

    Memory holds `limit` records, whatever the folder holds. A record in two files (a compaction that
    stopped midway) is chosen once."""
    seen = 0

    def counted() -> Iterator[Candidate]:
        nonlocal seen
        for candidate in candidates(store, feedback, excluded):
            seen += 1
            yield candidate

    chosen: dict[str, Candidate] = {}
    for candidate in heapq.nsmallest(limit, counted()):
        chosen.setdefault(candidate.id, candidate)
    return list(chosen.values()), seen


def images_of(store: Store, feedback: str, chosen: Iterable[Candidate]) -> dict[str, bytes]:
    """The chosen records' pixels (PIXELS bytes each), by id, read one source file at a time."""
    by_file: dict[str, set[str]] = {}
    for candidate in chosen:
        by_file.setdefault(candidate.source, set()).add(candidate.id)
    images = {}
    for name, ids in by_file.items():
        table = read_table(store, feedback, name, ["id", "image"])
        for record_id, image in zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True):
            if record_id in ids:
                images[record_id] = image
    return images


def compact(store: Store, feedback: str, reviewed: set[str]) -> Compaction:
    """Free the space of reviewed records: every file holding one is written again without them (or
    deleted when none is left; its ids are read first, a column), files a stopped compaction left
    twice are deleted, and small files are merged (at most MAX_MERGED_FILES of them). Capture counts
    the folder from its listing, so it resumes as soon as the records fall under its bound."""
    folder = records_folder(feedback)
    _finish_merge(store, feedback)
    names = record_files(store, feedback)
    before, freed = len(names), 0
    for name in superseded(names):
        store.delete(join(folder, name))
        names.remove(name)
    done = pa.array(sorted(reviewed), pa.string())
    for name in list(names):
        if not pc.any(pc.is_in(read_table(store, feedback, name, ["id"])["id"], done)).as_py():
            continue
        table = read_table(store, feedback, name)
        kept = table.filter(pc.invert(pc.is_in(table["id"], done)))
        freed += table.num_rows - kept.num_rows
        names.remove(name)
        if kept.num_rows:
            stamp, tag, _ = RECORD_FILE.fullmatch(name).groups()
            renamed = record_file_name(kept.num_rows, stamp, tag)
            store.write_bytes(join(folder, renamed), encode(kept))
            names.append(renamed)
        store.delete(join(folder, name))
    freed += _merge_small(store, feedback, sorted(names), reviewed)
    return Compaction(freed, before, len(record_files(store, feedback)))


def superseded(names: list[str]) -> set[str]:
    """The files a stopped compaction wrote again: same stamp and tag as another, and more records."""
    newest: dict[tuple[str, ...], str] = {}
    for name in names:
        if matched := RECORD_FILE.fullmatch(name):
            key = matched.groups()[:2]
            if key not in newest or records_in(name) < records_in(newest[key]):
                newest[key] = name
    return {n for n in names if (m := RECORD_FILE.fullmatch(n)) and newest[m.groups()[:2]] != n}


def _merge_small(store: Store, feedback: str, names: list[str], reviewed: set[str]) -> int:
    """Merge the small files, oldest first, into files of up to RECORDS_PER_FILE; reviewed records and
    second copies of a record are left out. The merged file is written before its sources are deleted."""
    folder, journal = records_folder(feedback), join(feedback, MERGING)
    small = [n for n in names if RECORD_FILE.fullmatch(n) and records_in(n) < MERGED_BELOW][:MAX_MERGED_FILES]
    freed = 0
    group: list[str] = []
    tables: list[pa.Table] = []
    seen: set[str] = set()

    def flush() -> None:
        nonlocal freed
        if len(group) > 1 or (group and sum(t.num_rows for t in tables) < records_in(group[0])):
            merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
            name = record_file_name(merged.num_rows) if merged.num_rows else None
            # The sources are named before the merged file is written: a merge stopped before they
            # are all deleted is finished by the next compaction, never left as a second copy.
            store.write_json(journal, {"merged": name, "sources": group})
            if name:
                store.write_bytes(join(folder, name), encode(merged))
            freed += sum(records_in(n) for n in group) - merged.num_rows
            for source in group:
                store.delete(join(folder, source))
            store.delete(journal)
        group.clear(), tables.clear()

    for name in small:
        table = read_table(store, feedback, name)
        ids = table["id"].to_pylist()
        keep = [i not in reviewed and i not in seen for i in ids]
        seen.update(ids)
        table = table.filter(pa.array(keep, pa.bool_()))
        if sum(t.num_rows for t in tables) + table.num_rows > RECORDS_PER_FILE:
            flush()
        group.append(name)
        tables.append(table)
    flush()
    return freed


def _finish_merge(store: Store, feedback: str) -> None:
    """Delete the sources of a merge that stopped after writing its merged file (its journal names
    them); a merge that stopped before leaves its sources, whole, and only the journal goes."""
    journal = join(feedback, MERGING)
    if not store.exists(journal):
        return
    try:
        merge = store.read_json(journal)
        merged, sources = merge["merged"], [n for n in merge["sources"] if RECORD_FILE.fullmatch(n)]
    except (StorageError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s: not a merge journal (%s); removed, and the records it names are kept", journal, exc)
        merged, sources = None, []
    if (
        merged is not None
        and RECORD_FILE.fullmatch(str(merged))
        and store.exists(join(records_folder(feedback), merged))
    ):
        for source in sources:
            store.delete(join(records_folder(feedback), source))
    store.delete(journal)
