"""Staging a revision sent over the API: checking a posted state, the pending
sizes that hold uploads, installing and handing the revision to PID 1.

The checks themselves are ``pvpy.device.update``'s (the one place unverified
bytes become a ``VerifiedRevision``), run in a short-lived child (``_verify``):
this module only parses the HTTP body and keeps what the API must remember
between requests of one push.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pvpy.device import update as up
from pvpy.device.api._pid1 import Control
from pvpy.device.api._verify import VerifiedSummary, Verifier
from pvpy.errors import ApiError, one_line
from pvpy.log import get_logger
from pvpy.store import Storage

log = get_logger("api")

APPLY_TIMEOUT = 300.0  # PID 1 re-verifies (hashes) the revision before it answers
PENDING_FOR = 3600.0  # seconds a checked state keeps its objects' sizes pending
MAX_PENDING = 8


def parse_revision_body(body: dict[str, Any], max_state: int) -> tuple[bytes, bytes, bytes | None]:
    """The unverified (state, signature, keys) bytes of a posted revision.

    Each is the exact text of state.json, state.sig.json and keys.json as a
    JSON string, or ``{"base64": "..."}``: the signature covers exact bytes.
    Raises ApiError (400, or 413 over ``max_state``).
    """
    unknown = sorted(set(body) - {"state", "signature", "keys"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")

    def as_bytes(name: str, required: bool) -> bytes | None:
        value = body.get(name)
        if value is None and not required:
            return None
        try:
            if isinstance(value, str):
                data = value.encode("utf-8")
            elif (
                isinstance(value, dict)
                and set(value) == {"base64"}
                and isinstance(value["base64"], str)
            ):
                data = base64.b64decode(value["base64"], validate=True)
            else:
                raise ApiError(400, f'{name} must be a string or {{"base64": string}}')
        except (UnicodeEncodeError, binascii.Error, ValueError) as e:
            raise ApiError(400, f"{name}: {one_line(str(e), 120)}") from e
        if len(data) > max_state:
            raise ApiError(413, f"{name} is larger than {max_state} bytes")
        return data

    state = as_bytes("state", True)
    signature = as_bytes("signature", True)
    assert state is not None and signature is not None
    return state, signature, as_bytes("keys", False)


@dataclass
class _PendingState:
    revision: int
    sizes: dict[str, int]
    expires: float
    checked: int  # order of checking: the newest state's word on a size counts


class Pending:
    """The signed sizes of the objects of recently checked states: an upload of an
    object a pending state names is held to that size (not ``max_object``).

    Two verified states may disagree on an object's size (a signer's mistake,
    fixed by signing again): the one checked last decides, so a state with a wrong
    size never blocks the upload a corrected one needs (an object is its hash:
    only one size can be right, and the hash check still judges the bytes)."""

    def __init__(self) -> None:
        self._states: dict[int, _PendingState] = {}
        self._lock = threading.Lock()
        self._checked = 0

    def add(self, verified: VerifiedSummary) -> None:
        sizes = dict(verified.sizes)
        now = time.monotonic()
        with self._lock:
            states = self._states
            for rev in [r for r, p in states.items() if p.expires < now]:
                del states[rev]
            self._checked += 1
            states.pop(verified.revision, None)
            states[verified.revision] = _PendingState(
                verified.revision, sizes, now + PENDING_FOR, self._checked
            )
            while len(states) > MAX_PENDING:
                del states[min(states, key=lambda r: states[r].checked)]

    def signed_size(self, name: str) -> int | None:
        """The size the newest pending state naming ``name`` signed, or None."""
        now = time.monotonic()
        with self._lock:
            naming = [p for p in self._states.values() if p.expires >= now and name in p.sizes]
            newest = max(naming, key=lambda p: p.checked, default=None)
        return newest.sizes[name] if newest is not None else None

    def drop(self, revision: int) -> None:
        with self._lock:
            self._states.pop(revision, None)


@dataclass
class Staging:
    """Checks posted states, installs them and asks PID 1 to apply them."""

    storage: Storage
    control: Control
    max_state: int
    pending: Pending = field(default_factory=Pending)
    verifier: Verifier = field(init=False)
    # One install at a time in this process (update.install_lock also keeps out the
    # CLI and the puller, but waits: a second push is refused at once instead).
    install_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.verifier = Verifier(self.storage.root)

    def check(self, body: dict[str, Any]) -> VerifiedSummary:
        """Verify a posted state in a child (recorded WONTGO when refused); its objects'
        sizes become pending. Raises ApiError, TrustError, ManifestError, DeviceError."""
        state, signature, keyset = parse_revision_body(body, self.max_state)
        verified = self.verifier.check(state, signature, keyset)
        self.pending.add(verified)
        return verified

    def install(self, body: dict[str, Any]) -> dict[str, Any]:
        """Install a posted state and ask PID 1 to apply it: the reply of
        ``POST /v1/revisions``. Raises ApiError 409 while the device is busy (nothing
        recorded: the revision is not at fault), or what staging raises (recorded)."""
        state, signature, keyset = parse_revision_body(body, self.max_state)
        status = self.control.status()
        if status.get("updating") is not None:
            raise ApiError(409, f"update to revision {status['updating']} in progress",
                           kind="device")  # fmt: skip
        if status.get("pending"):
            raise ApiError(409, f"device is going down ({status['pending']})", kind="device")
        if not self.install_lock.acquire(timeout=1.0):
            raise ApiError(409, "another revision is being installed", kind="device")
        try:
            revision = self.verifier.install(state, signature, keyset).revision
            self.pending.drop(revision)
            log.info("revision installed", revision=revision)
            reply = up.hand_to_pid1(
                self.storage, revision, lambda m, t: self.control.request(m, timeout=t),
                APPLY_TIMEOUT,
            )  # fmt: skip
        finally:
            self.install_lock.release()
        log.info("update requested", revision=revision, kind=reply.get("kind"))
        return {
            "revision": revision,
            "kind": reply.get("kind"),
            "changed": list(reply.get("changed") or []),
            "progress": f"/v1/revisions/{revision}",
        }
