"""State manifests: schema, canonical encoding, typed model.

``parse_unverified(data)`` turns bytes into a ``State`` after the schema and the
cross-field rules; it says nothing about who wrote them — that is
``pvpy.trust``'s job.
"""

from __future__ import annotations

import re
from functools import cache

from pvpy.errors import ManifestError, one_line
from pvpy.state import canonical
from pvpy.state.model import (
    DEFAULT_GROUPS,
    SPEC,
    Bsp,
    CgroupLimits,
    Container,
    Device,
    Group,
    Image,
    Mount,
    ObjectRef,
    Privileges,
    Readiness,
    RestartPolicy,
    State,
    Volume,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "SPEC",
    "Bsp",
    "CgroupLimits",
    "Container",
    "Device",
    "Group",
    "Image",
    "Mount",
    "ObjectRef",
    "Privileges",
    "Readiness",
    "RestartPolicy",
    "State",
    "Volume",
    "canonical",
    "load_schema",
    "parse_unverified",
    "validate",
]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@cache
def load_schema() -> dict[str, Any]:
    # On use: importlib.resources pulls typing, tempfile, random... (~2 MiB), and
    # PID 1 imports this package for the model, never for the schema.
    from importlib import resources

    text = resources.files("pvpy.state").joinpath("schema.json").read_text("utf-8")
    schema: dict[str, Any] = canonical.decode(text.encode())
    return schema


@cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema())


def json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENT.match(str(p)):
            out += f".{p}"
        else:
            out += f"[{p!r}]"
    return out


def validate(doc: Any) -> None:
    """Check ``doc`` against the schema and the rules a schema cannot say.

    Raises ManifestError naming the JSON path and the reason, in one line.
    """
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
    if error is not None:
        raise ManifestError(one_line(error.message, 200), json_path(error.absolute_path))
    _check_rules(doc)


def _check_rules(doc: dict[str, Any]) -> None:
    groups = [g["name"] for g in doc.get("groups", [{"name": n} for n in DEFAULT_GROUPS])]
    if len(set(groups)) != len(groups):
        raise ManifestError("group names must be unique", "$.groups")
    rank = {g: i for i, g in enumerate(groups)}
    containers: dict[str, Any] = doc["containers"]
    host_os = [n for n, c in containers.items() if c.get("role") == "host-os"]
    if len(host_os) > 1:
        raise ManifestError(f"only one host-os container allowed, got {sorted(host_os)}")
    for name, c in containers.items():
        where = json_path(["containers", name])
        group = c.get("group", "root" if c.get("role") == "host-os" else "app")
        if group not in rank:
            raise ManifestError(f"unknown group {group!r} (groups: {groups})", f"{where}.group")
        if c.get("status_goal") == "READY" and "readiness" not in c:
            raise ManifestError("status_goal READY needs a readiness check", where)
        for i, dep in enumerate(c.get("depends_on", [])):
            dep_where = f"{where}.depends_on[{i}]"
            if dep == name:
                raise ManifestError("a container cannot depend on itself", dep_where)
            if dep not in containers:
                raise ManifestError(f"unknown container {dep!r}", dep_where)
            dep_c = containers[dep]
            dep_group = dep_c.get("group", "root" if dep_c.get("role") == "host-os" else "app")
            if rank[dep_group] > rank[group]:
                raise ManifestError(
                    f"{dep!r} is in group {dep_group!r}, which starts after {group!r}",
                    dep_where,
                )
        for key in ("volumes", "mounts"):
            targets = [v["target"] for v in c.get(key, [])]
            if len(set(targets)) != len(targets):
                raise ManifestError("targets must be unique", f"{where}.{key}")
        names = [v["name"] for v in c.get("volumes", [])]
        if len(set(names)) != len(names):
            raise ManifestError("volume names must be unique", f"{where}.volumes")
        _check_privileges(c, where)
        restart = c.get("restart", {})
        if restart.get("backoff_initial_ms", 0) > restart.get("backoff_max_ms", 86_400_000):
            raise ManifestError(
                "backoff_initial_ms is larger than backoff_max_ms", f"{where}.restart"
            )
    _check_cycles(containers)


def _check_privileges(c: dict[str, Any], where: str) -> None:
    """What reaches the host must be asked for, visibly: an app's host bind mounts
    need ``privileges.host_mounts``, a writable sysfs ``privileges.sys: rw``. The
    host OS container has all of it and cannot be said to have less."""
    devices = c.get("devices", [])
    paths = [d["path"] for d in devices]
    if len(set(paths)) != len(paths):
        raise ManifestError("device paths must be unique", f"{where}.devices")
    for i, path in enumerate(paths):
        if any(part in (".", "..") for part in path.split("/")):
            raise ManifestError("'.' and '..' are not allowed in a device path",
                                f"{where}.devices[{i}].path")  # fmt: skip
    privileges = c.get("privileges", {})
    if c.get("role") == "host-os":
        if devices:
            raise ManifestError("the host OS container has every device", f"{where}.devices")
        if privileges.get("host_mounts", True) is not True or privileges.get("sys", "rw") != "rw":
            raise ManifestError(
                "the host OS container is privileged (host_mounts: true, sys: rw)",
                f"{where}.privileges",
            )
        return
    for i, m in enumerate(c.get("mounts", [])):
        kind = m.get("type", "bind")
        if kind == "bind" and not privileges.get("host_mounts", False):
            raise ManifestError(
                f"binding the host's {m.get('source', '')!r} needs privileges.host_mounts: true",
                f"{where}.mounts[{i}]",
            )
        if kind == "sysfs" and "ro" not in m.get("options", []) and privileges.get("sys") != "rw":
            raise ManifestError(
                "a writable sysfs needs privileges.sys: rw (or the option 'ro')",
                f"{where}.mounts[{i}]",
            )


def _check_cycles(containers: dict[str, Any]) -> None:
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise ManifestError(
                "dependency cycle: " + " -> ".join(cycle),
                json_path(["containers", name, "depends_on"]),
            )
        visiting.append(name)
        for dep in containers[name].get("depends_on", []):
            visit(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(containers):
        visit(name)


def parse_unverified(data: bytes) -> State:
    """Parse and validate state bytes. Trust is NOT checked here.

    Raises ManifestError.
    """
    return State.from_dict(_validated_doc(data))


def _validated_doc(data: bytes) -> dict[str, Any]:
    doc = canonical.decode(data)
    validate(doc)
    result: dict[str, Any] = doc
    return result
