"""Readiness and the notify FIFO (pvpy.device.readiness): what a container can plant
in its writable /run/pvpy never gets opened by PID 1."""

from __future__ import annotations

import os
import select
import stat
from pathlib import Path

import pytest

from pvpy.device.readiness import open_notify, read_notify


def _check_fifo_works(path: Path, read_fd: int, keep_fd: int) -> None:
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"READY=1\n")
    os.close(writer)
    assert select.select([read_fd], [], [], 1)[0] == [read_fd]
    assert read_notify(read_fd) == ["READY=1"]
    os.close(read_fd)
    os.close(keep_fd)


def test_makes_a_fifo_when_there_is_none(tmp_path: Path) -> None:
    path = tmp_path / "ctl" / "notify"
    _check_fifo_works(path, *open_notify(path))


@pytest.mark.parametrize("plant", ["symlink", "regular", "dangling"])
def test_what_a_container_planted_is_replaced_not_opened(tmp_path: Path, plant: str) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_text("host data\n")
    path = tmp_path / "notify"
    if plant == "symlink":
        path.symlink_to(host_file)
    elif plant == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.write_text("not a fifo\n")
    before = os.stat(host_file)
    _check_fifo_works(path, *open_notify(path))
    after = os.stat(host_file)
    assert host_file.read_text() == "host data\n"
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert not (tmp_path / "nowhere").exists()


def test_a_fifo_already_there_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    os.mkfifo(path, 0o620)
    inode = os.lstat(path).st_ino
    read_fd, keep_fd = open_notify(path)
    assert os.fstat(read_fd).st_ino == inode
    _check_fifo_works(path, read_fd, keep_fd)
