"""HTTP(S) connections for pvpy's clients (the API client, the registry client)."""

from __future__ import annotations

import http.client
from typing import Protocol

from pvpy.errors import UsageError


class Readable(Protocol):
    """A request body streamed from a file-like object."""

    def read(self, n: int = -1, /) -> bytes: ...


def http_connection(
    host: str, port: int | None, tls: bool, cacert: str | None, timeout: float
) -> http.client.HTTPConnection:
    """An HTTP(S) connection with 64 KiB blocks; TLS verifies against ``cacert``
    (or the system's CAs). Raises UsageError for an unreadable ``cacert``.
    Shared by the API client and the registry client."""
    if not tls:
        return http.client.HTTPConnection(host, port, timeout=timeout, blocksize=1 << 16)
    import ssl

    try:
        context = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--cacert {cacert}: {e}") from e
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context,
                                       blocksize=1 << 16)  # fmt: skip
