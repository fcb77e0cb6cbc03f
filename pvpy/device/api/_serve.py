"""``pvpy device api``: open the listeners, serve until SIGTERM, let replies out."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import NoReturn

from pvpy import paths
from pvpy.device.api._endpoints import Api
from pvpy.device.api._limits import Limits
from pvpy.device.api._listeners import TcpListener, UnixListener, open_tcp, open_unix, tls_context
from pvpy.device.api._token import Token
from pvpy.errors import DeviceError, PvpyError
from pvpy.log import get_logger
from pvpy.store import Storage

log = get_logger("api")

STOP_GRACE = 2.0  # seconds connections in flight get to finish when we are stopped


def serve(
    storage: Path,
    run_dir: Path,
    tcp: str | None = None,
    token_file: Path | None = None,
    limits: Limits | None = None,
    tls: tuple[Path, Path] | None = None,
    plain_http: bool = False,
) -> NoReturn:
    """Run the API until SIGTERM/SIGINT (PID 1 stops it with SIGTERM before a reboot).

    TCP speaks TLS: with ``tls`` (certificate, key), else with the storage's
    ``paths.API_CERT`` and ``paths.API_KEY``, made here when the device has none
    (provisioned before TLS; so PID 1 needs no option for it). Plain HTTP only
    with ``plain_http``. Raises UsageError or DeviceError before serving when a
    listener cannot be opened.
    """
    store = Storage(Path(storage))
    if tcp and tls is None and not plain_http:
        tls = _device_tls(store.root)
        if tls is None:
            tcp = None  # no TLS, no TCP: the local admin keeps the unix socket
    context = tls_context(*tls) if tcp and tls else None
    token = Token((token_file or store.root / paths.API_TOKEN) if tcp else None)
    api = Api(store, Path(run_dir), token, limits or Limits())
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    sock_path = paths.api_socket(Path(run_dir))
    # Signals are taken by sigwait below: blocked here, before any thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    servers: list[UnixListener | TcpListener] = []
    try:
        servers.append(open_unix(api, sock_path))
        if tcp:
            servers.append(open_tcp(api, tcp, context))
    except OSError as e:
        raise DeviceError(f"api: cannot listen ({e.strerror or e})") from e
    if tcp:
        token.current()  # say now whether TCP clients can get in
    for server in servers:
        threading.Thread(target=server.serve_forever, name=server.name, daemon=True).start()
    log.info("api serving", socket=str(sock_path), tcp=tcp, tls=context is not None,
             pid=os.getpid())  # fmt: skip
    signum = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    log.info("api stopping", signal=signal.Signals(signum).name)
    for server in servers:
        server.shutdown()  # no new connections; those in flight go on
        server.server_close()
    with contextlib.suppress(OSError):
        sock_path.unlink()
    # A reply in flight gets a moment to go out: PID 1 stops us as soon as it
    # acts on a reboot/poweroff command, before that command's reply is written.
    deadline = time.monotonic() + STOP_GRACE
    while any(server.active for server in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Uploads in flight die with us; their temp files are cleaned before the next staging.
    os._exit(0)


def _device_tls(root: Path) -> tuple[Path, Path] | None:
    """The storage's certificate and key, made if missing; the credentials file
    (when it is the storage's) gains the certificate's pin. None when they cannot be
    made: TCP is then not served at all (never plain HTTP by accident)."""
    from pvpy.device.api._verify import make_device_tls
    from pvpy.provision import make_api_credentials

    try:
        if not ((root / paths.API_CERT).is_file() and (root / paths.API_KEY).is_file()):
            make_device_tls(root)  # in a child: the crypto library stays out of this process
    except PvpyError as e:
        log.error("api: no TLS certificate and none can be made: TCP not served", error=str(e))
        return None
    if (root / paths.API_TOKEN).exists():
        try:
            make_api_credentials(root)
        except PvpyError as e:  # the token file stays as it is; clients may pin by --cacert
            log.warning("api: cannot add the certificate pin to the token file", error=str(e))
    return root / paths.API_CERT, root / paths.API_KEY
