"""QEMU boot to READY: pvpy as PID 1 of the qemu-arm64 image vs the same kernel with a shell init.

Three ways to boot, each ``reps`` times, on ``qemu-system-aarch64 -M virt -cpu
cortex-a72`` (TCG: software emulation on this x86 machine):

- ``uboot``: the image as a device boots it: U-Boot, its boot script, the
  revision's kernel and initramfs, pvpy as PID 1, containers;
- ``direct``: the same kernel and pvpy initramfs loaded by QEMU itself
  (``-kernel/-initrd``, the command line U-Boot would pass), the same disk:
  what pvpy costs, without the bootloader;
- ``shell``: the same kernel with a one-file initramfs whose ``/init`` is
  busybox ``sh`` printing a line and powering off: the floor any init sits on.

Times are host seconds since QEMU started, read from the console lines
(``pvpy.workstation.qemu.Machine`` stamps each line as it arrives).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SHELL_MARK = "pvbench: shell init up"
EVENTS = {  # name -> console pattern (first match after the previous one); `quiet` kernel
    "pid1": r'"logger": "init".*"event": "',  # PID 1's first log line
    "booting": r'"event": "booting revision"',
    "ready": r'"name": "web", "status": "READY"',  # the last goal of the demo revision
}


def _shell_initramfs(busybox: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "init").write_text(
            f"#!/bin/busybox sh\n/bin/busybox echo '{SHELL_MARK}'\n/bin/busybox poweroff -f\n"
        )
        (root / "init").chmod(0o755)
        names = "init\nbin\nbin/busybox\n"
        data = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=names.encode(),
            capture_output=True,
            check=True,
        ).stdout
    out.write_bytes(data)
    return out


def _direct_argv(argv: list[str], kernel: Path, initrd: Path, cmdline: str) -> list[str]:
    """``argv`` (pvpy.workstation.qemu's for the image) with QEMU loading the kernel
    instead of U-Boot."""
    out: list[str] = []
    skip = 0
    for i, word in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if word == "-bios" or (word == "-drive" and argv[i + 1].startswith("if=pflash")):
            skip = 1
            continue
        out.append(word)
    return [*out, "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def _boot(argv: list[str], image: Path, log: Path, marks: dict[str, str],
          timeout: float) -> dict[str, float | None]:  # fmt: skip
    from unittest import mock

    from pvpy.workstation.qemu import Machine

    times: dict[str, float | None] = dict.fromkeys(marks)
    # Machine builds its own command line from the image; the bench swaps in its own.
    with mock.patch("pvpy.workstation.qemu.qemu_argv", return_value=argv):
        machine = Machine(image, port=None, log_path=log, no_reboot=True)
    with machine:
        start = 0
        for name, pattern in marks.items():
            try:
                start = machine.wait_for(pattern, timeout, start)
            except Exception:  # a missed mark is recorded as None, the rest still tried
                break
            times[name] = machine.lines[start][0]
    return times


def fig_qemu_boot(work: Path, reps: int) -> dict[str, Any]:
    """Build the qemu-arm64 image (packages cached in ~/.cache/pvpy) and boot it."""
    from pvpy.workstation.image import build_image
    from pvpy.workstation.qemu import ensure_qemu, qemu_argv

    ensure_qemu()
    subprocess.run([str(Path(__file__).resolve().parents[1] / "examples/demo/make-rootfs")],
                   check=True)  # fmt: skip
    b = build_image("qemu-arm64", work / "img")
    state = json.loads((b.revision_dir / "state.json").read_bytes())
    bsp = state["bsp"]
    objects = b.revision_dir / "objects"
    cmdline = f"console=ttyAMA0 {bsp.get('cmdline', '')} pv_rev={b.revision}".replace("  ", " ")
    shell_initrd = _shell_initramfs(b.packages_root / "usr/bin/busybox", work / "shell.cpio")
    base = qemu_argv(b.out, None, no_reboot=True)
    kernel = objects / bsp["kernel"]["sha256"]
    ways = {
        "uboot": (base, {"uboot": r"^U-Boot 20", "booti": r"pvpy-boot: booti", **EVENTS}),
        "direct": (_direct_argv(base, kernel, objects / bsp["initrd"]["sha256"], cmdline), EVENTS),
        "shell": (_direct_argv(base, kernel, shell_initrd, "console=ttyAMA0 quiet"),
                  {"shell": SHELL_MARK}),
    }  # fmt: skip
    disk = b.disk
    pristine = work / "disk.pristine"
    shutil.copy(disk, pristine)  # every boot starts from the factory disk
    runs: dict[str, list[dict[str, float | None]]] = {name: [] for name in ways}
    for rep in range(reps):
        for name, (argv, marks) in ways.items():
            shutil.copy(pristine, disk)
            runs[name].append(_boot(argv, b.out, work / f"{name}-{rep}.log", marks, 300))
    summary: dict[str, Any] = {}
    for name, samples in runs.items():
        summary[name] = {}
        for mark in samples[0]:
            values = [s[mark] for s in samples if s[mark] is not None]
            summary[name][mark] = None
            if values:
                summary[name][mark] = {"median": statistics.median(values), "min": min(values),
                                       "max": max(values), "n": len(values)}  # fmt: skip
    return {
        "reps": reps, "kernel_package": b.kernel_package, "boots": summary,
        "initrd_bytes": bsp["initrd"]["size"], "shell_initrd_bytes": shell_initrd.stat().st_size,
    }  # fmt: skip


if __name__ == "__main__":  # a quick look without the whole suite
    import sys

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    out = fig_qemu_boot(Path(tempfile.mkdtemp(prefix="pvbench-qemu-")), reps)
    print(json.dumps(out, indent=1))
