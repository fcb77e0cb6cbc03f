"""Times as people write them on a command line: ``10m`` ago, or a moment.

``pvpy device logs --since/--until`` take what ``docker logs`` takes: a duration
before now (``45s``, ``10m``, ``1h30m``, ``2d``), a unix time (``1764671387``), a
date and time (``2026-12-02T10:00:00``, ``2026-12-02 10:00``, with ``Z`` or an
offset for UTC, else local time) or a time of today (``10:00``). Standard library only.
"""

from __future__ import annotations

import datetime as dt
import re
import time

from pvpy.errors import UsageError

__all__ = ["parse_when"]

DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")
UNITS = (86400, 3600, 60, 1)


def parse_when(text: str | None, option: str, now: float | None = None) -> float | None:
    """``text`` as a unix time (None for None). Raises UsageError naming ``option``."""
    if text is None:
        return None
    now = time.time() if now is None else now
    word = text.strip()
    match = DURATION.fullmatch(word)
    if word and match and any(match.groups()):
        return now - sum(float(g) * u for g, u in zip(match.groups(), UNITS, strict=True) if g)
    if re.fullmatch(r"\d+(\.\d+)?", word):
        return float(word)
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", word):
        word = dt.datetime.fromtimestamp(now).strftime("%Y-%m-%d ") + word
    try:
        moment = dt.datetime.fromisoformat(word.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a duration (10m, 1h30m, 45s) or a time "
                         "(2026-12-02T10:00:00, 10:00)") from None  # fmt: skip
    return moment.timestamp()  # a naive time is local, as `date` shows it
