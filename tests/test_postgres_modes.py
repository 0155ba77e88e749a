"""The server's own PostgreSQL (`fmnist.ops.postgres`) keeps every folder's and file's mode: it widens no
folder it did not create (as root, the `postgres` user it runs as gets a folder of its own instead), and
its log and password are 0600 from their first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fmnist.ops.postgres import LocalPostgres

pytestmark = pytest.mark.e2e  # needs PostgreSQL (make postgres)


def modes(folder: Path) -> dict[str, int]:
    return {str(above): stat.S_IMODE(above.stat().st_mode) for above in [folder, *folder.parents]}


def test_a_cluster_under_closed_folders_widens_none_and_keeps_its_files_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)  # a home folder no other user may enter
    (home / "project").mkdir(mode=0o750)
    folder = home / "project" / ".prefect" / "postgres"
    before = modes(home / "project")
    old_umask = os.umask(0o000)  # the files' modes must not depend on the caller's umask
    cluster = LocalPostgres(folder)
    try:
        cluster.start()
        assert modes(home / "project") == before  # nothing above the cluster widened
        for private in (cluster.password_file, cluster.log):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        cluster.stop()
        cluster.start()  # started again from the same data
        assert (cluster.data / "PG_VERSION").exists()
    finally:
        os.umask(old_umask)
        cluster.remove()
    assert not folder.exists() and not cluster.data_dir.exists()


def test_a_log_made_readable_before_is_narrowed_and_a_half_made_cluster_started_over(tmp_path: Path) -> None:
    folder = tmp_path / "postgres"
    folder.mkdir(mode=0o700)
    (folder / "postgres.log").write_text("an older log\n")
    (folder / "postgres.log").chmod(0o644)
    (folder / "data").mkdir(mode=0o700)  # initdb stopped part way: no PG_VERSION
    cluster = LocalPostgres(folder)
    try:
        cluster.start()
        assert stat.S_IMODE(cluster.log.stat().st_mode) == 0o600
        assert cluster.log.read_text().startswith("an older log\n")
    finally:
        cluster.remove()
