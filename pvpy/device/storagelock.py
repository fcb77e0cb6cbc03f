"""One device per storage: the lock a running device holds on its storage.

Two devices booted against one storage would run the same containers on the
same writable layers, and the second one's power off would remove the first
one's sockets. The device that runs a storage holds an exclusive flock on
STORAGE/``DEVICE_LOCK`` for as long as it runs: the sandbox launcher (``pvpy
device run``), or on a board PID 1 itself (the only device there; it protects
the board's storage from a sandbox run on it while mounted elsewhere). The
lock file holds the holder's pid, so a refusal can name it. A holder that dies
drops the lock with its last fd: a power cut leaves nothing to clean up.

Stdlib only: PID 1 imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from pvpy import paths
from pvpy.errors import DeviceError

# The lock's name in the storage (belongs in pvpy.paths beside INSTALL_LOCK).
DEVICE_LOCK = paths.DEVICE_LOCK


def lock_storage(storage: Path) -> int:
    """Take ``storage`` for this device; returns the fd that holds the lock (keep
    it open while the device runs; closing it releases the lock).

    Raises DeviceError, naming the holder's pid, when another device holds it;
    nothing in the storage is touched then.
    """
    path = Path(storage) / DEVICE_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise DeviceError(f"cannot open the device lock {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise DeviceError(
                f"{storage} is in use by another device (pid {holder}): power that one off first"
            ) from e
        raise DeviceError(f"cannot lock {path}: {e.strerror}") from e
    with contextlib.suppress(OSError):  # the pid is for messages only
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The pid the holder wrote, or "unknown" (it may not have written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
