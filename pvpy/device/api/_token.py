"""The TCP listener's bearer token (STORAGE/``paths.API_TOKEN``: ``pvpy.api_credentials``)."""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path

from pvpy.api_credentials import MAX_FILE, parse_credentials
from pvpy.errors import UsageError
from pvpy.log import get_logger

log = get_logger("api")


class Token:
    """The TCP bearer token, read from its file again whenever the file changes.

    Re-reading lets a device get (or rotate) its token without restarting the
    API. A missing, short, or group/world-accessible token file means no TCP
    client gets in (like ssh and its key files).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._value: bytes | None = None
        self._lock = threading.Lock()

    def current(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            stamp: tuple[int, ...] = ()
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._value = self._load(stamp)
            return self._value

    def _load(self, stamp: tuple[int, ...]) -> bytes | None:
        if not stamp:
            log.warning("no api token: TCP clients are refused", path=str(self.path))
            return None
        if stamp[3] & 0o077:
            log.error("api token file is readable by others: TCP clients are refused",
                      path=str(self.path), mode=oct(stamp[3] & 0o777))  # fmt: skip
            return None
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as e:
            log.error("api token unreadable: TCP clients are refused", error=str(e))
            return None
        try:
            # a token-only file, or token + certificate pin; short or odd tokens refused
            value = parse_credentials(data, str(self.path)).token.encode()
        except UsageError as e:  # says what is wrong, never what the file holds
            log.error("api token refused: TCP clients are refused", error=str(e))
            return None
        log.info("api token loaded", path=str(self.path))
        return value

    def accepts(self, header: str | None) -> bool:
        expected = self.current()
        if expected is None or header is None:
            return False
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(errors="replace"), expected)
