"""Posted states verified and installed in a short-lived child process.

The long-lived API server never loads the crypto and schema libraries (about
8 MiB of PSS it would keep for as long as the device runs): each check of a
posted state, and each install, runs ``python -m pvpy.device.api._verify`` —
as PID 1 verifies the boot revision in a ``pvpy device verify-installed``
child. The child does what ``pvpy.device.update`` says (signature, schema,
anti-rollback, fleet, expiry; records WONTGO; installs the trail with every
object hash-checked) and exits; the server keeps only the outcome.

One JSON document each way: the request on the child's stdin (the posted bytes
in base64), the reply on its stdout — the revision and its objects' signed
sizes, or the pvpy error it raised (class name and message), which the server
raises again so the client gets the same answer as before. The child's log
lines (stderr) are passed on to the server's log. A child that dies without a
reply is a bug or a power cut: ``DeviceError``.

The crypto library's one other use in the server, making the device's TLS
certificate when it has none (``make_device_tls``), runs in the same child.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvpy import errors
from pvpy.errors import ApiError, DeviceError, ManifestError, PvpyError, one_line

CHECK_TIMEOUT = 120.0  # seconds: signature and schema of one state
INSTALL_TIMEOUT = 1800.0  # seconds: every object hashed again, on a slow board's storage
# Children at once: each is a python with the crypto loaded (~20 MiB). More requests
# wait for a slot, then get a 503.
VERIFIER_SLOTS = 2
SLOT_WAIT = 60.0
# What of the server's environment reaches the child beyond _run's allow-list: how to
# log, and the power-cut test hook (the child is the staging process now).
PASS_ENV = ("PVPY_LOG_LEVEL", "PVPY_LOG_JSON", "PVPY_LOG_TEXT", "PVPY_POWERCUT")


@dataclass(frozen=True)
class VerifiedSummary:
    """What the child verified: the revision number and the signed size of each object."""

    revision: int
    sizes: dict[str, int]


class Verifier:
    """Runs the child, at most ``VERIFIER_SLOTS`` at once."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.slots = threading.BoundedSemaphore(VERIFIER_SLOTS)

    def check(self, state: bytes, signature: bytes, keyset: bytes | None) -> VerifiedSummary:
        """Verify a posted state (nothing installed). Raises what verification raises
        (TrustError, ManifestError, ...), ApiError 503 when every slot stays busy,
        DeviceError when the child fails."""
        return self._run("check", state, signature, keyset, CHECK_TIMEOUT)

    def install(self, state: bytes, signature: bytes, keyset: bytes | None) -> VerifiedSummary:
        """Verify a posted state and install it (its objects must be in the store).
        Raises as ``check``, and StoreError for a missing or corrupt object."""
        return self._run("install", state, signature, keyset, INSTALL_TIMEOUT)

    def _run(
        self, op: str, state: bytes, signature: bytes, keyset: bytes | None, timeout: float
    ) -> VerifiedSummary:
        request = {
            "op": op, "storage": str(self.storage), "state": _b64(state),
            "signature": _b64(signature), "keys": None if keyset is None else _b64(keyset),
        }  # fmt: skip
        if not self.slots.acquire(timeout=SLOT_WAIT):
            raise ApiError(503, "every verifier is busy; try again", kind="device")
        try:
            reply = _ask_child(request, timeout)
        finally:
            self.slots.release()
        return VerifiedSummary(int(reply["revision"]),
                               {str(k): int(v) for k, v in reply["sizes"].items()})  # fmt: skip


def make_device_tls(storage: Path) -> None:
    """The storage's TLS key and certificate (``pvpy.provision.make_api_tls``), made
    in the child: the server only reads them. Raises what that raises, DeviceError
    when the child fails."""
    _ask_child({"op": "tls", "storage": str(storage)}, CHECK_TIMEOUT)


def _ask_child(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the child on ``request``; its reply, or its pvpy error raised again here."""
    from pvpy import _run

    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    try:
        proc = _run.run([sys.executable, "-m", "pvpy.device.api._verify"], env=env,
                        input=json.dumps(request).encode(), timeout=timeout,
                        check=False)  # fmt: skip
    except PvpyError as e:  # cannot start, or timed out (killed)
        raise DeviceError(f"verifier: {e}") from e
    if proc.stderr:  # its log lines, into ours
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        sys.stderr.flush()
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    if proc.returncode != 0 or not isinstance(reply, dict):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DeviceError(f"verifier exited with {proc.returncode}"
                          + (f": {one_line(tail[-1], 200)}" if tail else ""))  # fmt: skip
    if "error" in reply:
        raise _error_from(reply["error"])
    return reply


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error_from(doc: dict[str, Any]) -> PvpyError:
    """The child's pvpy error, raised again here: the same class, so the same answer."""
    cls = getattr(errors, str(doc.get("class")), None)
    message = str(doc.get("message", ""))
    if not (isinstance(cls, type) and issubclass(cls, PvpyError)):
        return DeviceError(f"verifier: {message}")
    if issubclass(cls, ManifestError):
        return cls(str(doc.get("reason", message)), str(doc.get("path", "$")))
    try:
        return cls(message)
    except TypeError:  # a class with other arguments (none is raised by verification)
        return DeviceError(message)


def _error_doc(e: PvpyError) -> dict[str, Any]:
    doc: dict[str, Any] = {"class": type(e).__name__, "message": str(e)}
    if isinstance(e, ManifestError):
        doc.update(reason=e.reason, path=e.path)
    return doc


# -- the child ---------------------------------------------------------------------------


def _serve_request(request: dict[str, Any]) -> dict[str, Any]:
    from pvpy.device import update as up
    from pvpy.store import Storage
    from pvpy.trust import load_trust

    storage = Storage(Path(request["storage"]))
    if request["op"] == "tls":
        from pvpy.provision import make_api_tls

        try:
            return {"sha256": make_api_tls(storage.root)}
        except PvpyError as e:
            return {"error": _error_doc(e)}
    state = base64.b64decode(request["state"])
    signature = base64.b64decode(request["signature"])
    keyset = None if request.get("keys") is None else base64.b64decode(request["keys"])
    try:
        trust = load_trust(storage.root)
        verified = up.verify_incoming(storage, state, signature, keyset, trust)
        if request["op"] == "install":
            up.install_verified(storage, verified)
    except PvpyError as e:
        return {"error": _error_doc(e)}
    sizes = {ref.sha256: ref.size for ref in verified.state.objects().values()}
    return {"revision": verified.revision, "sizes": sizes}


def main() -> int:
    """The child: one request on stdin, one reply on stdout. A bug is a traceback on
    stderr and exit 1 (the server says so, without the traceback)."""
    from pvpy.log import configure

    configure(lean=True)  # the child's start-up is the client's wait: no structlog
    request = json.loads(sys.stdin.buffer.read())
    reply = _serve_request(request)
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
