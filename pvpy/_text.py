"""Text for people (and JSON for scripts): sizes, tables, a device's status and history.

Shared by the workstation's and the device's commands (``pvpy.workstation.commands``,
``pvpy.device.commands``): a device's status reads the same whether it came over the
API, over a sandbox's control socket, or from its storage while it is off.
``Report`` is how a command says what it did: lines for people, or one JSON object a
line with ``--json`` (streams: push and update progress, logs). Standard library only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "Report",
    "TestingTicker",
    "ago",
    "await_restart",
    "clip",
    "human_size",
    "pid_of",
    "print_history",
    "print_status",
    "print_table",
    "rollback_advice",
    "show_status",
    "when",
]

ELLIPSIS = "…"


class Report:
    """What a command says: ``report("text", key=value)`` prints the text, or with
    ``--json`` the keyword arguments as one JSON line (the text as ``message`` when
    there are none). ``report.data(doc)`` prints a whole document (``--json`` verbs
    that print one thing)."""

    def __init__(self, as_json: bool = False, no_trunc: bool = False) -> None:
        self.as_json = as_json
        self.no_trunc = no_trunc

    def __call__(self, text: str, **data: Any) -> None:
        if self.as_json:
            print(json.dumps(data or {"message": text}, default=str), flush=True)
        else:
            print(text, flush=True)

    def data(self, doc: Any) -> None:
        print(json.dumps(doc, indent=2, default=str), flush=True)

    def hint(self, text: str) -> None:
        """A ``next:`` line: for people only (stderr under ``--json``)."""
        if self.as_json:
            print(f"next: {text}", file=sys.stderr)
        else:
            print(f"next: {text}", flush=True)


def pid_of(name: str, containers: Sequence[Mapping[str, Any]]) -> int | None:
    """The pid of container ``name`` in a device's container list (None: not running)."""
    pid = next((c.get("pid") for c in containers if c.get("name") == name), None)
    return pid if isinstance(pid, int) else None


def await_restart(
    name: str, before: int | None, containers: Callable[[], Sequence[Mapping[str, Any]]],
    timeout: float = 15,
) -> str:  # fmt: skip
    """Ask ``containers()`` until ``name`` runs with another pid than ``before``
    (read before the restart was asked for); what happened, in words."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = pid_of(name, containers())
        if now is not None and now != before:
            return f"restart {name}: restarted (pid {before or '-'} -> {now})"
        time.sleep(0.2)
    return f"restart {name}: requested; not running again after {timeout:g} s (pvpy device status)"


class TestingTicker:
    """While an update is TESTING, a line every ``every`` seconds saying for how long
    (people only: under ``--json`` the records say it)."""

    def __init__(self, say: Report, every: float = 5.0) -> None:
        self.say = say
        self.every = every
        self.last = 0.0

    def record(self, record: Mapping[str, Any]) -> None:
        since = record.get("testing_at") or 0
        if record.get("status") != "TESTING" or not since or self.say.as_json:
            return
        now = time.time()
        if not self.last:
            self.last = now  # the TESTING line itself was just printed
        elif now - self.last >= self.every:
            self.last = now
            self.say(f"revision {record['revision']}: TESTING for {ago(now - since)} (commits "
                     "once every goal held for the commit delay)")  # fmt: skip


def human_size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, … up to GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def clip(text: str, width: int, no_trunc: bool = False) -> str:
    """``text`` cut to ``width`` characters, the cut shown by an ellipsis."""
    if no_trunc or len(text) <= width:
        return text
    return text[: width - 1] + ELLIPSIS


def when(t: float | None) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` when unknown."""
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def ago(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``3 min``, ``2 h``, ``4 d``."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, as wide as their widest cell."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers).rstrip())
    for row in rows:
        print(line.format(*row).rstrip())


def rollback_advice(revision: int, highest: int) -> str:
    """What to do about an anti-rollback refusal: the number to build next."""
    return (
        f"revision {revision} is not newer than revision {highest}, the highest this device "
        f"has installed (revision numbers only go up, even after a rollback); build the next "
        f"one with `pvpy state build SPEC --out DIR --revision {highest + 1}`, sign it, send that"
    )


