"""What a client may send the device API: the limits, and the shapes of what it names.

The defaults are ``pvpy device api``'s (and ``docs/openapi.yaml`` states them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pvpy.trust import MAX_STATE

BIG_BODY = 1 << 20  # a JSON body larger than this waits for one of BIG_BODIES slots
BIG_BODIES = 2

# Used with fullmatch only: "$" also matches before a trailing newline ("5\n" passed).
DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() takes "²", int() does not
CONTAINER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # $defs/name of the state schema


@dataclass(frozen=True)
class Limits:
    max_connections: int = 32  # per listener, for clients that showed the token (TCP)
    # TCP connections that have not yet shown the token wait in one thread, not in a slot
    max_unauthenticated: int = 64  # waiting at once; one more evicts the oldest
    auth_timeout: float = 5.0  # from connect to a first request head with the token (TLS too)
    max_state: int = MAX_STATE
    max_json: int = 8 << 20  # any other JSON body (e.g. 100k object names)
    max_object: int = 1 << 30  # an object no pending state names
    head_timeout: float = 10.0  # from connect (or the last response) to a full request head
    client_timeout: float = 30.0  # the longest silence while a body or response moves
    min_rate: int = 64 << 10  # bytes/s a body must average, beyond client_timeout

    @property
    def max_revision_body(self) -> int:
        # The state travels as a JSON string: escaping (\" \\) at most doubles it.
        return 2 * self.max_state + (1 << 20)
