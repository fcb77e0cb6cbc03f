"""The device API's listeners: a unix socket and TCP (optionally TLS), each with
its own bounded set of connections and deadlines.

The unix socket has its own bound, so a flood on TCP never locks out the local
admin; a client over the bound gets a quick 503. A request head must arrive
within ``head_timeout``; a body must keep ``min_rate`` (see ``Handler.body_stream``).
TLS (1.2+) runs in the connection's thread under the head deadline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pvpy.device.api._endpoints import Api
from pvpy.device.api._handler import Handler
from pvpy.device.api._limits import DIGITS
from pvpy.errors import DeviceError, UsageError
from pvpy.log import get_logger

log = get_logger("api")


class Listener(socketserver.ThreadingMixIn):
    """A thread per connection, at most ``max_connections`` of them; the next
    client gets a 503 right away from a short-lived refuser thread (bounded too).

    A janitor thread shuts down connections past their deadline (a request head
    that takes too long, a body slower than the minimum rate): a blocked read
    then returns EOF and the connection's thread ends.
    """

    daemon_threads = True
    block_on_close = False
    api: Api
    needs_token: bool
    name: str

    def setup_limits(
        self, api: Api, needs_token: bool, name: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.api = api
        self.tls = tls
        self.needs_token = needs_token
        self.name = name
        self.active = 0
        self.refusing = 0
        self.followers = 0
        self.guard = threading.Lock()
        self.deadlines: dict[socket.socket, float | None] = {}
        threading.Thread(target=self._janitor, name=f"janitor-{name}", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.guard:
            busy = self.active >= self.api.limits.max_connections
            if not busy:
                self.active += 1
                self.deadlines[request] = None
            elif self.refusing < self.api.limits.max_connections * 2:
                self.refusing += 1
            else:
                request.close()  # beyond even refusing politely: drop it
                return
        if busy:
            threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread started: release its slot, then let it out
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = request
        try:
            if self.tls is not None:
                conn = self._handshake(request)
            super().process_request_thread(conn, client_address)
        except (OSError, ssl.SSLError) as e:  # only the handshake gets here
            log.info("tls handshake failed", client=str(client_address), error=str(e))
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._release(request, conn)

    def _handshake(self, request: socket.socket) -> ssl.SSLSocket:
        """TLS in the connection's own thread (in the accept loop a slow client would
        stall every other one), under the head deadline."""
        assert self.tls is not None
        request.settimeout(self.api.limits.client_timeout)
        conn = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        with self.guard:
            self.deadlines.pop(request, None)
            self.deadlines[conn] = time.monotonic() + self.api.limits.head_timeout
        try:
            conn.do_handshake()
        except BaseException:  # closed whatever went wrong, then re-raised
            with self.guard:
                self.deadlines.pop(conn, None)
            conn.close()  # wrap_socket detached ``request``: this is the one to close
            raise
        return conn

    def _release(self, request: Any, conn: Any = None) -> None:
        with self.guard:
            self.active -= 1
            self.deadlines.pop(request, None)
            self.deadlines.pop(conn, None)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 to a client over the limit, after reading its request head
        (closing on unread bytes would reset the connection before it reads us)."""
        try:
            request.settimeout(1.0)
            if self.tls is not None:  # a TLS client would take plain text for an attack
                try:
                    request = self.tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and len(head) < 16384:
                    chunk = request.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            body = b'{"error": "too many connections; try again", "kind": "http"}\n'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
                request.shutdown(socket.SHUT_WR)
        finally:
            request.close()
            with self.guard:
                self.refusing -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback: a reset connection is no news.
        log.info("connection ended", client=str(client_address), error=repr(sys.exc_info()[1]))

    def set_deadline(self, conn: socket.socket, deadline: float | None) -> None:
        with self.guard:
            if conn in self.deadlines:
                self.deadlines[conn] = deadline

    def start_follow(self) -> bool:
        with self.guard:
            if self.followers >= max(self.api.limits.max_connections // 2, 1):
                return False
            self.followers += 1
            return True

    def end_follow(self) -> None:
        with self.guard:
            self.followers -= 1

    def _janitor(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self.guard:
                late = [c for c, d in self.deadlines.items() if d is not None and d < now]
                for conn in late:
                    self.deadlines[conn] = None
            for conn in late:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class TcpListener(Listener, socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 64


class TcpListener6(TcpListener):
    address_family = socket.AF_INET6


class UnixListener(Listener, socketserver.UnixStreamServer):
    request_queue_size = 64


def parse_hostport(text: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[V6]:PORT". Raises UsageError."""
    host, sep, port = text.rpartition(":")
    if not sep or not DIGITS.match(port) or not 0 < int(port) < 65536:
        raise UsageError(f"--tcp must be HOST:PORT, not {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def open_unix(api: Api, path: Path) -> UnixListener:
    """The root-only socket: created under umask 0177, so it is never briefly open."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = UnixListener(str(path), Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.setup_limits(api, needs_token=False, name="unix")
    return server


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The TCP listener's TLS (1.2 at least) with the device certificate. Raises DeviceError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise DeviceError(f"api: cannot load the TLS certificate {cert}: {e}") from e
    return context


def open_tcp(api: Api, hostport: str, tls: ssl.SSLContext | None = None) -> TcpListener:
    host, port = parse_hostport(hostport)
    cls = TcpListener6 if ":" in host else TcpListener
    server = cls((host, port), Handler)
    server.setup_limits(api, needs_token=True, name="tcp", tls=tls)
    return server
