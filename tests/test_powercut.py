"""Power cuts at every persist point of every kind of update.

For each kind of update (app-only, BSP/host-OS change, app rollback, reboot
rollback) and each persist point that kind passes, a fresh sandbox device
runs revision 1, the update starts with ``PVPY_POWERCUT=<point>``, and the
power goes at that point: PID 1 exits (the kernel kills its namespace), or
the staging process is SIGKILLed together with the whole sandbox. The
device then boots again and must settle on a valid signed revision, with
its permanent data intact and every update record finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpy.device import update as up
from tests.device import COMMIT, pvpy
from tests.test_update import revisions

pytestmark = pytest.mark.root

# kind -> (revision key in revisions(), the persist points that kind passes)
KINDS = {
    "app-only": ("v2", ["stage:object", "stage:trail", "app:switched", "app:commit", "gc:done"]),
    "bsp-change": (
        "bsp",
        ["stage:object", "stage:trail", "reboot:try", "reboot:testing", "reboot:commit", "gc:done"],
    ),
    "app-rollback": ("crash", ["stage:object", "stage:trail", "app:switched", "app:rollback"]),
    "reboot-rollback": (
        "badbsp",
        ["stage:trail", "reboot:try", "reboot:testing", "reboot:rollback"],
    ),
}
CASES = [(kind, point) for kind, (_, points) in KINDS.items() for point in points]
covered: list[tuple[str, str]] = []


def test_every_persist_point_is_named() -> None:
    named = {p for _, points in KINDS.values() for p in points}
    assert named == set(up.PERSIST_POINTS), set(up.PERSIST_POINTS) ^ named


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, demo_trees: Path
) -> tuple[Path, dict[str, Path]]:
    from pvpy.signing import generate_key

    tmp = tmp_path_factory.mktemp("powercut")
    generate_key(tmp / "keys")
    return tmp / "keys", revisions(tmp, tmp / "keys")


def settled(s: dict[str, Any]) -> bool:
    return (
        s.get("updating") is None
        and s.get("try") is None
        and bool(s.get("all_goals_met"))
        and s.get("revision") == s.get("committed")
        and all(u["status"] in up.FINAL for u in s.get("updates", []))
    )


@pytest.mark.parametrize(("kind", "point"), CASES, ids=[f"{k}@{p}" for k, p in CASES])
def test_power_cut(
    kind: str, point: str, tmp_path: Path, built: tuple[Path, dict[str, Path]], sandbox: Any
) -> None:
    keys, revs = built
    target = revs[KINDS[kind][0]]
    in_pid1 = not point.startswith("stage:")
    env = {"PVPY_POWERCUT": point} if in_pid1 else {}
    device = sandbox(revs["v1"], *COMMIT, env=env, trust=keys / "pvpy.pub")
    device.wait_goals()
    counter = device.storage / "disks/permanent/counter/volumes/data/runs"
    device.wait_for("the counter app's first run", lambda _: counter.exists())
    runs_before = int(counter.read_text())

    if in_pid1:
        pvpy("device", "update", target, "--storage", device.storage, "--no-wait", check=False)
        device.wait_for(
            f"the power cut at {point}",
            lambda s: any(e.get("event") == "power cut" for e in device.events()),
            timeout=60,
        )
    else:
        import os
        import subprocess
        import sys

        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pvpy",
                "device",
                "update",
                str(target),
                "--storage",
                str(device.storage),
                "--no-wait",
            ],
            env={**os.environ, "PVPY_POWERCUT": point},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == -9, result.stderr  # cut while staging
        device.kill()  # and the device loses power with it
        device.start()

    status = device.wait_for("the device to settle", settled, timeout=90)
    running = status["revision"]
    # a valid, signed revision, verified the way PID 1 verifies at boot
    pvpy("device", "verify-installed", "--storage", device.storage, "--revision", running)
    assert status["committed"] == running
    # permanent data intact (the counter app ran again after the cut: it only grew)
    assert int(counter.read_text()) >= runs_before
    covered.append((kind, point))


def test_report_coverage() -> None:
    """Runs last in this module: says how many points x kinds were cut."""
    kinds = {k for k, _ in covered}
    print(
        f"\npower cuts: {len(covered)} of {len(CASES)} point x kind cases passed "
        f"({len(up.PERSIST_POINTS)} persist points, {len(kinds)} kinds)"
    )
    if len(covered) != len(CASES):
        pytest.skip("some power-cut cases did not run (deselected or failed)")
