"""What an image says about running it: its config and its own accounts.

``run_config`` reads an image config document (OCI image-spec config.md, or
Docker's image spec v1.2, which adds Healthcheck and Shell) into an
``ImageConfig`` said the way a state says it: args, env, cwd, the user as the
image names it, the stop signal, volume targets and a readiness check.
``resolve_user`` turns a user ("app", "app:staff", "1000:100") into ids through
the image's own /etc/passwd and /etc/group (``ImageAccounts``, read from the
merged layers by pack.py), never the workstation's.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from pvpy.errors import SpecError
from pvpy.state.model import GLIBC_SIGRTMIN
from pvpy.workstation.tarmerge import normalise

# The files a user name is resolved through, as paths inside an image.
PASSWD, GROUP = "etc/passwd", "etc/group"
MAX_UID = 4_294_967_294  # (uid_t)-1 means "no change" to the kernel: never an id
# Docker's defaults for a Healthcheck that leaves them out (docker run --help).
DOCKER_HEALTH_TIMEOUT_MS = 30_000
DOCKER_HEALTH_START_INTERVAL_MS = 5_000
MAX_DURATION_MS = 86_400_000  # the state's duration_ms maximum


@dataclass(frozen=True)
class ImageConfig:
    """Defaults an OCI or Docker image carries for running it, as a state says them."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None  # as the image says it: "app", "app:staff", "1000:100"
    stop_signal: str | None = None  # as a state names it: "RTMIN+3", "QUIT"
    volumes: tuple[str, ...] = ()  # targets, normalised ("/var/lib/db")
    readiness: dict[str, Any] | None = None  # a state's readiness, from a Healthcheck


@dataclass(frozen=True)
class ImageAccounts:
    """An image's own /etc/passwd and /etc/group (None: the image has no such file)."""

    passwd: bytes | None = None
    group: bytes | None = None


def run_config(doc: Any, where: str) -> ImageConfig:
    """The run defaults of an image config document (OCI image-spec config.md, or
    Docker's, which adds Healthcheck and Shell); SpecError when they are malformed."""
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: not an image config")
    config = doc.get("config") or {}
    if not isinstance(config, dict):
        raise SpecError(f"{where}: 'config' is not an object")

    def strings(key: str) -> list[str]:
        value = config.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"{where}: {key} is not a list of strings")
        return value

    env = {}
    for item in strings("Env"):
        key, _, value = item.partition("=")
        env[key] = value
    cwd = config.get("WorkingDir") or None
    if cwd is not None and not isinstance(cwd, str):
        raise SpecError(f"{where}: WorkingDir is not a string")
    user = config.get("User") or None
    if user is not None and not isinstance(user, str):
        raise SpecError(f"{where}: User is not a string")
    return ImageConfig(
        args=strings("Entrypoint") + strings("Cmd"),
        env=env,
        cwd=cwd,
        user=user,
        stop_signal=_stop_signal_name(config.get("StopSignal"), where),
        volumes=_volume_targets(config.get("Volumes"), where),
        readiness=_healthcheck_readiness(config.get("Healthcheck"), strings("Shell"), where),
    )


def _volume_targets(value: object, where: str) -> tuple[str, ...]:
    """An image's Volumes ({"/data": {}}) as normalised absolute targets."""
    if not value:
        return ()
    if not isinstance(value, dict):
        raise SpecError(f"{where}: Volumes is not an object")
    targets = set()
    for target in value:
        if not isinstance(target, str) or not target.startswith("/"):
            raise SpecError(f"{where}: volume {target!r} is not an absolute path")
        try:
            inside = normalise(target.lstrip("/"), "volume")
        except SpecError as e:
            raise SpecError(f"{where}: {e.reason}") from None
        if not inside:
            raise SpecError(f"{where}: volume {target!r} would hide the whole image")
        targets.add("/" + inside)
    return tuple(sorted(targets))


