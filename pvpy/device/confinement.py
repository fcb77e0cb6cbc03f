"""What confines an app container beyond its namespaces: the OCI ``linux.resources.devices``
allow-list and ``linux.seccomp`` filter of its config.json (issue #13), and which of its
own cgroups it may write (issue #15).

- Devices: deny all, then allow what runc and Podman allow every container (null, zero,
  full, random, urandom, tty, console, ptmx, /dev/pts) plus the ``devices`` of the
  manifest. Without this an app's cgroup allowed every device: with CAP_MKNOD (Docker's
  default set had it) it could make and read a node of the boot disk. crun adds
  ``c *:* m`` and ``b *:* m`` after these rules, as runc does: making a node stays a
  matter of CAP_MKNOD, opening it a matter of this list.
- Seccomp: containers-common's default profile (``seccomp.json`` beside this module: a
  copy of Debian's /usr/share/containers/seccomp.json, which a device image does not
  have), turned into the runtime-spec form the way containers/common does it for
  Podman: a rule applies only if its ``includes`` hold (every listed capability held,
  this architecture listed, the kernel at least ``minKernel``) and its ``excludes`` do
  not (no listed capability held, this architecture not listed).

- Cgroups: every container sees its own cgroup subtree at /sys/fs/cgroup (a cgroup
  namespace), writable only where that cannot lift its manifest's limits
  (``cgroup_mounts``).

PID 1 writes bundles, so this is standard library only; the profile is read once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

    from pvpy.state.model import Container

PROFILE = Path(__file__).with_name("seccomp.json")

CGROUP_ROOT = "/sys/fs/cgroup"
# What PID 1's /sys/fs/cgroup is (``read_cgroup_layout``): cgroup2 mounted with nsdelegate
# or without, v1 hierarchies with a name=systemd one or without.
CGROUP2_DELEGATING, CGROUP2, CGROUP1_SYSTEMD, CGROUP1 = "v2-nsdelegate", "v2", "v1-systemd", "v1"

# (type, major, minor or None for any): the devices every container may use.
DEFAULT_DEVICES = (
    ("c", 1, 3),  # null
    ("c", 1, 5),  # zero
    ("c", 1, 7),  # full
    ("c", 1, 8),  # random
    ("c", 1, 9),  # urandom
    ("c", 5, 0),  # tty
    ("c", 5, 1),  # console
    ("c", 5, 2),  # ptmx
    ("c", 136, None),  # /dev/pts/*
)

# uname -m -> (libseccomp's name of the architecture, the short name the profile's
# includes/excludes use: libseccomp-golang's ScmpArch.String(), as containers/common)
ARCHITECTURES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "armv7l": ("SCMP_ARCH_ARM", "arm"),
    "armv6l": ("SCMP_ARCH_ARM", "arm"),
    "i686": ("SCMP_ARCH_X86", "x86"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
}

_profile: dict[str, Any] | None = None


def device_rules(c: Container) -> list[dict[str, Any]]:
    """``linux.resources.devices`` of an app: deny all, allow the defaults and its own."""
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    for kind, major, minor in DEFAULT_DEVICES:
        rule: dict[str, Any] = {"allow": True, "type": kind, "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        rules.append(rule)
    for d in c.devices:
        rules.append(
            {"allow": True, "type": d.type, "major": d.major, "minor": d.minor, "access": d.access}
        )
    return rules


def device_nodes(c: Container) -> list[dict[str, Any]]:
    """``linux.devices``: the nodes crun makes in the app's /dev, owned by its user."""
    return [
        {"path": d.path, "type": d.type, "major": d.major, "minor": d.minor,
         "fileMode": 0o660, "uid": c.uid, "gid": c.gid}
        for d in c.devices
    ]  # fmt: skip


