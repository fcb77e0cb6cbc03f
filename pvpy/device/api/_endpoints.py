"""What each endpoint of the device API does, and the route table that names them.

Adding an endpoint: a function here taking the ``Handler`` (and the path's
named groups), a row in ``ROUTES``, its operation in ``docs/openapi.yaml`` (the
contract the tests fuzz the server from), and a test. The handler does the
HTTP (authorization, bodies, replies); refusals are raised (``ApiError`` or any
pvpy error) and answered by the handler with the status of ``pvpy.errors.ERRORS``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvpy import paths
from pvpy.device import update as up
from pvpy.device.api._limits import BIG_BODIES, CONTAINER_NAME, DIGITS, Limits
from pvpy.device.api._logs import LogFiles, LogOptions
from pvpy.device.api._pid1 import Control
from pvpy.device.api._staging import Staging
from pvpy.device.api._token import Token
from pvpy.errors import ApiError, one_line
from pvpy.log import get_logger
from pvpy.store import Storage, check_name

if TYPE_CHECKING:
    from pvpy.device.api._handler import Handler

log = get_logger("api")

MAX_NAMES = 100_000  # object names in one /v1/objects/missing question
MAX_TAIL = 10_000  # lines
DISK_RESERVE = 16 << 20  # bytes an upload must leave free (progress records, logs)
COMMANDS = ("reboot", "poweroff", "halt")


@dataclass
class Api:
    """Everything the endpoints share; one per process."""

    storage: Storage
    run_dir: Path
    token: Token
    limits: Limits = field(default_factory=Limits)
    control: Control = field(init=False)
    staging: Staging = field(init=False)
    # JSON bodies are parsed in memory: only a few big ones at a time (a 32 MiB body
    # on every connection would not fit a small device).
    big_bodies: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(BIG_BODIES)
    )

    def __post_init__(self) -> None:
        self.control = Control(self.run_dir)
        self.staging = Staging(self.storage, self.control, self.limits.max_state)

    def containers(self) -> list[dict[str, Any]]:
        containers: list[dict[str, Any]] = self.control.status().get("containers", [])
        return containers

    def revision_record(self, revision: int, installed: set[int]) -> dict[str, Any] | None:
        p = up.read_progress(self.storage.root, revision)
        if p is None and revision not in installed:
            return None
        record: dict[str, Any] = (
            p.to_dict() if p is not None else
            {"revision": revision, "status": None, "reason": "", "percent": None, "kind": None,
             "time": None}
        )  # fmt: skip
        record["installed"] = revision in installed
        return record

    def revisions(self) -> dict[str, Any]:
        installed = set(self.storage.revisions())
        known = {p.revision for p in up.all_progress(self.storage.root)} | installed
        records = [self.revision_record(r, installed) for r in sorted(known)]
        return {"revisions": [r for r in records if r is not None],
                "highest": up.highest_revision(self.storage)}  # fmt: skip


# -- device and revisions


def get_status(h: Handler) -> None:
    h.reply(200, h.api.control.status())


def get_revisions(h: Handler) -> None:
    h.reply(200, h.api.revisions())


def get_revision(h: Handler, rev: str) -> None:
    if not DIGITS.fullmatch(rev):
        raise ApiError(400, "revision must be a non-negative integer")
    record = h.api.revision_record(int(rev), set(h.api.storage.revisions()))
    if record is None:
        raise ApiError(404, f"no revision {int(rev)} on this device")
    h.reply(200, record)


def post_revisions(h: Handler) -> None:
    body = h.read_json(h.api.limits.max_revision_body)
    result = h.api.staging.install(body)
    h.reply(202, result, {"Location": result["progress"]})


# -- objects


def post_missing(h: Handler) -> None:
    api = h.api
    body = h.read_json(max(api.limits.max_json, api.limits.max_revision_body))
    if "state" in body:
        verified = api.staging.check(body)
        missing = {n: size for n, size in verified.sizes.items() if not api.storage.objects.has(n)}
        h.reply(200, {"revision": verified.revision, "missing": list(missing),
                      "bytes": sum(missing.values())})  # fmt: skip
        return
    unknown = sorted(set(body) - {"objects"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")
    names = body.get("objects")
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise ApiError(400, f"objects must be a list of at most {MAX_NAMES} names")
    seen: dict[str, None] = {}
    for name in names:
        seen[check_name(name)] = None
    objects = api.storage.objects
    h.reply(200, {"missing": [n for n in seen if not objects.has(n)]})


def head_object(h: Handler, name: str) -> None:
    objects = h.api.storage.objects
    if not objects.has(name):  # check_name first: ObjectNameError -> 400
        raise ApiError(404, f"no object {name}")
    h.reply_head(objects.size(name))


def put_object(h: Handler, name: str) -> None:
    api = h.api
    objects = api.storage.objects
    check_name(name)
    signed = api.staging.pending.signed_size(name)
    length = h.body_length(signed if signed is not None else api.limits.max_object)
    if signed is not None and length != signed:
        raise ApiError(422, f"object {name} is {signed} bytes in a pending revision, "
                       f"not {length}", kind="store")  # fmt: skip
    if objects.has(name):  # idempotent: an object is its name, no need to resend it
        h.reply(200, {"sha256": name, "size": objects.size(name), "created": False})
        return
    objects.ensure()
    free = _free_bytes(objects.root)
    if free is not None and length + DISK_RESERVE > free:
        raise ApiError(507, f"object of {length} bytes does not fit ({free} bytes free)",
                       kind="store")  # fmt: skip
    stored = objects.put_stream(h.body_stream(length), expected=name, max_size=length)
    h.body_done()
    log.info("object stored", sha256=stored, size=length, client=h.address_string())
    h.reply(201, {"sha256": stored, "size": length, "created": True})


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# -- containers and commands


def get_containers(h: Handler) -> None:
    h.reply(200, {"containers": h.api.containers()})


def post_restart(h: Handler, name: str) -> None:
    _container_action(h, name, "restart")


def post_stop(h: Handler, name: str) -> None:
    _container_action(h, name, "stop")


def _container_action(h: Handler, name: str, action: str) -> None:
    if not CONTAINER_NAME.fullmatch(name):
        raise ApiError(400, "not a container name")
    if name not in {c.get("name") for c in h.api.containers()}:
        raise ApiError(404, f"no container {name!r}")
    h.api.control.request({"cmd": action, "container": name})
    log.info(f"container {action} requested", container=name, client=h.address_string())
    h.reply(202, {"container": name, "action": action})


def post_rollback(h: Handler) -> None:
    """Back to the newest good older revision (PID 1 refuses when there is none)."""
    reply = h.api.control.request({"cmd": "rollback"})
    log.info("rollback requested", revision=reply.get("revision"), client=h.address_string())
    h.reply(202, {"revision": reply.get("revision")})


def post_command(h: Handler, command: str) -> None:
    if command not in COMMANDS:
        raise ApiError(404, f"no command {one_line(command, 40)!r} (one of {list(COMMANDS)})")
    h.api.control.request({"cmd": command})
    log.info("command requested", command=command, client=h.address_string())
    h.reply(202, {"command": command})


# -- logs


def get_logs(h: Handler) -> None:
    _serve_logs(h, None)


def get_log(h: Handler, name: str) -> None:
    if not CONTAINER_NAME.fullmatch(name):
        raise ApiError(400, "not a container name")
    _serve_logs(h, name)


def _serve_logs(h: Handler, name: str | None) -> None:
    tail = h.query_int("tail", 100, 0, MAX_TAIL)
    follow = h.query_bool("follow")
    logs_dir = h.api.storage.root / paths.LOGS
    known = name is None or (logs_dir / f"{name}.log").is_file()
    if not known and name not in {c.get("name") for c in h.api.containers()}:
        raise ApiError(404, f"no log of container {name!r}")
    files = LogFiles(logs_dir, name, LogOptions.from_query(h.query))
    if not follow:
        h.reply_text(files.tail(tail))
        return
    if not h.listener.start_follow():
        raise ApiError(503, "too many log followers; try again later")
    try:
        h.reply_stream(files.follow(tail, h.client_left))
    finally:
        h.listener.end_follow()


# -- the routes: method, path pattern (named groups are the endpoint's arguments), endpoint

Endpoint = Callable[..., None]

ROUTES: tuple[tuple[str, re.Pattern[str], Endpoint], ...] = tuple(
    (method, re.compile(pattern), endpoint)  # matched with fullmatch
    for method, pattern, endpoint in (
        ("GET", "/v1/status", get_status),
        ("GET", "/v1/revisions", get_revisions),
        ("POST", "/v1/revisions", post_revisions),
        ("GET", "/v1/revisions/(?P<rev>[^/]+)", get_revision),
        ("POST", "/v1/objects/missing", post_missing),
        ("HEAD", "/v1/objects/(?P<name>[^/]+)", head_object),
        ("PUT", "/v1/objects/(?P<name>[^/]+)", put_object),
        ("GET", "/v1/containers", get_containers),
        ("POST", "/v1/containers/(?P<name>[^/]+)/restart", post_restart),
        ("POST", "/v1/containers/(?P<name>[^/]+)/stop", post_stop),
        ("POST", "/v1/rollback", post_rollback),
        ("GET", "/v1/logs", get_logs),
        ("GET", "/v1/logs/(?P<name>[^/]+)", get_log),
        ("POST", "/v1/commands/(?P<command>[^/]+)", post_command),
    )
)