def _healthcheck_readiness(value: object, shell: list[str], where: str) -> dict[str, Any] | None:
    """A Docker Healthcheck (image spec v1.2 "Healthcheck"; durations in ns) as a
    state's command readiness, or None when the image has none (or says NONE).

    What maps: Test (CMD argv as is; CMD-SHELL through the image's Shell, else
    /bin/sh -c, as dockerd runs it), Timeout, and how often to check while the
    container starts (StartInterval, else Interval, else Docker's 5 s start
    interval). What does not: Retries and StartPeriod, which count failures
    before a running container is "unhealthy": a readiness check runs until it
    first passes and a READY container is never checked again.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpecError(f"{where}: Healthcheck is not an object")
    test = value.get("Test") or []
    if not isinstance(test, list) or not all(isinstance(t, str) for t in test):
        raise SpecError(f"{where}: Healthcheck.Test is not a list of strings")
    if not test or test[0] == "NONE":  # [] inherits (nothing here); NONE disables
        return None
    kind, rest = test[0], test[1:]
    if kind == "CMD" and rest:
        command = rest
    elif kind == "CMD-SHELL" and rest:
        # Docker writes [CMD-SHELL, "a b"]; buildah 1.28 [CMD-SHELL, a, b]: joined, as Podman does.
        command = [*(shell or ["/bin/sh", "-c"]), " ".join(rest)]
    else:
        raise SpecError(
            f"{where}: Healthcheck.Test {test!r} is not [NONE], [CMD, ARG...] or [CMD-SHELL, CMD]"
        )
    interval = _ns_as_ms(value, "StartInterval", where) or _ns_as_ms(value, "Interval", where)
    return {
        "type": "command",
        "command": command,
        "interval_ms": interval or DOCKER_HEALTH_START_INTERVAL_MS,
        "timeout_ms": _ns_as_ms(value, "Timeout", where) or DOCKER_HEALTH_TIMEOUT_MS,
    }


def _ns_as_ms(healthcheck: dict[str, Any], key: str, where: str) -> int:
    """A Healthcheck duration (nanoseconds; 0 or absent: the default) in whole
    milliseconds, rounded up and capped at the state's maximum."""
    value = healthcheck.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(f"{where}: Healthcheck.{key} is not a duration in nanoseconds")
    return min(-(-value // 1_000_000), MAX_DURATION_MS)


def _stop_signal_name(value: object, where: str) -> str | None:
    """An image's StopSignal ("SIGRTMIN+3", "SIGQUIT", "37") as a state names it
    ("RTMIN+3", "QUIT"); the state's schema says which it accepts."""
    if not value:
        return None
    if not isinstance(value, str):
        raise SpecError(f"{where}: StopSignal is not a string")
    name = value.upper().removeprefix("SIG")
    if name == "RTMIN":
        name = str(GLIBC_SIGRTMIN)
    elif name.startswith("RTMAX"):  # RTMAX is 64, RTMAX-N 64-N
        offset = name.removeprefix("RTMAX").removeprefix("-") or "0"
        name = str(64 - int(offset)) if offset.isdigit() else name
    if name.isdigit():
        number = int(name)
        if number >= GLIBC_SIGRTMIN:
            return f"RTMIN+{number - GLIBC_SIGRTMIN}"
        try:
            return signal.Signals(number).name.removeprefix("SIG")
        except ValueError:
            raise SpecError(f"{where}: StopSignal {value!r} is no signal") from None
    return name


def resolve_user(user: str, accounts: ImageAccounts | None, image: str) -> tuple[int, int]:
    """``user`` ("name", "name:group", "uid", "uid:gid", "name:gid", "uid:group") as
    (uid, gid), names looked up in the image's own /etc/passwd and /etc/group, as
    runc and dockerd do: without a group, the user's primary group from
    /etc/passwd (0 for a uid it does not list). Raises SpecError naming ``image``
    and the user when a name does not resolve.

    Supplementary groups (/etc/group members) are not resolved: a state's user is
    one uid and one gid.
    """
    name, has_group, group = user.partition(":")
    where = f"{image}: user {user!r}"
    if not name or (has_group and not group):
        raise SpecError(f"{where}: not NAME, UID, NAME:GROUP or UID:GID")
    if not (name.isdigit() and (group.isdigit() or not has_group)) and accounts is None:
        raise SpecError(f"{where}: names need an image pvpy reads (not a squashfs): use UID:GID")
    passwd = _account_lines(accounts.passwd if accounts else None, 4)
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in passwd if e[2] == name), None)
        gid = int(entry[3]) if entry is not None else 0
    else:
        entry = next((e for e in passwd if e[0] == name), None)
        if entry is None:
            has = "" if accounts and accounts.passwd is not None else " (it has none)"
            raise SpecError(f"{where}: no user {name!r} in the image's /{PASSWD}{has}")
        uid, gid = int(entry[2]), int(entry[3])
    if group.isdigit():
        gid = int(group)
    elif group:
        groups = _account_lines(accounts.group if accounts else None, 3)
        found = next((e for e in groups if e[0] == group), None)
        if found is None:
            has = "" if accounts and accounts.group is not None else " (it has none)"
            raise SpecError(f"{where}: no group {group!r} in the image's /{GROUP}{has}")
        gid = int(found[2])
    if uid > MAX_UID or gid > MAX_UID:
        raise SpecError(f"{where}: ids go up to {MAX_UID}")
    return uid, gid


def _account_lines(data: bytes | None, fields: int) -> list[list[str]]:
    """The entries of a passwd (``fields`` 4: name, password, uid, gid, ...) or group
    (3: name, password, gid, ...) file; comments, NIS "+"/"-" lines and entries
    whose ids are not numbers are skipped, as glibc's files backend does."""
    entries = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        entry = line.split(":")
        if len(entry) < fields or not entry[0] or entry[0][0] in "#+-":
            continue
        if all(entry[i].isdigit() for i in range(2, fields)):
            entries.append(entry)
    return entries
