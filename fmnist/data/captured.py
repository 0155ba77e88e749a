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
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.storage import Store, join

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
SUMMARY = ["id", "at", "version", "label", "predicted", "confidence"]  # what an offer is chosen from
MERGED_BELOW = RECORDS_PER_FILE // 2  # files holding fewer records than this are merged into fuller ones
MAX_MERGED_FILES = 4096  # small files merged by one compaction: a submit's clean-up stays bounded


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
    left twice included."""
    return sorted(n for n in store.listdir(records_folder(feedback)) if n.endswith(".parquet"))


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
    """Every record not in `excluded`, file by file, without its image."""
    names = record_files(store, feedback)
    for name in sorted(set(names) - superseded(names)):
        for row in read_table(store, feedback, name, SUMMARY).to_pylist():
            if row["id"] not in excluded:
                yield Candidate(**row, source=name)


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


def compact(store: Store, feedback: str, reviewed: set[str], touched: Iterable[str]) -> Compaction:
    """Free the space of reviewed records: each file of `touched` is written again without them (or
    deleted when none is left), files a stopped compaction left twice are deleted, and small files are
    merged (at most MAX_MERGED_FILES of them). Capture counts the folder from its listing, so it
    resumes as soon as the records fall under its bound."""
    folder = records_folder(feedback)
    names = record_files(store, feedback)
    before, freed = len(names), 0
    for name in superseded(names):
        store.delete(join(folder, name))
        names.remove(name)
    for name in sorted(set(touched) & set(names)):
        table = read_table(store, feedback, name)
        keep = pc.invert(pc.is_in(table["id"], pa.array(sorted(reviewed), pa.string())))
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        freed += table.num_rows - kept.num_rows
        names.remove(name)
        if kept.num_rows:
            matched = RECORD_FILE.fullmatch(name)
            stamp, tag = matched.groups()[:2] if matched else (None, None)
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
    folder = records_folder(feedback)
    small = [n for n in names if RECORD_FILE.fullmatch(n) and records_in(n) < MERGED_BELOW][:MAX_MERGED_FILES]
    freed = 0
    group: list[str] = []
    tables: list[pa.Table] = []
    seen: set[str] = set()

    def flush() -> None:
        nonlocal freed
        if len(group) > 1 or (group and sum(t.num_rows for t in tables) < records_in(group[0])):
            merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
            if merged.num_rows:
                store.write_bytes(join(folder, record_file_name(merged.num_rows)), encode(merged))
            freed += sum(records_in(n) for n in group) - merged.num_rows
            for name in group:
                store.delete(join(folder, name))
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
