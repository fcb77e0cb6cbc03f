"""PID 1's early mounts and cgroups, and the list it unmounts (in reverse) at shutdown.

On a board: proc, sys, devtmpfs, /dev/pts, /dev/shm, /run and the cgroups. In
the sandbox only a fresh /proc (our own pid namespace) and a cgroup layout crun
accepts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pvpy.device import _linux
from pvpy.log import get_logger

log = get_logger("init")

CGROUP_ROOT = "/sys/fs/cgroup"


class Mounts:
    """The filesystems PID 1 mounted (or adopted), in mount order."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        """Mount unless something is mounted there already; a failure is logged, not
        raised: PID 1 goes on with what it has."""
        if _linux.mounted(target):
            return
        try:
            os.makedirs(target, exist_ok=True)
            _linux.mount(source, target, fstype, flags, data)
            self.targets.append(target)
        except OSError as e:
            log.warning("mount failed", target=target, fstype=fstype, error=str(e))

    def adopt(self, target: str) -> None:
        """A mount made elsewhere (the storage, the Pi's config partition) that
        PID 1 unmounts at shutdown too."""
        self.targets.append(target)

    def unmount_all(self) -> None:
        """Detach everything, newest first (best effort: PID 1 is shutting down)."""
        for target in reversed(self.targets):
            with contextlib.suppress(OSError):
                _linux.umount(target, _linux.MNT_DETACH)


def early_mounts(mounts: Mounts, sandbox: bool, run_dir: Path) -> None:
    nosuid_nodev_noexec = _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC
    if sandbox:
        # Our own pid namespace needs its own /proc (private mount ns).
        _linux.mount("proc", "/proc", "proc", nosuid_nodev_noexec)
        mounts.adopt("/proc")
    else:
        mounts.mount("proc", "/proc", "proc", nosuid_nodev_noexec)
        mounts.mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec)
        mounts.mount("devtmpfs", "/dev", "devtmpfs", _linux.MS_NOSUID, "mode=0755")
        mounts.mount("devpts", "/dev/pts", "devpts", _linux.MS_NOSUID | _linux.MS_NOEXEC,
                     "gid=5,mode=620,ptmxmode=666")  # fmt: skip
        mounts.mount("tmpfs", "/dev/shm", "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV,
                     "mode=1777")  # fmt: skip
        mounts.mount("tmpfs", "/run", "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "mode=755")
    setup_cgroups(mounts, sandbox)
    run_dir.mkdir(parents=True, exist_ok=True)


def setup_cgroups(mounts: Mounts, sandbox: bool) -> None:
    """Give crun a cgroup layout it accepts: cgroup2 alone, or plain v1.

    crun refuses hybrid layouts (cgroup2 holding a controller beside v1),
    so a sandbox on a hybrid host drops the v2 mount in its private mount
    namespace; a board mounts cgroup2 alone when the kernel has it.
    """
    if sandbox:
        sandbox_cgroups()
        return
    if _linux.mounted(CGROUP_ROOT):
        return
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "cgroup2" in filesystems:
        mounts.mount("cgroup2", CGROUP_ROOT, "cgroup2", _linux.MS_NOSUID | _linux.MS_NODEV
                     | _linux.MS_NOEXEC, "nsdelegate")  # fmt: skip
        with contextlib.suppress(OSError):
            controllers = Path(f"{CGROUP_ROOT}/cgroup.controllers").read_text().split()
            Path(f"{CGROUP_ROOT}/cgroup.subtree_control").write_text(
                " ".join(f"+{c}" for c in controllers)
            )
        return
    mounts.mount("tmpfs", CGROUP_ROOT, "tmpfs", 0, "mode=755")
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, _, _, enabled = line.split()
        if enabled == "1":
            mounts.mount("cgroup", f"{CGROUP_ROOT}/{name}", "cgroup", 0, name)


def sandbox_cgroups() -> None:
    """On a hybrid host, rebuild /sys/fs/cgroup with the v1 hierarchies only.

    A fresh tmpfs of our own (private mount namespace) gets each v1
    hierarchy mounted again with the host's options, and the host's
    symlinks (cpu -> cpu,cpuacct). Merely unmounting the v2 part would let
    crun write stray files into the host's own /sys/fs/cgroup tmpfs.
    """
    root = CGROUP_ROOT
    v1: list[tuple[str, str]] = []
    hybrid = False
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mountpoint, fstype, options = fields[4], fields[sep + 1], fields[sep + 3]
            if os.path.dirname(mountpoint) != root:
                continue
            if fstype == "cgroup2":
                hybrid = True
            elif fstype == "cgroup":
                opts = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
                v1.append((os.path.basename(mountpoint), opts))
    if not (hybrid and v1):
        return
    links = {e.name: os.readlink(e.path) for e in os.scandir(root) if e.is_symlink()}
    _linux.mount("cgroup_root", root, "tmpfs", 0, "mode=755")
    for name, opts in v1:
        os.mkdir(f"{root}/{name}")
        _linux.mount("cgroup", f"{root}/{name}", "cgroup", 0, opts)
    for name, target in links.items():
        with contextlib.suppress(OSError):
            os.symlink(target, f"{root}/{name}")
    log.info("cgroup: hybrid host, sandbox uses the v1 hierarchies", hierarchies=len(v1))
