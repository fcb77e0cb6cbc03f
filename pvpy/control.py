"""Client of PID 1's control socket: one JSON line out, one JSON line back.

Used by the CLI, the API server, the puller and the tests; the server side is
PID 1's control handler (``pvpy.device.pid1``). Local and root only (the socket
is mode 0600, ``paths.CONTROL_SOCKET`` in the run directory).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from pvpy.errors import DeviceError, one_line

MAX_REPLY = 16 * 1024 * 1024


def request(sock_path: Path, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send ``message``, return PID 1's reply (whatever its "ok").

    Raises DeviceError when nothing answers at ``sock_path`` or the reply is
    not a JSON object.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(sock_path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REPLY:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise DeviceError(f"no device answers at {sock_path} ({e.strerror or e})") from e
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise DeviceError(f"bad reply from {sock_path}") from e
    if not isinstance(reply, dict):
        raise DeviceError(f"bad reply from {sock_path}")
    return reply


def check_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` when PID 1 said ok. Raises DeviceError with PID 1's reason (one line)."""
    if not reply.get("ok"):
        raise DeviceError(one_line(str(reply.get("error"))))
    return reply


def call(sock_path: Path, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send ``message``, return PID 1's reply when it says ok.

    Raises DeviceError when nothing answers, or PID 1 refuses (its reason, one line).
    """
    return check_reply(request(sock_path, message, timeout))
