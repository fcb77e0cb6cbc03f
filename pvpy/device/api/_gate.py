"""The TCP listener's gate: a connection proves its token before it holds a slot.

A thread per connection is the API's scarce resource (``Limits.max_connections``).
Were a slot taken at accept, a few dozen sockets that connect and then drip a
request head (slowloris) would hold every slot, and a client with the token
would get 503. So a new TCP connection waits here first, in one thread for all
of them: its TLS handshake and its first request head are read without
blocking, under ``Limits.auth_timeout`` from connect, into a buffer of at most
``MAX_HEAD`` bytes. A head with the right bearer token takes a slot (the bytes
read so far go with it, see ``Handler.setup``); any other gets a 401 and is
closed. At most ``Limits.max_unauthenticated`` connections wait: one more
evicts the oldest, so a flood can delay a client by its head's round trip but
never lock it out (a legitimate head arrives in one packet right after connect).

A client that speaks plain HTTP to the TLS port is told so in plain HTTP (400)
rather than left with a handshake error.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pvpy.log import get_logger

if TYPE_CHECKING:
    from pvpy.device.api._listeners import Listener

log = get_logger("api")

MAX_HEAD = 32 << 10  # bytes of a first request head (http.server allows 100 lines of 64 KiB)
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record that opens a handshake


@dataclass(eq=False)
class _Waiting:
    """A connection that has not yet shown a request head with the token."""

    sock: socket.socket
    address: Any
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    tls_done: bool = False  # the handshake is over (or there is none: plain HTTP)
    sniffed: bool = False  # the first byte told TLS from plain HTTP


class Gate:
    """One thread and one selector for every TCP connection not yet authenticated."""

    def __init__(self, listener: Listener, tls: ssl.SSLContext | None) -> None:
        self.listener = listener
        self.tls = tls
        self.limits = listener.api.limits
        self.selector = selectors.DefaultSelector()
        self.waiting: OrderedDict[int, _Waiting] = OrderedDict()  # by fd, oldest first
        self.arrivals: list[tuple[socket.socket, Any]] = []
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        threading.Thread(target=self._run, name=f"gate-{listener.name}", daemon=True).start()

    def admit(self, sock: socket.socket, address: Any) -> None:
        """A new connection (from the accept loop): waits here for its token."""
        with self.lock:
            self.arrivals.append((sock, address))
        with contextlib.suppress(OSError):  # full: the gate is awake already
            self.wake_w.send(b"x")

    # -- the gate's thread

    def _run(self) -> None:
        while True:
            try:
                events = self.selector.select(timeout=0.5)
                for key, _ in events:
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self.wake_r.recv(4096)
                        continue
                    self._step(key.data)
                self._take_arrivals()
                self._expire()
            except Exception:  # a bug must not stop every TCP client getting in
                log.exception("api gate failed a round")

    def _take_arrivals(self) -> None:
        with self.lock:
            arrivals, self.arrivals = self.arrivals, []
        for sock, address in arrivals:
            while len(self.waiting) >= max(self.limits.max_unauthenticated, 1):
                _, oldest = self.waiting.popitem(last=False)
                self._drop(oldest, "evicted: too many connections without a token")
            try:
                sock.setblocking(False)
                conn = _Waiting(sock, address, time.monotonic() + self.limits.auth_timeout)
                self.selector.register(sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            self.waiting[sock.fileno()] = conn

    def _expire(self) -> None:
        now = time.monotonic()
        late = [c for c in self.waiting.values() if c.deadline < now]
        for conn in late:
            self._forget(conn)
            self._drop(conn, "no request head with a token in time")

    def _step(self, conn: _Waiting) -> None:
        """Move one connection on as far as its bytes allow."""
        try:
            if not conn.sniffed and not self._sniff(conn):
                return
            if not conn.tls_done and not self._handshake(conn):
                return
            if self._read(conn):
                self._judge(conn)
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        except (OSError, ValueError) as e:  # reset, TLS refused, ...: nothing to answer
            self._forget(conn)
            self._drop(conn, f"gone: {e}")

    def _sniff(self, conn: _Waiting) -> bool:
        first = conn.sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise ConnectionResetError("closed before a request")
        conn.sniffed = True
        if self.tls is None:
            if first[0] == TLS_HANDSHAKE:  # TLS to a plain-HTTP port: it cannot read us
                raise ConnectionRefusedError("a TLS client on the plain-HTTP port")
            conn.tls_done = True
            return True
        if first[0] != TLS_HANDSHAKE:
            self._forget(conn)
            self._answer(conn.sock, 400, "this port speaks TLS: use https://", "usage")
            return False
        plain = conn.sock
        self.selector.unregister(plain)
        conn.sock = self.tls.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        return True

    def _handshake(self, conn: _Waiting) -> bool:
        assert isinstance(conn.sock, ssl.SSLSocket)
        conn.sock.do_handshake()  # raises SSLWantRead/Write until it is done
        conn.tls_done = True
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        return True

    def _read(self, conn: _Waiting) -> bool:
        """Read what has come; True once a whole head is in (or it is too big)."""
        while True:  # until BlockingIOError/SSLWantReadError: nothing more for now
            data = conn.sock.recv(16384)
            if not data:
                raise ConnectionResetError("closed in the middle of a request head")
            conn.head += data
            if _head_end(conn.head) or len(conn.head) > MAX_HEAD:
                return True

    def _judge(self, conn: _Waiting) -> None:
        self._forget(conn)
        end = _head_end(conn.head)
        if not end:
            self._answer(conn.sock, 431, "request head too large", "http")
            return
        if not self.listener.api.token.accepts(_authorization(bytes(conn.head[:end]))):
            log.info("tcp client without the token", client=str(conn.address))
            self._answer(conn.sock, 401, "missing or wrong bearer token", "auth")
            return
        try:
            conn.sock.setblocking(True)
        except OSError:
            _close(conn.sock)
            return
        self.listener.take_slot(conn.sock, conn.address, bytes(conn.head))

    def _forget(self, conn: _Waiting) -> None:
        self.waiting.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(conn.sock)

    def _drop(self, conn: _Waiting, why: str) -> None:
        log.debug("tcp connection dropped", client=str(conn.address), reason=why)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(conn.sock)
        _close(conn.sock)

    def _answer(self, sock: socket.socket, status: int, reason: str, kind: str) -> None:
        """A short refusal, written without waiting (it fits any socket buffer), then close."""
        body = (json.dumps({"error": reason, "kind": kind}) + "\n").encode()
        extra = b'WWW-Authenticate: Bearer realm="pvpy"\r\n' if status == 401 else b""
        text = {400: b"Bad Request", 401: b"Unauthorized", 431: b"Request Header Fields Too Large"}
        # What the client sent is read first: closing on unread bytes resets the
        # connection, and the client may never see the answer.
        with contextlib.suppress(OSError, ValueError):
            for _ in range(4):
                if not sock.recv(16384):
                    break
        with contextlib.suppress(OSError, ValueError):
            sock.send(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"%sConnection: close\r\n\r\n%s" % (status, text[status], len(body), extra, body)
            )
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)
        _close(sock)


def _head_end(head: bytearray) -> int:
    """Where a complete request head ends (http.server takes bare LF lines too), or 0."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := head.find(sep)) >= 0]
    return min(ends) if ends else 0


def _authorization(head: bytes) -> str | None:
    """The first Authorization header of a request head (the one http.server reads)."""
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            return value.strip().decode("latin-1")
    return None


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
