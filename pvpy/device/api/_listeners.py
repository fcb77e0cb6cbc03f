"""The device API's listeners: a unix socket and TCP (optionally TLS), each with
its own bounded set of connections and deadlines.

The unix socket has its own bound, so a flood on TCP never locks out the local
admin; a client over the bound gets a quick 503. On TCP a connection takes a
slot only once its first request head carried the token: until then it waits
in the gate (``_gate``: one thread for all, TLS handshake included, a short
deadline and a small bound of its own), so unauthenticated peers cannot hold
the slots. A request head must arrive within ``head_timeout``; a body must keep
``min_rate`` (see ``Handler.body_stream``).
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
from pvpy.device.api._gate import Gate
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
        # What the gate read of a connection's first request (see Handler.setup).
        self.prefixes: dict[socket.socket, bytes] = {}
        # TCP: a connection shows its token before it takes a slot (slowloris, see _gate).
        self.gate = Gate(self, tls) if needs_token else None
        threading.Thread(target=self._janitor, name=f"janitor-{name}", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate is not None:
            self.gate.admit(request, client_address)
        else:
            self.take_slot(request, client_address)

    def take_slot(self, request: Any, client_address: Any, prefix: bytes | None = None) -> None:
        """Serve a connection in a thread of its own if a slot is free, else 503.

        ``prefix``: the bytes of it the gate has read already."""
        with self.guard:
            busy = self.active >= self.api.limits.max_connections
            if not busy:
                self.active += 1
                self.deadlines[request] = None
                if prefix:
                    self.prefixes[request] = prefix
            elif self.refusing < self.api.limits.max_connections * 2:
                self.refusing += 1
            else:
                request.close()  # beyond even refusing politely: drop it
                return
        if busy:
            threading.Thread(target=self._refuse, args=(request, prefix is None),
                             daemon=True).start()  # fmt: skip
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread started: release its slot, then let it out
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def take_prefix(self, conn: socket.socket) -> bytes:
        with self.guard:
            return self.prefixes.pop(conn, b"")

    def _release(self, request: Any) -> None:
        with self.guard:
            self.active -= 1
            self.deadlines.pop(request, None)
            self.prefixes.pop(request, None)

    def _refuse(self, request: socket.socket, read_head: bool) -> None:
        """Answer 503 to a client over the limit, after reading its request head
        (closing on unread bytes would reset the connection before it reads us);
        the gate has read a TCP client's head already."""
        try:
            request.settimeout(1.0)
            head = b""
            with contextlib.suppress(OSError):
                while read_head and b"\r\n\r\n" not in head and len(head) < 16384:
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
                if not isinstance(request, ssl.SSLSocket):
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
    if not sep or not DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
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
