"""Local files: hashing, atomic writes that survive a crash (a reader sees the old file or the new one), and
names as messages can show them.

These are the local-disk primitives under `fmnist.storage`, and what a stage uses for the files of its
own local working folder (Keras checkpoints, plots) before they are published to the store.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

_CHUNK = 1 << 20


def printable(text: str) -> str:
    """`text` with any byte that is not UTF-8 (a file name on disk may hold such) shown as an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    """Stable key from ordered parts (content hashes, versions)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class NotARegularFile(OSError):
    """A path that is a symbolic link, a folder, a device or a FIFO where a regular file was expected."""


# Pseudo filesystems (statfs(2)'s f_type) whose "regular files" are the kernel's, wherever they are mounted:
# /proc/kmsg and tracefs's trace_pipe block their reader, /proc/self/mem fails with an I/O error.
KERNEL_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x74726163: "tracefs",
    0x64626720: "debugfs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x62656570: "configfs",
    0x65735543: "fusectl",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
}


@cache
def _fstatfs() -> Callable[[int, ctypes.Array], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs
    fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
    return fstatfs


def kernel_filesystem(fd: int) -> str | None:
    """The name of the kernel's pseudo filesystem `fd` is on (proc, sysfs, ...), or None (a disk, tmpfs, S3's
    scratch; or a system that cannot say)."""
    if (fstatfs := _fstatfs()) is None:
        return None
    status = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux): f_type comes first
    if fstatfs(fd, status) != 0:
        return None
    return KERNEL_FILESYSTEMS.get(ctypes.c_long.from_buffer(status).value & 0xFFFFFFFF)


def open_regular(path: Path, *, follow_symlinks: bool = False) -> io.BufferedReader:
    """Open a regular file for reading, refusing anything else before a byte is read.

    A symbolic link could point at `/dev/zero` or outside the folder being read, a device could be
    endless and a FIFO blocks its reader forever: untrusted input is read only from regular files.
    `follow_symlinks` reads what a link leads to, if that is a regular file (a folder of links to
    files on another disk); the FIFO and the device are refused all the same.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotARegularFile(errno.ELOOP, "a symbolic link; only regular files are read", str(path)) from None
        if exc.errno == errno.ENXIO:  # what opening a Unix socket gives, before any check could look
            raise NotARegularFile(errno.ENXIO, "a socket, not a regular file", str(path)) from None
        raise
    mode = os.fstat(fd).st_mode
    kernel = stat.S_ISREG(mode) and kernel_filesystem(fd)  # its files call themselves regular
    if not stat.S_ISREG(mode) or kernel:
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        kind = f"a kernel file ({kernel})" if kernel else kind
        raise NotARegularFile(errno.EINVAL, f"{kind}, not a regular file", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents, each fsynced into its parent so a crash cannot lose it."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_path(new.parent)


def temp_path_beside(target: Path) -> Path:
    """A unique hidden name in `target`'s folder that keeps its suffix (Keras picks the format from it)."""
    return target.with_name(f".part-{uuid.uuid4().hex}-{target.name}")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; if the block succeeds, fsync it and rename it onto `target`.

    After a crash at any moment `target` holds either its old content or the whole new one.
    """
    make_dirs(target.parent)
    tmp = temp_path_beside(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())
