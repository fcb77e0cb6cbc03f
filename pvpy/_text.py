"""Text for people: sizes, tables and a device's status, as the CLI prints them.

Shared by the workstation's and the device's commands (``pvpy.workstation.commands``,
``pvpy.device.commands``): a device's status reads the same whether it came over the
API or over a sandbox's control socket. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["human_size", "print_status", "print_table", "show_status"]


def human_size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, … up to GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, as wide as their widest cell."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers).rstrip())
    for row in rows:
        print(line.format(*row).rstrip())


def print_status(status: Mapping[str, Any]) -> None:
    """A device's status (``GET /v1/status`` or the control socket's ``status``)."""
    print(f"running    {status['revision']}{' (trying)' if status['trying'] else ''}")
    print(f"last good  {status.get('committed')}")
    if status.get("try") is not None:
        print(f"try        {status['try']}")
    if status.get("updating") is not None:
        print(f"updating   {status['updating']}")
    if status.get("boot_error"):
        print(f"boot error {status['boot_error']}")
    print(f"goals      {'met' if status.get('all_goals_met') else 'not met'}")
    print()
    rows = [
        [c["name"], c["group"], c["status"], c["goal"], str(c["restarts"]),
         str(c["pid"] or "-"), c["reason"] or c["last_exit"]]
        for c in status["containers"]
    ]  # fmt: skip
    print_table(["NAME", "GROUP", "STATUS", "GOAL", "RESTARTS", "PID", "REASON"], rows)
    if status.get("updates"):
        print()
        print_table(
            ["REVISION", "STATE", "KIND", "REASON"],
            [[str(u["revision"]), u["status"], u["kind"] or "-", u["reason"][:60]]
             for u in status["updates"]],
        )  # fmt: skip
        older = int(status.get("updates_total") or 0) - len(status["updates"])
        if older > 0:
            print(f"({older} older update records not shown)")


def show_status(status: Mapping[str, Any], as_json: bool) -> None:
    """A device's status as ``pvpy device status`` prints it, whichever way it came
    (a sandbox's control socket, a device's API): tables, or ``--json``."""
    if as_json:
        import json

        print(json.dumps(status, indent=2))
    else:
        print_status(status)
