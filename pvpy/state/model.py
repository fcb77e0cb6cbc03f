"""The state manifest as typed, immutable data.

``State.from_dict`` assumes a document that already passed ``validate``
(see ``pvpy.state.validate``); it fills every default so the rest of pvpy
never guesses. ``to_dict`` writes every field out explicitly, so
``State.from_dict(s.to_dict()) == s`` and a built state.json says exactly
what the device will do.

This module imports only the standard library, and little of it: the device's
PID 1 reads verified states through it, so its classes are ``pvpy._record``
records (not dataclasses) and ``typing`` is for the type checker only.
"""

from __future__ import annotations

from pvpy._record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

SPEC = "pvpy-state@1"

ROLE_HOST_OS = "host-os"
ROLE_APP = "app"

DEFAULT_GROUP_TIMEOUT_MS = 30_000
DEFAULT_GROUPS = ("data", "root", "platform", "app")

# Podman's default capability set (containers-common's containers.conf
# default_capabilities): enough for ordinary services, nothing that reaches the
# kernel or the hardware. Unlike Docker's, no CAP_NET_RAW (apps share the host's
# network namespace by default: a raw socket could sniff the LAN, API token
# included), no CAP_MKNOD and no CAP_AUDIT_WRITE.
DEFAULT_APP_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

# glibc's SIGRTMIN: the kernel's 32 plus the two glibc keeps for itself. A state's
# "RTMIN+N" is signal 34+N, as crun, runc and Docker number it and as systemd (a glibc
# program) means it when it halts on SIGRTMIN+3.
GLIBC_SIGRTMIN = 34
SECCOMP_DEFAULT = "default"  # containers-common's profile, for the container's capabilities
SECCOMP_UNCONFINED = "unconfined"


class ObjectRef(Record):
    """A content-addressed blob: its sha256 (hex) and its size in bytes."""

    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectRef:
        return cls(sha256=d["sha256"], size=d["size"])

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class Image(ObjectRef):
    """A filesystem image object (a rootfs, the modules, the firmware)."""

    format: str = "squashfs"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Image:
        return cls(sha256=d["sha256"], size=d["size"], format=d["format"])

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "format": self.format}


def _opt(d: dict[str, Any], key: str, kind: type[ObjectRef]) -> Any:
    return kind.from_dict(d[key]) if key in d else None