def _kernel_at_least(minimum: str, release: str) -> bool:
    def numbers(text: str) -> tuple[int, ...]:
        out = []
        for part in text.split("-")[0].split(".")[:3]:
            digits = "".join(ch for ch in part if ch.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    return numbers(release) >= numbers(minimum)


def _applies(rule: dict[str, Any], caps: set[str], goarch: str, release: str) -> bool:
    includes = rule.get("includes") or {}
    excludes = rule.get("excludes") or {}
    if includes.get("arches") and goarch not in includes["arches"]:
        return False
    if any(cap not in caps for cap in includes.get("caps") or ()):
        return False
    if includes.get("minKernel") and not _kernel_at_least(includes["minKernel"], release):
        return False
    if goarch in (excludes.get("arches") or ()):
        return False
    if any(cap in caps for cap in excludes.get("caps") or ()):
        return False
    return not (excludes.get("minKernel") and _kernel_at_least(excludes["minKernel"], release))


def _load_profile() -> dict[str, Any]:
    global _profile
    if _profile is None:
        _profile = json.loads(PROFILE.read_text("utf-8"))
    return _profile


def default_seccomp(
    capabilities: list[str], machine: str | None = None, release: str | None = None
) -> dict[str, Any]:
    """``linux.seccomp`` for a container holding ``capabilities`` on this machine
    (or the ``uname -m`` and kernel release given). Raises OSError or ValueError
    when the shipped profile cannot be read: a broken package, not bad input."""
    uname = os.uname()
    machine = machine or uname.machine
    release = release or uname.release
    profile = _load_profile()
    native, goarch = ARCHITECTURES.get(machine, ("", machine))
    architectures = [native] if native else []
    for entry in profile.get("archMap") or ():
        if entry["architecture"] == native:
            architectures += entry.get("subArchitectures") or []
    caps = set(capabilities)
    syscalls = []
    for rule in profile["syscalls"]:
        if not _applies(rule, caps, goarch, release):
            continue
        out: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            out["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                for a in rule["args"]
            ]
        syscalls.append(out)
    seccomp: dict[str, Any] = {"defaultAction": profile["defaultAction"], "syscalls": syscalls}
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    if architectures:
        seccomp["architectures"] = architectures
    return seccomp


def read_cgroup_layout(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Which cgroup layout this mount namespace has at /sys/fs/cgroup (one of the
    CGROUP* names; CGROUP1 also when nothing is mounted there)."""
    v1_named_systemd = False
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mountpoint, fstype = fields[4], fields[sep + 1]
                if mountpoint == CGROUP_ROOT and fstype == "cgroup2":
                    super_options = fields[sep + 3].split(",")
                    return CGROUP2_DELEGATING if "nsdelegate" in super_options else CGROUP2
                if mountpoint == f"{CGROUP_ROOT}/systemd" and fstype == "cgroup":
                    v1_named_systemd = True
    except (OSError, ValueError, IndexError):
        pass
    return CGROUP1_SYSTEMD if v1_named_systemd else CGROUP1


def cgroup_mounts(c: Container, layout: str, cgroups_path: str) -> list[dict[str, Any]]:
    """The mounts that show ``c`` its own cgroup subtree at /sys/fs/cgroup (in its
    cgroup namespace, a cgroup mount's root is the container's cgroup).

    Writable where that cannot lift the limits of its manifest: for the host OS
    (privileged: it may anyway); on cgroup2 mounted with nsdelegate, which keeps a
    namespace from writing its root's own limits; and on v1 in the name=systemd
    hierarchy only (no controller, no limit: where systemd makes its groups, as in
    systemd-nspawn and Podman). A v1 controller hierarchy, or cgroup2 without
    nsdelegate, is read-only for an app: its root's memory.limit_in_bytes (memory.max)
    is the app's own limit, writable by its root user."""
    if c.is_host_os or layout == CGROUP2_DELEGATING:
        mode = "rw"
    else:
        mode = "ro"
    mounts: list[dict[str, Any]] = [
        {"destination": CGROUP_ROOT, "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", mode]},
    ]  # fmt: skip
    if mode == "ro" and layout == CGROUP1_SYSTEMD:
        # crun mounts no hierarchy of its own where a mount is given: this one binds
        # the container's group, which crun made before it mounts anything
        mounts.append(
            {"destination": f"{CGROUP_ROOT}/systemd", "type": "bind",
             "source": f"{CGROUP_ROOT}/systemd/{cgroups_path.strip('/')}",
             "options": ["bind", "nosuid", "noexec", "nodev", "rw"]}
        )  # fmt: skip
    return mounts
