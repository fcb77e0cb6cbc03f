"""Containers as OCI runtime bundles, run by crun (or runc, same bundle).

For each container of a revision:

1. its rootfs image object (squashfs) is loop-mounted read-only, once per
   image, under ``RUN/images/<sha256>``;
2. an overlay joins that lower layer with a writable upper whose lifetime
   follows the container's ``writable`` persistence: ``revision``
   (``STORAGE/trails/<rev>/disks/<ctr>/``), ``permanent``
   (``STORAGE/disks/permanent/<ctr>/``) or ``boot`` (``RUN/volumes``, tmpfs);
3. volumes become bind mounts with the same three lifetimes;
4. ``RUN/containers/<name>/config.json`` follows the OCI runtime-spec;
5. ``crun --root RUN/crun run --bundle ... <name>`` runs it in the foreground,
   so the crun process is the supervisor's child and its exit status is the
   container's.

The host OS container is privileged in the init user namespace: every
capability this kernel lets us hold, host /dev, /sys read-write, no masked
paths. Every container gets systemd's container interface
(systemd.io/CONTAINER_INTERFACE): ``container=pvpy``, /run/systemd/container,
/run a tmpfs, its own /dev/console (a pty PID 1 reads into its log,
``managed.Console``), and a cgroup namespace with its own cgroup subtree at
/sys/fs/cgroup (``confinement.cgroup_mounts``): what it does to its cgroups
and mounts stays out of the hierarchies PID 1 starts containers in. App
containers get their own namespaces, the capabilities and cgroup limits of
their manifest (Podman's capability set by default), masked /proc paths, no
new privileges, a read-only /sys unless ``privileges.sys`` says rw, a devices
cgroup allow-list and containers-common's default seccomp profile
(``pvpy.device.confinement``); their readiness checks run with no new
privileges too.

Outside failures (mount, crun) are translated to ContainerError here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pvpy import _run
from pvpy._record import Record
from pvpy.device import _linux, confinement
from pvpy.device.confinement import CGROUP1, CGROUP_ROOT, cgroup_mounts, read_cgroup_layout
from pvpy.errors import CommandError, ContainerError
from pvpy.log import get_logger
from pvpy.state.model import GLIBC_SIGRTMIN, SECCOMP_DEFAULT, Container, Volume
from pvpy.store import remove_tree

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

log = get_logger("runtime")

RUNTIMES = ("crun", "runc")
CONTROL_DIR_IN_CONTAINER = "/run/pvpy"
# `container=` and /run/systemd/container name who runs the container: systemd's
# container interface (systemd.io/CONTAINER_INTERFACE)
CONTAINER_MANAGER = "pvpy"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# capability(7) numbers, for reading CapBnd.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware",
]  # fmt: skip
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]  # fmt: skip


def bounding_capabilities() -> list[str]:
    """The capabilities this process may pass on (CapBnd of /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    mask = int(line.split()[1], 16)
                    return [c for i, c in enumerate(CAPABILITIES) if mask >> i & 1]
    except OSError:
        pass
    return list(CAPABILITIES)


class Paths(Record):
    """Where a device keeps things: persistent storage and the volatile run dir."""

    storage: Path
    run: Path

    @property
    def crun_root(self) -> Path:
        return self.run / "crun"

    def image_mount(self, sha256: str) -> Path:
        return self.run / "images" / sha256

    def bundle(self, name: str) -> Path:
        return self.run / "containers" / name

    def control_dir(self, name: str) -> Path:
        return self.run / "control" / name

    def persistent_dir(self, persistence: str, revision: int, name: str) -> Path:
        """Root of a container's writable data of one lifetime."""
        if persistence == "permanent":
            return self.storage / "disks" / "permanent" / name
        if persistence == "revision":
            return self.storage / "trails" / str(revision) / "disks" / name
        return self.run / "disks" / name  # boot: emptied by every boot

    def log_file(self, name: str) -> Path:
        return self.storage / "logs" / f"{name}.log"


def signal_argument(name: str) -> str:
    """``name`` (a state's stop_signal: ``TERM``, ``RTMIN+3``...) as `crun kill` and
    `runc kill` take it. Real-time signals go as numbers, which both read: crun's signal
    table names RTMIN+N only up to +15 (the rest RTMAX-N) and reads a name it lacks
    with strtol, as signal 0."""
    if name.startswith("RTMIN+"):
        return str(GLIBC_SIGRTMIN + int(name[len("RTMIN+") :]))
    return name


def _cpu_shares(weight: int) -> int:
    # cgroup v2 cpu.weight (1..10000) to v1 cpu.shares (2..262144), as runc maps it.
    return 2 + ((weight - 1) * 262142) // 9999


def oci_config(
    c: Container,
    *,
    rootfs: Path,
    volumes: dict[str, Path],
    control_dir: Path,
    cgroups_path: str,
    manager_file: Path,
    console: str | None = None,
    cgroup_layout: str = CGROUP1,
) -> dict[str, Any]:
    """The OCI runtime-spec config.json of container ``c``. ``manager_file`` holds
    ``CONTAINER_MANAGER`` and becomes the container's /run/systemd/container;
    ``console`` (a pty's /dev/pts/N) its /dev/console; ``cgroup_layout`` is PID 1's
    (``confinement.read_cgroup_layout``)."""
    host = c.is_host_os
    available = bounding_capabilities()
    wanted = available if host and not c.capabilities else list(c.capabilities)
    caps = [cap for cap in wanted if cap in available]
    dropped = sorted(set(wanted) - set(caps))
    if dropped:
        log.info("capabilities unavailable on this kernel", container=c.name, dropped=dropped)
    env = [
        DEFAULT_PATH_ENV,
        # systemd's container interface: without it systemd as a container's init takes
        # itself for a machine's (waits for the kernel's console, mounts over cgroups)
        f"container={CONTAINER_MANAGER}",
        f"HOSTNAME={c.hostname}",
        f"PVPY_CONTAINER={c.name}",
        # `echo READY=1 > $PVPY_NOTIFY` marks the container READY (readiness: notify)
        f"PVPY_NOTIFY={CONTROL_DIR_IN_CONTAINER}/notify",
    ]
    env += [f"{k}={v}" for k, v in c.env if k not in ("PATH", "container")]
    env += [f"PATH={v}" for k, v in c.env if k == "PATH"]

    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
    ]
    if host:
        mounts += [
            {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind", "rw"]},
            {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "rw"]},
        ]  # fmt: skip
    else:
        mounts += [
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", c.privileges.sys]},
        ]  # fmt: skip
    # The host OS's over PID 1's own (its /sys is an rbind of PID 1's): what systemd
    # creates in or remounts there stays out of the hierarchies PID 1 and the other
    # containers run in.
    mounts += cgroup_mounts(c, cgroup_layout, cgroups_path)
    mounts.append(
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755"]}
    )  # fmt: skip
    mounts.append(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]}
    )  # fmt: skip
    if console is not None:
        # after /dev: on the host OS, over the device's real console
        mounts.append(
            {"destination": "/dev/console", "type": "bind", "source": console,
             "options": ["bind", "rw"]}
        )  # fmt: skip
    mounts.append(
        {"destination": "/run/systemd/container", "type": "bind", "source": str(manager_file),
         "options": ["bind", "rw"]}  # rw: systemd writes it again at boot
    )  # fmt: skip
    mounts.append(
        {"destination": CONTROL_DIR_IN_CONTAINER, "type": "bind", "source": str(control_dir),
         "options": ["bind", "rw"]}
    )  # fmt: skip
    for v in c.volumes:
        mounts.append(
            {"destination": v.target, "type": "bind", "source": str(volumes[v.name]),
             "options": ["rbind", "rw"]}
        )  # fmt: skip
    for m in c.mounts:
        entry: dict[str, Any] = {"destination": m.target, "type": m.type, "source": m.source}
        options = list(m.options)
        if m.type == "bind" and not any(o in ("bind", "rbind") for o in options):
            options.insert(0, "rbind")
        if options:
            entry["options"] = options
        mounts.append(entry)

    own_namespaces = list(c.namespaces)
    if "cgroup" not in own_namespaces:
        own_namespaces.append("cgroup")  # for its own cgroup mount, above
    namespaces = [{"type": "mount"}] + [{"type": ns} for ns in own_namespaces]
    if c.network == "isolated":
        namespaces.append({"type": "network"})

    resources: dict[str, Any] = {}
    limits = c.cgroup
    if limits.memory_max is not None:
        # swap equal to the limit: no extra swap beyond memory
        resources["memory"] = {"limit": limits.memory_max, "swap": limits.memory_max}
    if limits.pids_max is not None:
        resources["pids"] = {"limit": limits.pids_max}
    cpu: dict[str, Any] = {}
    if limits.cpu_weight is not None:
        cpu["shares"] = _cpu_shares(limits.cpu_weight)
    if limits.cpu_max_percent is not None:
        cpu["period"] = 100_000
        cpu["quota"] = limits.cpu_max_percent * 1_000
    if cpu:
        resources["cpu"] = cpu
    # devices: the host OS has them all; an app what confinement allows it
    resources["devices"] = (
        [{"allow": True, "access": "rwm"}] if host else confinement.device_rules(c)
    )

    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": resources,
    }
    if not host:
        linux["maskedPaths"] = MASKED_PATHS
        linux["readonlyPaths"] = READONLY_PATHS
        if c.devices:
            linux["devices"] = confinement.device_nodes(c)
    if c.seccomp == SECCOMP_DEFAULT:
        try:
            linux["seccomp"] = confinement.default_seccomp(caps)
        except (OSError, ValueError) as e:
            # never run an app unconfined because the profile went missing
            raise ContainerError(f"{c.name}: cannot read the seccomp profile: {e}") from e

    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": c.uid, "gid": c.gid},
            "args": list(c.args),
            "env": env,
            "cwd": c.cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "noNewPrivileges": not host,
        },
        "root": {"path": str(rootfs), "readonly": False},
        **({"hostname": c.hostname} if "uts" in c.namespaces else {}),
        "mounts": mounts,
        "linux": linux,
    }


