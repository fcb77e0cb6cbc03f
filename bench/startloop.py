"""Time `crun run` / `runc run` of one bundle, repeatedly; print JSON.

Run inside a private mount namespace whose /sys/fs/cgroup/unified is
unmounted (bench/pvbench.py does that with `unshare -m`): crun 1.8 refuses a
hybrid cgroup layout, and both runtimes get the same layout this way.

Usage: startloop.py RUNTIME BUNDLE REPS
For each repetition, two runs of the same bundle:
- `true`: args /bin/true, wall time of the whole `RUNTIME run` (create,
  start, exit, delete);
- `stamp`: args `sh -c 'adjtimex > /tmp/stamp'`, time from just before the
  exec of `RUNTIME run` to the wall clock the container's process wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path


def stamp_of(path: Path) -> float:
    text = path.read_text()
    sec = re.search(r"time\.tv_sec:\s*(\d+)", text)
    usec = re.search(r"time\.tv_usec:\s*(\d+)", text)
    assert sec and usec, text
    return int(sec.group(1)) + int(usec.group(1)) / 1e6


def set_args(bundle: Path, args: list[str]) -> None:
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(config))


def main() -> None:
    runtime, bundle, reps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    state = bundle.parent / f"{runtime}-state"
    base = [runtime, "--root", str(state), "run", "--bundle", str(bundle)]
    stamp = bundle / "rootfs" / "tmp" / "stamp"
    true_s: list[float] = []
    stamp_s: list[float] = []
    for i in range(reps + 1):  # the first run warms the page cache, not counted
        set_args(bundle, ["/bin/true"])
        t0 = time.perf_counter()
        subprocess.run([*base, f"t{i}"], check=True, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        set_args(bundle, ["/bin/sh", "-c", "adjtimex > /tmp/stamp"])
        stamp.unlink(missing_ok=True)
        t0 = time.time()
        subprocess.run([*base, f"s{i}"], check=True, stdin=subprocess.DEVNULL)
        running = stamp_of(stamp) - t0
        if i:
            true_s.append(wall)
            stamp_s.append(running)
    print(json.dumps({"true": true_s, "stamp": stamp_s}))


if __name__ == "__main__":
    main()
