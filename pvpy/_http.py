"""HTTP(S) connections for pvpy's clients (the API client, the registry client)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import io
import socket
import ssl
import time
from typing import Any, Protocol

from pvpy.errors import UsageError


class Readable(Protocol):
    """A request body streamed from a file-like object."""

    def read(self, n: int = -1, /) -> bytes: ...


class CertificatePinError(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one."""

    def __str__(self) -> str:
        return str(self.args[0])


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a server whose certificate is known by its sha256 (a device's
    self-signed one): no CA, no host name, only the pin. Checked in ``connect``,
    so nothing (no token) is sent to a server that does not match."""

    def __init__(self, host: str, port: int | None, pin_sha256: str, timeout: float) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # the pin names the certificate; names are moot
        context.verify_mode = ssl.CERT_NONE  # no CA signed it: verified by its pin below
        super().__init__(host, port, timeout=timeout, context=context, blocksize=1 << 16)
        self.pin_sha256 = pin_sha256

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if not hmac.compare_digest(got, self.pin_sha256):
            self.close()
            raise CertificatePinError(
                f"certificate sha256 {got[:16]}… is not the pinned {self.pin_sha256[:16]}…"
            )


class DeadlineExceeded(TimeoutError):
    """A request had no complete answer before its deadline."""


class _DeadlineSocket:
    """A connected socket whose every read and send waits at most what is left of the
    request's deadline (and at most ``read_timeout`` for one read). A per-read timeout
    alone lets a server that drips one byte every 10 s hold a request forever."""

    def __init__(self, sock: socket.socket, deadline: float, read_timeout: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.read_timeout = read_timeout

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("no complete answer before the deadline")
        self.sock.settimeout(min(self.read_timeout, left))

    def _expired(self, e: TimeoutError) -> TimeoutError:
        """The last wait's timeout was the deadline's rest: name it for what it is."""
        if time.monotonic() >= self.deadline - 0.05:
            return DeadlineExceeded("no complete answer before the deadline")
        return e

    def recv_into(self, buffer: Any) -> int:
        self._arm()
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError as e:
            raise self._expired(e) from e

    def sendall(self, data: Any) -> None:
        self._arm()
        try:
            self.sock.sendall(data)
        except TimeoutError as e:
            raise self._expired(e) from e

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def shutdown(self, how: int) -> None:
        # the plain socket's shutdown, even under TLS: it may run from a signal handler
        # while a read of the same socket is under way (SSLSocket.shutdown would drop
        # the TLS state under that read)
        socket.socket.shutdown(self.sock, how)

    def __getattr__(self, name: str) -> Any:  # close, fileno, setsockopt, getpeercert...
        return getattr(self.sock, name)


class _DeadlineReader(io.RawIOBase):
    """The socket's own reader (it keeps the socket open while a response reads it,
    as ``socket.makefile`` does), each read armed with what is left of the deadline."""

    def __init__(self, sock: _DeadlineSocket) -> None:
        self.sock = sock
        self.raw = sock.sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock._arm()
        try:
            return self.raw.readinto(buffer) or 0
        except TimeoutError as e:
            raise self.sock._expired(e) from e

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Deadline:
    """Mixin for http.client connections: one request, one deadline (``begin``), from
    connect to the last byte of the answer (see ``_DeadlineSocket``)."""

    sock: Any
    timeout: float | None
    deadline: float = float("inf")
    read_timeout: float = 30.0

    def begin(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("no complete answer before the deadline")
        self.timeout = min(self.read_timeout, left)  # connect and TLS handshake
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self.deadline, self.read_timeout)

    def cut(self) -> None:
        """End the request now (from a signal handler, say): its reads see the end."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class DeadlineHTTPConnection(_Deadline, http.client.HTTPConnection):
    pass


class DeadlineHTTPSConnection(_Deadline, http.client.HTTPSConnection):
    pass


class DeadlinePinnedHTTPSConnection(_Deadline, PinnedHTTPSConnection):
    pass


def http_connection(
    host: str, port: int | None, tls: bool, cacert: str | None, timeout: float,
    pin_sha256: str | None = None, deadline: float | None = None,
) -> http.client.HTTPConnection:  # fmt: skip
    """An HTTP(S) connection with 64 KiB blocks; TLS verifies the server's certificate
    by ``pin_sha256`` (its sha256), else against ``cacert`` (or the system's CAs).
    ``timeout`` bounds each read; with ``deadline`` (seconds) the whole request is
    bounded too (a ``_Deadline`` connection: ``DeadlineExceeded``, a TimeoutError).
    Raises UsageError for an unreadable ``cacert``. Shared by the API client and the
    registry client."""
    conn: http.client.HTTPConnection
    if not tls:
        cls = DeadlineHTTPConnection if deadline is not None else http.client.HTTPConnection
        conn = cls(host, port, timeout=timeout, blocksize=1 << 16)
    elif pin_sha256 is not None and cacert is None:
        pinned = DeadlinePinnedHTTPSConnection if deadline is not None else PinnedHTTPSConnection
        conn = pinned(host, port, pin_sha256, timeout)
    else:
        try:
            context = ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--cacert {cacert}: {e}") from e
        https = DeadlineHTTPSConnection if deadline is not None else http.client.HTTPSConnection
        conn = https(host, port, timeout=timeout, context=context, blocksize=1 << 16)
    if isinstance(conn, _Deadline):
        conn.read_timeout = timeout
        assert deadline is not None
        conn.begin(deadline)
    return conn
