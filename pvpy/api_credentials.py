"""The device API's credentials file: the bearer token, and the pin of the device's
TLS certificate.

Provisioning writes it (STORAGE/``paths.API_TOKEN``, mode 0600; a board image
build copies it beside the image as ``api-token``); the device API reads the
token from it, and a workstation client (``--token-file``) reads both, so the
file alone reaches ``https://HOST:PORT``: the device certificate is trusted by
its fingerprint, not by a CA or a host name (a device has neither)::

    # pvpy device API credentials: secret, keep it mode 0600
    token: 5f0c1e...
    tls-sha256: 9a1b07...

``tls-sha256`` is the sha256 of the certificate's DER bytes, hex (the colon
form ``openssl x509 -fingerprint -sha256`` prints is taken too). A file that
holds one token line and nothing else (the format before TLS) is read as such.
Unknown keys are ignored (a newer pvpy may add some); a missing token is an
error. Errors name the file and say what is wrong, never what it holds: it may
be a private key given by mistake.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from pvpy.errors import UsageError

MIN_TOKEN = 16  # characters: a shorter token is guessable
MAX_TOKEN = 512
MAX_FILE = 4096  # bytes: anything larger is not a credentials file
TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: it goes in a header as is
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_LINE = re.compile(r"([a-z][a-z0-9-]*):[ \t]*(.*)")


@dataclass(frozen=True)
class ApiCredentials:
    token: str
    tls_sha256: str | None = None  # the pinned device certificate; None: a token-only file

    def render(self) -> bytes:
        lines = ["# pvpy device API credentials: secret, keep it mode 0600", f"token: {self.token}"]
        if self.tls_sha256:
            lines.append(f"tls-sha256: {self.tls_sha256}")
        return ("\n".join(lines) + "\n").encode()


def check_token(token: str, source: str) -> str:
    """``token`` if it can be a bearer token. Raises UsageError naming ``source`` only."""
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        raise UsageError(f"{source}: the API token must be {MIN_TOKEN} to {MAX_TOKEN} "
                         f"characters, not {len(token)}")  # fmt: skip
    if not TOKEN.fullmatch(token):
        raise UsageError(f"{source}: the API token must be printable ASCII without spaces")
    return token


def check_sha256(text: str, source: str) -> str:
    """A certificate fingerprint, normalized to lower-case hex. Raises UsageError."""
    value = text.strip().replace(":", "").lower()
    if not SHA256.fullmatch(value):
        raise UsageError(f"{source}: tls-sha256 must be 64 hex digits (a sha256)")
    return value


def parse_credentials(data: bytes, source: str) -> ApiCredentials:
    """The credentials in ``data`` (from ``source``, for errors). Raises UsageError."""
    if len(data) > MAX_FILE:
        raise UsageError(f"{source}: {len(data)} bytes is too large for an API credentials file")
    if b"PRIVATE KEY" in data or b"-----BEGIN" in data:
        raise UsageError(f"{source}: holds a PEM key or certificate, not the API credentials")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not an API credentials file (not ASCII text)") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UsageError(f"{source}: empty, no API token in it")
    if len(lines) == 1 and not KEY_LINE.fullmatch(lines[0]):
        return ApiCredentials(check_token(lines[0], source))  # a token-only file
    fields: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = KEY_LINE.fullmatch(line)
        if match is None:
            raise UsageError(f"{source}: not an API credentials file (line {number} is not "
                             "`key: value`)")  # fmt: skip
        if match[1] in fields:
            raise UsageError(f"{source}: {match[1]} given twice")
        fields[match[1]] = match[2].strip()
    if "token" not in fields:
        raise UsageError(f"{source}: no `token:` line")
    pin = fields.get("tls-sha256")
    return ApiCredentials(check_token(fields["token"], source),
                          check_sha256(pin, source) if pin else None)  # fmt: skip


def read_credentials(path: Path) -> ApiCredentials:
    """Read and check a credentials file. Raises UsageError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from e
    return parse_credentials(data, str(path))


def certificate_sha256(pem: bytes) -> str:
    """The fingerprint a client pins: sha256 of the certificate's DER bytes, hex."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    return hashlib.sha256(der).hexdigest()