def _testing(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The update record under TESTING, if any."""
    for u in status.get("updates") or ():
        if u.get("status") == "TESTING" and u.get("revision") == status.get("updating"):
            record: Mapping[str, Any] = u
            return record
    return None


def print_status(status: Mapping[str, Any], no_trunc: bool = False) -> None:
    """A device's status (``GET /v1/status``, the control socket's ``status``, or
    ``offline_status`` of a stopped sandbox)."""
    if status.get("offline"):
        print(f"device     not running (from its storage {status.get('storage')})")
        print(f"installed  {', '.join(map(str, status.get('installed') or [])) or 'none'}")
        print(f"last good  {status.get('committed')}")
        if status.get("try") is not None:
            print(f"try        {status['try']} (boots next)")
        print(f"next boot  {status.get('next_boot')}")
    else:
        running = f"{status['revision']}{' (trying)' if status.get('trying') else ''}"
        testing = _testing(status)
        if testing is not None and testing["revision"] != status["revision"]:
            running += f", testing {testing['revision']}"
        print(f"running    {running}")
        print(f"last good  {status.get('committed')}")
        if status.get("try") is not None:
            print(f"try        {status['try']}")
        if status.get("updating") is not None:
            line = f"updating   {status['updating']}"
            countdown = status.get("testing")
            if isinstance(countdown, Mapping) and countdown.get("revision") == status["updating"]:
                line += f" (TESTING for {ago(countdown['for'])}: " + (
                    f"commits in {ago(countdown['commit_in'])})"
                    if countdown.get("commit_in") is not None
                    else f"goals not met, gives up in {ago(countdown['gives_up_in'])})"
                )
            elif testing is not None and testing.get("testing_at"):
                line += (f" (TESTING for {ago(time.time() - testing['testing_at'])}: commits "
                         "once every goal held for the commit delay)")  # fmt: skip
            print(line)
        if status.get("boot_error"):
            print(f"boot error {status['boot_error']}")
        print(f"goals      {'met' if status.get('all_goals_met') else 'not met'}")
    if status.get("containers"):
        print()
        rows = [
            [c["name"], c["group"], c["status"], c["goal"], str(c["restarts"]),
             str(c["pid"] or "-"), clip(c["reason"] or c["last_exit"] or "", 60, no_trunc)]
            for c in status["containers"]
        ]  # fmt: skip
        print_table(["NAME", "GROUP", "STATUS", "GOAL", "RESTARTS", "PID", "REASON"], rows)
    if status.get("updates"):
        print()
        print_table(
            ["REVISION", "STATE", "KIND", "REASON"],
            [[str(u["revision"]), u["status"], u["kind"] or "-", clip(u["reason"], 60, no_trunc)]
             for u in status["updates"]],
        )  # fmt: skip
        older = int(status.get("updates_total") or 0) - len(status["updates"])
        if older > 0:
            print(f"({older} older update records not shown: pvpy device history)")


def show_status(status: Mapping[str, Any], as_json: bool, no_trunc: bool = False) -> None:
    """A device's status as ``pvpy device status`` prints it, whichever way it came
    (a sandbox's control socket, a device's API, a stopped sandbox's storage):
    tables, or ``--json``."""
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status, no_trunc)


# -- history -------------------------------------------------------------------------


def _outcome(record: Mapping[str, Any], rolled_back_from: int | None) -> str:
    """How one update ended, in words."""
    status, reason = record.get("status"), record.get("reason") or ""
    testing_at, at = record.get("testing_at") or 0, record.get("time") or 0
    tested = f" after TESTING of {ago(at - testing_at)}" if testing_at and at >= testing_at else ""
    back = f"rollback from {rolled_back_from}: " if rolled_back_from is not None else ""
    if status in ("UPDATED", "DONE"):
        how = "restarted the changed apps" if record.get("kind") == "app" else "try-booted"
        return f"{back}committed{tested} ({how})"
    if status == "ERROR":
        return f"{back}failed{tested}: {reason}"
    if status == "WONTGO":
        return f"{back}refused: {reason}"
    if status is None:
        return "factory revision (provisioned)"
    return f"{back}{status.lower()}{tested}: {reason}".rstrip(": ")


def history_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each update record with how it ended (``outcome``) and, for a revision applied
    after a newer one had been, which one it rolled back from. Oldest first."""

    def started(r: Mapping[str, Any]) -> float:
        return float(r.get("started") or r.get("time") or 0)

    ordered = sorted(records, key=lambda r: (started(r), r.get("revision") or 0))
    rows = []
    previous: Mapping[str, Any] | None = None
    for r in ordered:
        back = None
        if (previous is not None and r.get("status") is not None
                and previous.get("status") not in ("WONTGO", None)
                and int(previous["revision"]) > int(r["revision"])):  # fmt: skip
            back = int(previous["revision"])
        rows.append({**r, "rolled_back_from": back, "outcome": _outcome(r, back)})
        if r.get("status") not in ("WONTGO",):
            previous = r
    return rows


def print_history(records: Sequence[Mapping[str, Any]], no_trunc: bool = False) -> None:
    """``pvpy device history``: when each update began, ended, and how."""
    rows = [
        [str(r["revision"]), r.get("status") or "-", r.get("kind") or "-",
         when(r.get("started") or r.get("time")), when(r.get("time")),
         ("yes" if r.get("installed") else "no") if "installed" in r else "-",
         clip(r["outcome"], 90, no_trunc)]
        for r in history_rows(records)
    ]  # fmt: skip
    print_table(["REVISION", "STATE", "KIND", "STARTED", "ENDED", "INSTALLED", "OUTCOME"], rows)
