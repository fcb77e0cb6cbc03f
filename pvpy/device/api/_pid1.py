"""The API's client of PID 1's control socket: a few requests at a time.

PID 1 answers control requests one by one, so more than ``CONTROL_SLOTS`` in
flight would only queue on its socket while holding API connections.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pvpy import control, paths
from pvpy.errors import ApiError, DeviceError

CONTROL_SLOTS = 2  # control requests in flight: PID 1 answers them one by one anyway
CONTROL_TIMEOUT = 10.0


class Control:
    """Requests to PID 1 through ``pvpy.control``, at most ``CONTROL_SLOTS`` at once."""

    def __init__(self, run_dir: Path) -> None:
        self.path = paths.control_socket(run_dir)
        self.slots = threading.BoundedSemaphore(CONTROL_SLOTS)

    def request(self, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """PID 1's reply. Raises ApiError 503 when PID 1 does not answer, DeviceError
        when it refuses."""
        if not self.slots.acquire(timeout=timeout):
            raise ApiError(503, "PID 1 is busy; try again", kind="device")
        try:
            reply = control.request(self.path, request, timeout)
        except DeviceError as e:
            raise ApiError(503, f"PID 1 does not answer ({e})", kind="device") from e
        finally:
            self.slots.release()
        return control.check_reply(reply)

    def status(self) -> dict[str, Any]:
        reply = self.request({"cmd": "status"})
        reply.pop("ok", None)
        return reply
