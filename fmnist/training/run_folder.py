"""A run's folder (`fmnist.storage.layout.RunLayout`): where training and evaluation write, and how a crashed
run resumes on any host.

Where the store has a local path for it (a registry on disk), the stages write straight into it.
Elsewhere (a bucket) they write into a working folder on the host (`<scratch>/runs/<id>/`) and publish
what they make. After every epoch, training
uploads the history, the TensorBoard logs and then a checkpoint snapshot,
`backup/epoch-00003/{latest.weights.h5, training_metadata.json, snapshot.json}`, whose marker
`snapshot.json` is written last. A run started again, on this host or a replacement, first restores
the newest complete snapshot, so it resumes after the last epoch that was saved in the store.
"""

from __future__ import annotations

import posixpath
import shutil
from pathlib import Path
from typing import Any

from fmnist.storage import IntegrityError, Store, StoredFile, UnsafeName, join, name_parts
from fmnist.storage.files import atomic_write_bytes, sha256_file
from fmnist.storage.layout import RunLayout

# What Keras' BackupAndRestore keeps for a resume (its `.bkp` copies are for a crash during a local write).
CHECKPOINT_FILES = ("latest.weights.h5", "training_metadata.json")
SNAPSHOT_MARKER = "snapshot.json"
SNAPSHOTS_KEPT = 2


class RunFolder:
    def __init__(self, store: Store, layout: RunLayout) -> None:
        self.store = store
        self.layout = layout
        self.location = layout.location
        direct = store.direct_path(self.location)
        self.in_copy = direct is None  # the stages work in a copy on this host and publish what they make
        if direct is None:
            self.work_dir = store.require_scratch(self.location) / "runs" / posixpath.basename(self.location)
        else:
            self.work_dir = direct
        self._pushed: dict[Path, tuple[int, int]] = {}  # TensorBoard files uploaded: (size, mtime)

    def file(self, *parts: str) -> str:
        """The location of a file of this run in the store."""
        return self.layout.file(*parts)

    def local(self, *parts: str) -> Path:
        """The path of a file of this run in the local working folder."""
        return self.work_dir.joinpath(*parts)

    @property
    def backup_dir(self) -> Path:
        return self.local(RunLayout.BACKUP)

    def publish(self, *parts: str) -> StoredFile:
        """The local file `parts`, published in the run folder (on disk it already is), with its sha256."""
        return self.store.publish(self.local(*parts), self.file(*parts))

    def write_json(self, name: str, value: Any) -> None:
        self.store.write_json(self.file(name), value)

    def read_json(self, name: str) -> Any:
        return self.store.read_json(self.file(name))

    # --- resuming across hosts --------------------------------------------------------------------

    def restore(self) -> int:
        """Bring the working folder to the newest complete snapshot in the store; return its epoch (0: none).

        On local disk the working folder is the run folder, and Keras resumes from it directly.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.in_copy:
            return 0
        # The store is the record: a newer local backup may be one the store never got, so it is dropped.
        shutil.rmtree(self.backup_dir, ignore_errors=True)
        history = self.local(RunLayout.HISTORY)
        try:
            atomic_write_bytes(history, self.store.read_bytes(self.file(RunLayout.HISTORY)))
        except FileNotFoundError:
            history.unlink(missing_ok=True)
        for snapshot in reversed(self._snapshots()):
            try:
                record = self.store.read_json(join(snapshot, SNAPSHOT_MARKER))
                for name, sha256 in record["files"].items():
                    parts = name_parts(snapshot, name)  # a name from the record: only inside both folders
                    self.store.fetch(StoredFile(join(snapshot, *parts), sha256), self.backup_dir.joinpath(*parts))
            except (FileNotFoundError, IntegrityError, UnsafeName, KeyError, TypeError, AttributeError):
                shutil.rmtree(self.backup_dir, ignore_errors=True)
                continue  # incomplete or damaged: try the one before
            return int(record["epoch"])
        return 0

    def save_epoch(self, epochs_done: int) -> None:
        """After an epoch ended and Keras wrote its backup: upload the history, the logs, then a snapshot.

        The history goes first: a crash before the snapshot is complete resumes from the previous one,
        and the epoch that runs again replaces its record.
        """
        if not self.in_copy:
            return
        self.store.put_file(self.local(RunLayout.HISTORY), self.file(RunLayout.HISTORY))
        self.push_logs()
        snapshot = self.file(RunLayout.BACKUP, f"epoch-{epochs_done:05d}")
        files = {}
        for name in CHECKPOINT_FILES:
            files[name] = sha256_file(self.backup_dir / name)
            self.store.put_file(self.backup_dir / name, join(snapshot, name))
        self.store.write_json(join(snapshot, SNAPSHOT_MARKER), {"epoch": epochs_done, "files": files})
        for old in self._snapshots()[:-SNAPSHOTS_KEPT]:
            self.store.delete(old)

    def push_logs(self) -> None:
        """Upload the TensorBoard files that changed since the last upload."""
        folder = self.local(RunLayout.TENSORBOARD)
        if not self.in_copy or not folder.is_dir():
            return
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            if self._pushed.get(path) != (stat.st_size, stat.st_mtime_ns):
                self.store.put_file(path, self.file(RunLayout.TENSORBOARD, *path.relative_to(folder).parts))
                self._pushed[path] = (stat.st_size, stat.st_mtime_ns)

    def drop_checkpoints(self) -> None:
        """Training is over: its snapshots are no longer needed (Keras removes its local backup itself)."""
        if self.in_copy:
            self.store.delete(self.file(RunLayout.BACKUP))

    def _snapshots(self) -> list[str]:
        names = [n for n in self.store.listdir(self.file(RunLayout.BACKUP)) if n.startswith("epoch-")]
        return [self.file(RunLayout.BACKUP, name) for name in sorted(names)]
