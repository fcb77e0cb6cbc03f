"""HTTP(S) connections for pvpy's clients (the API client, the registry client)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ssl
from typing import Protocol

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


def http_connection(
    host: str, port: int | None, tls: bool, cacert: str | None, timeout: float,
    pin_sha256: str | None = None,
) -> http.client.HTTPConnection:  # fmt: skip
    """An HTTP(S) connection with 64 KiB blocks; TLS verifies the server's certificate
    by ``pin_sha256`` (its sha256), else against ``cacert`` (or the system's CAs).
    Raises UsageError for an unreadable ``cacert``. Shared by the API client and the
    registry client."""
    if not tls:
        return http.client.HTTPConnection(host, port, timeout=timeout, blocksize=1 << 16)
    if pin_sha256 is not None and cacert is None:
        return PinnedHTTPSConnection(host, port, pin_sha256, timeout)
    try:
        context = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--cacert {cacert}: {e}") from e
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context,
                                       blocksize=1 << 16)  # fmt: skip
