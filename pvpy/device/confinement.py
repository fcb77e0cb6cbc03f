"""What confines an app container beyond its namespaces: the OCI ``linux.resources.devices``
allow-list and ``linux.seccomp`` filter of its config.json (issue #13).

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