if TYPE_CHECKING:
    from typing import Protocol

    class ContainerRuntime(Protocol):
        """What the supervisor asks of a runtime: ``Runtime`` below on a device, a fake
        in tests/test_supervisor.py (where crun cannot run for unit tests)."""

        @property
        def paths(self) -> Paths: ...
        def prepare(self, c: Container, revision: int, *, console: str | None = None) -> Path: ...
        def cleanup(self, c: Container) -> None: ...
        def remove_cgroups(self) -> None: ...
        def run_argv(self, c: Container) -> list[str]: ...
        def exec_argv(self, c: Container, argv: list[str]) -> list[str]: ...
        def kill(self, name: str, signal_name: str = "TERM") -> bool: ...
        def init_pid(self, c: Container) -> int | None: ...


class Runtime:
    """An OCI runtime CLI (crun or runc) plus the mounts a bundle needs."""

    def __init__(self, paths: Paths, binary: str = "crun", cgroup_parent: str = "pvpy") -> None:
        if binary not in RUNTIMES:
            raise ContainerError(f"unknown runtime {binary!r} (one of {', '.join(RUNTIMES)})")
        if _run.which(binary) is None:
            raise ContainerError(f"{binary} not found: install Debian's {binary} package")
        self.binary = binary
        self.paths = paths
        self.cgroup_parent = cgroup_parent
        self._image_users: dict[str, set[str]] = {}
        self._cgroup_layout: str | None = None  # read once: PID 1 set it up before us

    # -- mounts -------------------------------------------------------------

    def _mount_image(self, sha256: str, user: str) -> Path:
        target = self.paths.image_mount(sha256)
        if not _linux.mounted(str(target)):
            target.mkdir(parents=True, exist_ok=True)
            image = self.paths.storage / "objects" / sha256
            try:
                _run.call(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(target)])
            except CommandError as e:
                raise ContainerError(f"{user}: cannot mount image {sha256[:12]}: {e}") from e
        self._image_users.setdefault(sha256, set()).add(user)
        return target

    def _release_image(self, sha256: str, user: str) -> None:
        users = self._image_users.get(sha256, set())
        users.discard(user)
        if not users:
            target = self.paths.image_mount(sha256)
            if _linux.mounted(str(target)):
                try:
                    _linux.umount(str(target), _linux.MNT_DETACH)
                except OSError as e:
                    log.warning("umount failed", target=str(target), error=str(e))
            self._image_users.pop(sha256, None)

    def cgroup_layout(self) -> str:
        if self._cgroup_layout is None:
            self._cgroup_layout = read_cgroup_layout()
        return self._cgroup_layout

    def _volume_dir(self, c: Container, v: Volume, revision: int, image: Path) -> Path:
        path = self.paths.persistent_dir(v.persistence, revision, c.name) / "volumes" / v.name
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            # the owner and mode of the image's directory there (as Docker does), else
            # the container's user: a non-root app can write to its new volume
            uid, gid, mode = _linux.dir_owner_inside(image, v.target) or (c.uid, c.gid, 0o755)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        return path

    def prepare(self, c: Container, revision: int, *, console: str | None = None) -> Path:
        """Mount image and overlay, write config.json (``console``: the pty to bind
        at its /dev/console, if any); return the bundle dir.

        Raises ContainerError (and leaves nothing mounted) on failure.
        """
        bundle = self.paths.bundle(c.name)
        rootfs = bundle / "rootfs"
        self.cleanup(c)  # whatever a previous run or boot left behind
        lower = self._mount_image(c.rootfs.sha256, c.name)
        try:
            writable = self.paths.persistent_dir(c.writable, revision, c.name)
            upper, work = writable / "upper", writable / "work"
            for d in (upper, work, rootfs):
                d.mkdir(parents=True, exist_ok=True)
            # work dir must be empty and on the same filesystem as upper
            remove_tree(work)
            work.mkdir()
            options = f"lowerdir={lower},upperdir={upper},workdir={work}"
            try:
                _linux.mount("overlay", str(rootfs), "overlay", 0, options)
            except OSError as e:
                raise ContainerError(f"{c.name}: cannot mount overlay: {e.strerror}") from e
            volumes = {v.name: self._volume_dir(c, v, revision, lower) for v in c.volumes}
            control = self.paths.control_dir(c.name)
            control.mkdir(parents=True, exist_ok=True)
            manager_file = bundle / "systemd-container"
            manager_file.write_text(CONTAINER_MANAGER + "\n")
            config = oci_config(
                c,
                rootfs=rootfs,
                volumes=volumes,
                control_dir=control,
                cgroups_path=f"{self.cgroup_parent}/{c.name}",
                manager_file=manager_file,
                console=console,
                cgroup_layout=self.cgroup_layout(),
            )
            (bundle / "config.json").write_text(json.dumps(config, indent=1))
        except BaseException:
            self.cleanup(c)
            raise
        return bundle

    def cleanup(self, c: Container) -> None:
        """Forget the container in crun and unmount its rootfs (idempotent)."""
        self.delete(c.name)
        rootfs = self.paths.bundle(c.name) / "rootfs"
        while _linux.mounted(str(rootfs)):
            try:
                _linux.umount(str(rootfs), _linux.MNT_DETACH)
            except OSError as e:
                log.warning("umount failed", target=str(rootfs), error=str(e))
                break
        self._release_image(c.rootfs.sha256, c.name)

    def remove_cgroups(self) -> None:
        """Remove our (empty) cgroup parent in every hierarchy, v1 or v2."""
        root = Path(CGROUP_ROOT)
        candidates = [root / self.cgroup_parent]
        if root.is_dir():
            candidates += [d / self.cgroup_parent for d in root.iterdir() if d.is_dir()]
        for top in candidates:
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as e:
                    log.debug("cgroup not removed", path=dirpath, error=str(e))

    # -- the runtime CLI ------------------------------------------------------

    def _base(self) -> list[str]:
        argv = [self.binary, "--root", str(self.paths.crun_root)]
        if self.binary == "crun":
            argv.append("--cgroup-manager=cgroupfs")
        return argv

    def run_argv(self, c: Container) -> list[str]:
        """argv that runs the container in the foreground (the caller spawns it)."""
        bundle = self.paths.bundle(c.name)
        return [
            *self._base(), "run", "--bundle", str(bundle),
            "--pid-file", str(bundle / "pid"), c.name,
        ]  # fmt: skip

    def exec_argv(self, c: Container, argv: list[str]) -> list[str]:
        """argv that runs ``argv`` in the running container (readiness checks). Without
        --no-new-privs the exec'd process could gain privileges (setuid binaries, file
        capabilities) that the container's own processes cannot."""
        return [*self._base(), "exec", "--no-new-privs", c.name, *argv]

    def kill(self, name: str, signal_name: str = "TERM") -> bool:
        """Send ``signal_name`` to the container's init; False when it could not be
        sent (e.g. crun has not written the container's state yet: still creating)."""
        try:
            _run.call([*self._base(), "kill", name, signal_argument(signal_name)], timeout=10)
        except CommandError as e:
            log.debug("kill failed", container=name, error=str(e))
            return False
        return True

    def delete(self, name: str) -> None:
        # Both runtimes keep a container's state in ROOT/<name>/: without it there is
        # nothing to forget. Every first start of a boot is such a case, and spawning
        # `crun delete` for it held PID 1's loop ~11 ms per container.
        if not os.path.lexists(self.paths.crun_root / name):
            return
        try:
            _run.call([*self._base(), "delete", "--force", name], timeout=10, check=False)
        except CommandError as e:
            log.debug("delete failed", container=name, error=str(e))

    def init_pid(self, c: Container) -> int | None:
        """Host pid of the container's init, once crun has written it."""
        try:
            return int((self.paths.bundle(c.name) / "pid").read_text().strip())
        except (OSError, ValueError):
            return None
