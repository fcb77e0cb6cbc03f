"""Talking to a device's API from the tests the way a user's client does: the
credentials file alone (its token and the device certificate's pin), https."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvpy.api_credentials import read_credentials
from pvpy.errors import PvpyError
from pvpy.workstation.remote import Device


def device(url: str, credentials: Path, timeout: float = 10.0) -> Device:
    creds = read_credentials(credentials)
    return Device(url, creds.token, timeout=timeout, pin_sha256=creds.tls_sha256)


def api(url: str, credentials: Path, path: str, method: str = "GET") -> Any:
    """One API call, its JSON reply decoded. Raises PvpyError (RemoteError)."""
    return device(url, credentials).call(method, path, body=b"" if method == "POST" else None)


def api_or_none(url: str, credentials: Path, path: str, method: str = "GET") -> Any:
    """The reply, or None while the device does not answer (booting, rebooting)."""
    try:
        return api(url, credentials, path, method)
    except PvpyError:
        return None
