"""The device API: HTTP/1.1 on RUN_DIR/``paths.API_SOCKET`` (root only) and on TCP (bearer token).

``pvpy device api`` runs it as a process of its own, started and restarted by
PID 1 (one of ``pvpy.device.pid1``'s helper processes): PID 1 never serves a
network client, so a hung or hostile client can at worst stall or kill this
process. The server talks to PID 1 only through its control socket (one JSON
line each way, at most ``CONTROL_SLOTS`` requests in flight), reads update
records and container logs from the storage, and does the heavy work itself:
hashing uploads while they stream; checking signatures and schemas and
installing trails happen in a short-lived child (``_verify``), so the crypto
and schema libraries never stay in this long-lived process.

Endpoints (``docs/openapi.yaml`` is the contract; the tests fuzz the server
from it)::

    GET  /v1/status                     PID 1's status
    GET  /v1/revisions                  installed revisions and update records
    GET  /v1/revisions/{rev}            one revision's progress
    POST /v1/revisions                  install a signed state, ask PID 1 to apply it
    HEAD /v1/objects/{sha256}           200 when the device has the object
    PUT  /v1/objects/{sha256}           upload an object (hash checked as it streams)
    POST /v1/objects/missing            which objects the device lacks
    GET  /v1/containers                 containers and their states
    POST /v1/containers/{name}/restart
    GET  /v1/logs                       every container's log (tail, follow)
    GET  /v1/logs/{name}                one container's log (tail, follow)
    POST /v1/commands/{reboot,poweroff}

A push: ``POST /v1/objects/missing`` with the signed state (checked: signature,
schema, anti-rollback; its objects become *pending*, so uploads of them are held
to their signed sizes), ``PUT`` each missing object, ``POST /v1/revisions``,
then poll ``GET /v1/revisions/{rev}`` to UPDATED, DONE, WONTGO or ERROR.

Limits: ``Limits.max_connections`` per listener (the unix socket has its own, so
a flood on TCP never locks out the local admin; the next client gets a quick
503), half of them at most for log follows; a request head must arrive within
``head_timeout``; bodies need a Content-Length within their limit (state 16 MiB,
objects their signed size or ``max_object``) and must keep a minimum rate.

TCP connections prove their token before they take a slot: until their first
request head arrives they wait in one gate thread (``_gate``), a few seconds at
most, a bound of their own, so slowloris peers without the token lock nobody out.

TLS: the TCP listener speaks TLS 1.2+ only, with the device certificate
(STORAGE/``paths.API_CERT`` and ``paths.API_KEY``, made when missing, or
``--tls-cert/--tls-key``); plain HTTP only with ``plain_http``. Clients pin the
certificate by the sha256 in the credentials file (``pvpy.api_credentials``).

Errors are ``{"error": "<one line>", "kind": "..."}``; every pvpy error maps to
a status in ``pvpy.errors.ERRORS`` and nowhere else.

Modules, one concept each (private: this package exports what is below)::

    _limits      Limits, and the shapes of what a client names
    _endpoints   what each endpoint does, and the route table (add endpoints here)
    _handler     HTTP: parsing, authorization, bodies, replies, errors
    _staging     checking a posted state, pending sizes, install and apply
    _verify      the short-lived child that verifies and installs posted states
    _pid1        the client of PID 1's control socket, a few requests at a time
    _token       the TCP bearer token
    _logs        container log files: tail and follow
    _listeners   unix and TCP (TLS) listeners: bounded connections, deadlines
    _gate        TCP connections until their token is shown: handshake, first head
    _serve       the process: listeners up, SIGTERM, replies let out
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pvpy.device.api._limits import Limits
    from pvpy.device.api._listeners import parse_hostport
    from pvpy.device.api._serve import serve
    from pvpy.device.api._staging import parse_revision_body

__all__ = ["Limits", "parse_hostport", "parse_revision_body", "serve"]

# Imported on first use: the verifier child (``python -m pvpy.device.api._verify``)
# runs this file first and needs none of the server (http.server, ssl, ...).
_EXPORTS = {
    "Limits": "pvpy.device.api._limits",
    "parse_hostport": "pvpy.device.api._listeners",
    "serve": "pvpy.device.api._serve",
    "parse_revision_body": "pvpy.device.api._staging",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