class Bsp(Record):
    kernel: ObjectRef | None = None
    initrd: ObjectRef | None = None
    dtb: ObjectRef | None = None
    modules: Image | None = None
    firmware: Image | None = None
    cmdline: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bsp:
        return cls(
            kernel=_opt(d, "kernel", ObjectRef),
            initrd=_opt(d, "initrd", ObjectRef),
            dtb=_opt(d, "dtb", ObjectRef),
            modules=_opt(d, "modules", Image),
            firmware=_opt(d, "firmware", Image),
            cmdline=d.get("cmdline"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("kernel", "initrd", "dtb", "modules", "firmware"):
            ref = getattr(self, key)
            if ref is not None:
                out[key] = ref.to_dict()
        if self.cmdline is not None:
            out["cmdline"] = self.cmdline
        return out

    def objects(self) -> list[ObjectRef]:
        refs = [self.kernel, self.initrd, self.dtb, self.modules, self.firmware]
        return [r for r in refs if r is not None]


class Group(Record):
    name: str
    timeout_ms: int = DEFAULT_GROUP_TIMEOUT_MS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(name=d["name"], timeout_ms=d.get("timeout_ms", DEFAULT_GROUP_TIMEOUT_MS))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timeout_ms": self.timeout_ms}


class Mount(Record):
    target: str
    type: str = "bind"
    source: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mount:
        kind = d.get("type", "bind")
        return cls(
            target=d["target"],
            type=kind,
            source=d.get("source", kind if kind != "bind" else ""),
            options=tuple(d.get("options", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


class Volume(Record):
    """A writable directory mounted into a container.

    persistence: ``revision`` (kept while this revision lives),
    ``permanent`` (survives every update), ``boot`` (emptied at each boot).
    """

    name: str
    target: str
    persistence: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Volume:
        return cls(name=d["name"], target=d["target"], persistence=d["persistence"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "persistence": self.persistence}


class Device(Record):
    """A device node an app may use: created at ``path`` in its /dev and put on its
    devices cgroup allow-list with ``access`` (r, w, m: read, write, mknod)."""

    path: str
    type: str  # "c" (character) or "b" (block)
    major: int
    minor: int
    access: str = "rw"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Device:
        return cls(**{"access": "rw", **d})

    def to_dict(self) -> dict[str, Any]:
        keys = ("path", "type", "major", "minor", "access")
        return {k: getattr(self, k) for k in keys}


class Privileges(Record):
    """What an app reaches of the host beyond its own tree, said out loud in the
    state: bind mounts of host paths (``host_mounts``) and a writable /sys
    (``sys: rw``). The host OS container has both, always."""

    host_mounts: bool = False
    sys: str = "ro"

    @classmethod
    def from_dict(cls, d: dict[str, Any], default: Privileges) -> Privileges:
        return cls(
            host_mounts=d.get("host_mounts", default.host_mounts),
            sys=d.get("sys", default.sys),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"host_mounts": self.host_mounts, "sys": self.sys}


APP_PRIVILEGES = Privileges()
HOST_OS_PRIVILEGES = Privileges(host_mounts=True, sys="rw")


class RestartPolicy(Record):
    policy: str = "on-failure"
    max_retries: int = 10
    backoff_initial_ms: int = 1_000
    backoff_max_ms: int = 60_000
    # Running this long without exiting resets the retry count.
    stable_window_ms: int = 30_000

    @classmethod
    def from_dict(cls, d: dict[str, Any], default: RestartPolicy) -> RestartPolicy:
        return cls(
            policy=d.get("policy", default.policy),
            max_retries=d.get("max_retries", default.max_retries),
            backoff_initial_ms=d.get("backoff_initial_ms", default.backoff_initial_ms),
            backoff_max_ms=d.get("backoff_max_ms", default.backoff_max_ms),
            stable_window_ms=d.get("stable_window_ms", default.stable_window_ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "max_retries": self.max_retries,
            "backoff_initial_ms": self.backoff_initial_ms,
            "backoff_max_ms": self.backoff_max_ms,
            "stable_window_ms": self.stable_window_ms,
        }


APP_RESTART = RestartPolicy()
# The host OS container is not restarted: its end is the device's reboot.
HOST_OS_RESTART = RestartPolicy(policy="no", max_retries=0)


class Readiness(Record):
    """How a container proves READY: a command exits 0, a file appears, a TCP
    port accepts, or the container says READY on its control socket (notify)."""

    type: str
    command: tuple[str, ...] = ()
    path: str = ""
    port: int = 0
    interval_ms: int = 500
    timeout_ms: int = 5_000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Readiness:
        return cls(
            type=d["type"],
            command=tuple(d.get("command", ())),
            path=d.get("path", ""),
            port=d.get("port", 0),
            interval_ms=d.get("interval_ms", 500),
            timeout_ms=d.get("timeout_ms", 5_000),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "interval_ms": self.interval_ms,
            "timeout_ms": self.timeout_ms,
        }
        if self.type == "command":
            out["command"] = list(self.command)
        elif self.type == "file":
            out["path"] = self.path
        elif self.type == "tcp":
            out["port"] = self.port
        return out


class CgroupLimits(Record):
    memory_max: int | None = None
    cpu_weight: int | None = None
    cpu_max_percent: int | None = None
    pids_max: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CgroupLimits:
        return cls(
            memory_max=d.get("memory_max"),
            cpu_weight=d.get("cpu_weight"),
            cpu_max_percent=d.get("cpu_max_percent"),
            pids_max=d.get("pids_max"),
        )

    def to_dict(self) -> dict[str, Any]:
        keys = ("memory_max", "cpu_weight", "cpu_max_percent", "pids_max")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class Container(Record):
    name: str
    rootfs: Image
    args: tuple[str, ...]
    role: str = ROLE_APP
    group: str = "app"
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    hostname: str = ""
    mounts: tuple[Mount, ...] = ()
    capabilities: tuple[str, ...] = DEFAULT_APP_CAPABILITIES
    devices: tuple[Device, ...] = ()
    seccomp: str = SECCOMP_DEFAULT
    privileges: Privileges = APP_PRIVILEGES
    namespaces: tuple[str, ...] = ("pid", "uts", "ipc")
    network: str = "host"
    cgroup: CgroupLimits = CgroupLimits()
    writable: str = "revision"
    volumes: tuple[Volume, ...] = ()
    restart: RestartPolicy = APP_RESTART
    status_goal: str = "STARTED"
    readiness: Readiness | None = None
    depends_on: tuple[str, ...] = ()
    stop_timeout_ms: int = 10_000
    stop_signal: str = "TERM"

    @property
    def is_host_os(self) -> bool:
        return self.role == ROLE_HOST_OS

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Container:
        role = d.get("role", ROLE_APP)
        host = role == ROLE_HOST_OS
        user = d.get("user", {"uid": 0, "gid": 0})
        return cls(
            name=name,
            rootfs=Image.from_dict(d["rootfs"]),
            args=tuple(d["args"]),
            role=role,
            group=d.get("group", "root" if host else "app"),
            env=tuple(sorted(d.get("env", {}).items())),
            cwd=d.get("cwd", "/"),
            uid=user["uid"],
            gid=user["gid"],
            hostname=d.get("hostname", name),
            mounts=tuple(Mount.from_dict(m) for m in d.get("mounts", ())),
            capabilities=tuple(d.get("capabilities", () if host else DEFAULT_APP_CAPABILITIES)),
            devices=tuple(Device.from_dict(x) for x in d.get("devices", ())),
            seccomp=d.get("seccomp", SECCOMP_UNCONFINED if host else SECCOMP_DEFAULT),
            privileges=Privileges.from_dict(
                d.get("privileges", {}), HOST_OS_PRIVILEGES if host else APP_PRIVILEGES
            ),
            namespaces=tuple(d.get("namespaces", ("pid",) if host else ("pid", "uts", "ipc"))),
            network=d.get("network", "host"),
            cgroup=CgroupLimits.from_dict(d.get("cgroup", {})),
            writable=d.get("writable", "revision"),
            volumes=tuple(Volume.from_dict(v) for v in d.get("volumes", ())),
            restart=RestartPolicy.from_dict(
                d.get("restart", {}), HOST_OS_RESTART if host else APP_RESTART
            ),
            status_goal=d.get("status_goal", "STARTED"),
            readiness=Readiness.from_dict(d["readiness"]) if "readiness" in d else None,
            depends_on=tuple(d.get("depends_on", ())),
            stop_timeout_ms=d.get("stop_timeout_ms", 10_000),
            stop_signal=d.get("stop_signal", "TERM"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "group": self.group,
            "rootfs": self.rootfs.to_dict(),
            "args": list(self.args),
            "env": dict(self.env),
            "cwd": self.cwd,
            "user": {"uid": self.uid, "gid": self.gid},
            "hostname": self.hostname,
            "mounts": [m.to_dict() for m in self.mounts],
            "capabilities": list(self.capabilities),
            "devices": [x.to_dict() for x in self.devices],
            "seccomp": self.seccomp,
            "privileges": self.privileges.to_dict(),
            "namespaces": list(self.namespaces),
            "network": self.network,
            "cgroup": self.cgroup.to_dict(),
            "writable": self.writable,
            "volumes": [v.to_dict() for v in self.volumes],
            "restart": self.restart.to_dict(),
            "status_goal": self.status_goal,
            "depends_on": list(self.depends_on),
            "stop_timeout_ms": self.stop_timeout_ms,
            "stop_signal": self.stop_signal,
        }
        if self.readiness is not None:
            out["readiness"] = self.readiness.to_dict()
        return out


class State(Record):
    revision: int
    containers: tuple[Container, ...]
    groups: tuple[Group, ...] = tuple(Group(n) for n in DEFAULT_GROUPS)
    bsp: Bsp = Bsp()
    created: str | None = None
    expires: str | None = None
    fleet: str | None = None  # signed: a device bound to a fleet refuses other fleets' revisions
    description: str = ""
    annotations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        groups = d.get("groups")
        return cls(
            revision=d["revision"],
            containers=tuple(Container.from_dict(n, c) for n, c in sorted(d["containers"].items())),
            groups=(
                tuple(Group.from_dict(g) for g in groups)
                if groups is not None
                else tuple(Group(n) for n in DEFAULT_GROUPS)
            ),
            bsp=Bsp.from_dict(d.get("bsp", {})),
            created=d.get("created"),
            expires=d.get("expires"),
            fleet=d.get("fleet"),
            description=d.get("description", ""),
            annotations=tuple(sorted(d.get("annotations", {}).items())),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "#spec": SPEC,
            "revision": self.revision,
            "description": self.description,
            "annotations": dict(self.annotations),
            "bsp": self.bsp.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "containers": {c.name: c.to_dict() for c in self.containers},
        }
        if self.created is not None:
            out["created"] = self.created
        if self.expires is not None:
            out["expires"] = self.expires
        if self.fleet is not None:
            out["fleet"] = self.fleet
        return out

    def container(self, name: str) -> Container:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def host_os(self) -> Container | None:
        return next((c for c in self.containers if c.is_host_os), None)

    def objects(self) -> dict[str, ObjectRef]:
        """Every object this revision needs, by sha256."""
        refs: dict[str, ObjectRef] = {r.sha256: r for r in self.bsp.objects()}
        for c in self.containers:
            refs[c.rootfs.sha256] = c.rootfs
        return refs

    def start_order(self) -> list[Container]:
        """Containers in start order: by group, then dependencies, then name.

        Assumes a validated state (no cycles, known groups).
        """
        rank = {g.name: i for i, g in enumerate(self.groups)}
        by_name = {c.name: c for c in self.containers}
        ordered: list[Container] = []
        placed: set[str] = set()

        def place(c: Container) -> None:
            if c.name in placed:
                return
            placed.add(c.name)
            for dep in sorted(c.depends_on):
                place(by_name[dep])
            ordered.append(c)

        for c in sorted(self.containers, key=lambda c: (rank[c.group], c.name)):
            place(c)
        return ordered
