"""pvpy benchmark suite: measure pvpy and the alternatives in one run.

Usage (as root, through bench/run which installs what is needed):
    bench/run [--reps N] [--only memory,start,boot,update,scale,store,profile]

Writes bench/results.json and bench/report.md (bench/report.py renders it,
bench/plot.py draws the PNGs). Every figure is measured here, in this run;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lib import (
    APP_TREE,
    HOSTOS_TREE,
    IDLE,
    REPO,
    DockerEngine,
    activity,
    container_event,
    device,
    hostos,
    log,
    machine_info,
    make_bundle,
    pgrep,
    probe_app,
    read_stamp,
    smaps,
    smaps_sum,
    stat,
)

from tests.device import app, build_revision, pvpy

BENCH = Path(__file__).resolve().parent
SETTLE = 3.0  # seconds of idling before memory is sampled
PID1_IMPORTS = "pvpy.device.pid1, pvpy.device.supervisor, pvpy.device.runtime, pvpy.device.update"
# `--privileged` fails here (CAP_SYS_RESOURCE is not in this machine's bounding set,
# runc: "unable to apply caps"): every other capability, as pvpy gives its host OS.
HOSTOS_PRIVILEGES = (
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
)


def six_containers() -> dict[str, Any]:
    """The host OS and 5 apps; app1 stamps its start time (see lib.STAMP)."""
    return {"hostos": hostos(), "app1": probe_app(), **{f"app{i}": app(IDLE) for i in range(2, 6)}}


def provision(rev: Path, storage: Path, keys: Path) -> None:
    pvpy("device", "provision", "--storage", storage, "--state", rev, "--trust", keys / "pvpy.pub")


def goal_times(dev: Any) -> dict[str, float | None]:
    """Timeline of one boot (wall clock, from the device log)."""
    last_ready = dev.last_event(lambda e: e.get("event") == "group ready")
    return {
        "launch": dev.started_at,
        "boot": dev.first_event(lambda e: e.get("event") == "boot"),
        "booting": dev.first_event(lambda e: e.get("event") == "booting revision"),
        "ready": last_ready,
    }


# -- 1+2+3: boot the host OS + 5 apps: memory, start latency of app1, boot time ---------


def fig_pvpy_boot6(work: Path, keys: Path, reps: int) -> dict[str, Any]:
    rev = build_revision(work, keys, 1, six_containers())
    storage = work / "dev"
    provision(rev, storage, keys)
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "pid1_pss",
            "pid1_rss",
            "pid1_uss",
            "monitors_pss",
            "monitors_rss",
            "monitors_count",
            "launcher_pss",
            "boot_total",
            "boot_launcher",
            "boot_verify",
            "boot_containers",
            "start_prepare",
            "start_to_running",
            "start_exec",
            "start_observed",
        )
    }
    idle: dict[str, float] = {}
    for i in range(reps + 1):  # boot 0 warms caches and is not counted
        log(f"pvpy boot {i}/{reps} (host OS + 5 apps)")
        with device(storage, work / f"boot{i}.log") as dev:
            dev.wait_goals(60)
            time.sleep(SETTLE)
            pid1 = dev.pid1()
            mem = smaps(pid1)
            mons = smaps_sum(dev.crun_monitors())
            launcher = smaps_sum(pgrep(f"pvpy device run --storage {storage}$"))
            if i == 1:
                idle = activity([pid1], 10.0)
            t = goal_times(dev)
            group = dev.first_event(
                lambda e: e.get("event") == "group starting" and e.get("group") == "app"
            )
            mounted = dev.first_event(container_event("app1", "MOUNTED"))
            starting = dev.first_event(container_event("app1", "STARTING"))
            started = dev.first_event(container_event("app1", "STARTED"))
        stamp = read_stamp(storage / "disks/permanent/app1/volumes/data/stamp")
        if i == 0:
            continue
        out["pid1_pss"].append(mem["pss"])
        out["pid1_rss"].append(mem["rss"])
        out["pid1_uss"].append(mem["uss"])
        out["monitors_pss"].append(mons["pss"])
        out["monitors_rss"].append(mons["rss"])
        out["monitors_count"].append(mons["count"])
        out["launcher_pss"].append(launcher["pss"])
        if t["ready"] and t["boot"] and t["booting"]:
            out["boot_total"].append(t["ready"] - t["launch"])  # type: ignore[operator]
            out["boot_launcher"].append(t["boot"] - t["launch"])  # type: ignore[operator]
            out["boot_verify"].append(t["booting"] - t["boot"])
            out["boot_containers"].append(t["ready"] - t["booting"])
        if group and mounted and starting and started and stamp:
            out["start_prepare"].append(mounted - group)
            out["start_to_running"].append(stamp - group)
            out["start_exec"].append(stamp - starting)
            out["start_observed"].append(started - group)
    result: dict[str, Any] = {k: stat(v) for k, v in out.items()}
    result["idle_activity"] = idle
    return result


def fig_bare_python(reps: int) -> dict[str, Any]:
    """An idle interpreter: bare, and with PID 1's modules imported."""
    out: dict[str, Any] = {}
    cases = {  # the interpreter PID 1 runs (sys.executable of the bench = .venv's)
        "bare": [sys.executable, "-c", "import signal; signal.pause()"],
        "pid1_imports": [sys.executable, "-c", f"import signal, {PID1_IMPORTS}; signal.pause()"],
    }
    for name, argv in cases.items():
        pss, rss, uss = [], [], []
        for _ in range(reps):
            proc = subprocess.Popen(argv, cwd=REPO)
            time.sleep(1.5)
            m = smaps(proc.pid)
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            pss.append(m["pss"])
            rss.append(m["rss"])
            uss.append(m["uss"])
        out[name] = {"pss": stat(pss), "rss": stat(rss), "uss": stat(uss)}
    return out


def docker_run_host_os_and_apps(docker: DockerEngine, apps: list[str]) -> float:
    """``docker run -d`` the host OS, then each idle app, in a row; the seconds it took."""
    t0 = time.monotonic()
    docker.docker("run", "-d", "--name", "hostos", *HOSTOS_PRIVILEGES, "--network", "host",
                  "pvbench/hostos", "/sbin/init")  # fmt: skip
    for name in apps:
        docker.docker("run", "-d", "--name", name, "--network", "none", "pvbench/app",
                      "/bin/sh", "-c", IDLE)  # fmt: skip
    return time.monotonic() - t0


def fig_docker_boot6(docker: DockerEngine, work: Path, reps: int) -> dict[str, Any]:
    """dockerd + containerd running the same 6 containers (same rootfs trees)."""
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "engine_pss",
            "engine_rss",
            "engine_uss",
            "dockerd_pss",
            "containerd_pss",
            "shims_pss",
            "shims_rss",
            "shims_count",
            "start_all",
        )
    }
    idle: dict[str, float] = {}
    for i in range(reps + 1):
        log(f"docker run {i}/{reps} (host OS + 5 apps)")
        start_all = docker_run_host_os_and_apps(docker, [f"app{k}" for k in range(1, 6)])
        time.sleep(SETTLE)
        pids = docker.pids()
        engine = smaps_sum(pids["dockerd"] + pids["containerd"])
        shims = smaps_sum(pids["containerd-shim"])
        if i == 1:
            idle = activity(pids["dockerd"] + pids["containerd"], 10.0)
        docker.remove_all()
        if i == 0:
            continue
        out["engine_pss"].append(engine["pss"])
        out["engine_rss"].append(engine["rss"])
        out["engine_uss"].append(engine["uss"])
        out["dockerd_pss"].append(smaps_sum(pids["dockerd"])["pss"])
        out["containerd_pss"].append(smaps_sum(pids["containerd"])["pss"])
        out["shims_pss"].append(shims["pss"])
        out["shims_rss"].append(shims["rss"])
        out["shims_count"].append(shims["count"])
        out["start_all"].append(start_all)
    result: dict[str, Any] = {k: stat(v) for k, v in out.items()}
    result["idle_activity"] = idle
    return result


# -- 2: bare runtimes and docker run ------------------------------------------------------


def fig_runtimes(work: Path, reps: int) -> dict[str, Any]:
    bundle = make_bundle(work / "bundle", APP_TREE)
    out: dict[str, Any] = {}
    for runtime in ("crun", "runc"):
        log(f"{runtime} run x{reps}")
        script = (
            f"umount /sys/fs/cgroup/unified 2>/dev/null; exec {sys.executable} "
            f"{BENCH / 'startloop.py'} {runtime} {bundle} {reps}"
        )
        res = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            out[runtime] = {"error": res.stderr.strip()[-300:]}
            continue
        data = json.loads(res.stdout)
        out[runtime] = {"true": stat(data["true"]), "stamp": stat(data["stamp"])}
    shutil.rmtree(bundle, ignore_errors=True)
    return out


def fig_docker_run(docker: DockerEngine, work: Path, reps: int) -> dict[str, Any]:
    vol = work / "docker-vol"
    vol.mkdir(parents=True, exist_ok=True)
    true_s, stamp_s = [], []
    for i in range(reps + 1):
        log(f"docker run --rm {i}/{reps}")
        t0 = time.perf_counter()
        docker.docker("run", "--rm", "--network", "none", "pvbench/app", "/bin/true")
        wall = time.perf_counter() - t0
        (vol / "stamp").unlink(missing_ok=True)
        w0 = time.time()
        docker.docker(
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{vol}:/data",
            "pvbench/app",
            "/bin/sh",
            "-c",
            "adjtimex > /data/stamp",
        )
        stamp = read_stamp(vol / "stamp")
        if i and stamp:
            true_s.append(wall)
            stamp_s.append(stamp - w0)
    return {"true": stat(true_s), "stamp": stat(stamp_s)}


# -- 4: app-only update -------------------------------------------------------------------


def variant_tree(work: Path, n: int) -> Path:
    tree = work / "trees" / f"v{n}"
    if not tree.exists():
        shutil.copytree(APP_TREE, tree, symlinks=True)
        (tree / "etc" / "variant").write_text(f"{n}\n")
    return tree


def fig_update(work: Path, keys: Path, reps: int) -> dict[str, Any]:
    """1 -> 2 -> ... : each update changes app5's image (busybox + a marker file)."""
    revs = []
    for n in range(1, reps + 2):
        containers = six_containers()
        containers["app5"] = {
            **probe_app(),
            "rootfs": {"dir": str(variant_tree(work, n)), "all_root": True},
        }
        revs.append(build_revision(work, keys, n, containers))
    storage = work / "dev"
    provision(revs[0], storage, keys)
    objects = storage / "objects"
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "downtime",
            "downtime_observed",
            "unchanged_restarts",
            "bytes_stored",
            "bytes_changed",
            "bytes_revision",
            "update_wall",
        )
    }
    with device(
        storage, work / "update.log", "--commit-delay", "1", "--commit-timeout", "20"
    ) as dev:
        before = {c["name"]: c["pid"] for c in dev.wait_goals(60)["containers"]}
        for k, rev in enumerate(revs[1:], start=2):
            log(f"app-only update to revision {k}")
            old_objs = set(_objects(revs[k - 2]))
            new_objs = _objects(rev)
            names_before = set(_objects_in(objects))
            mark = time.time()
            t0 = time.perf_counter()
            res = pvpy("device", "update", rev, "--storage", storage, check=False, timeout=120)
            wall = time.perf_counter() - t0
            status = dev.wait_goals(60)
            if "UPDATED" not in res.stdout:
                log(f"update {k} did not report UPDATED: {res.stdout} {res.stderr}")
                continue
            now = {c["name"]: c["pid"] for c in status["containers"]}
            stopping = dev.first_event(container_event("app5", "STOPPING"), after=mark)
            started = dev.first_event(container_event("app5", "STARTED"), after=mark)
            stamp = read_stamp(storage / "disks/permanent/app5/volumes/data/stamp")
            if stopping and stamp and started:
                out["downtime"].append(stamp - stopping)
                out["downtime_observed"].append(started - stopping)
            out["unchanged_restarts"].append(
                sum(1 for n, p in now.items() if n != "app5" and before.get(n) != p)
            )
            # objects that appeared (stage copies only missing ones; the commit's GC may
            # have removed the old revision's, so the directory's size delta would lie)
            added = _objects_in(objects)
            out["bytes_stored"].append(sum(v for k, v in added.items() if k not in names_before))
            out["bytes_changed"].append(sum(new_objs[s] for s in set(new_objs) - old_objs))
            out["bytes_revision"].append(sum(new_objs.values()))
            out["update_wall"].append(wall)
            before = now
    return {k: stat(v) for k, v in out.items()}


def _objects(rev: Path) -> dict[str, int]:
    return _objects_in(rev / "objects")


def _objects_in(objects: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in objects.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- 5: scale -----------------------------------------------------------------------------


def fig_scale(work: Path, keys: Path, sizes: list[int], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    out["failures"] = failures
    for n in sizes:
        containers: dict[str, Any] = {"hostos": hostos()}
        containers.update({f"a{i:03d}": app(IDLE) for i in range(n)})
        sub = work / f"n{n}"
        sub.mkdir(exist_ok=True)
        rev = build_revision(sub, keys, 1, containers)
        storage = sub / "dev"
        provision(rev, storage, keys)
        vals: dict[str, list[float]] = {
            k: []
            for k in (
                "boot_total",
                "boot_containers",
                "pid1_pss",
                "pid1_rss",
                "monitors_pss",
                "per_container_start",
                "missed",
            )
        }
        for i in range(reps):
            log(f"pvpy scale: {n} apps, boot {i + 1}/{reps}")
            with device(storage, sub / f"boot{i}.log") as dev:
                # the app group's timeout is 30 s: past that a missed goal is final
                deadline = time.monotonic() + 60 + n
                status: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    status = dev.try_status() or {}
                    if status.get("all_goals_met") or status.get("goals_missed"):
                        break
                    time.sleep(0.1)
                time.sleep(SETTLE)
                mem = smaps(dev.pid1())
                mons = smaps_sum(dev.crun_monitors())
                t = goal_times(dev)
            missed = list(status.get("goals_missed", []))
            if missed:  # record why, e.g. the container's own last words
                logs = storage / "logs"
                why = {
                    m: (logs / f"{m}.log").read_text(errors="replace").strip()[-200:]
                    for m in missed[:3]
                    if (logs / f"{m}.log").exists()
                }
                failures.append({"n": n, "boot": i, "missed": missed, "logs": why})
            if t["ready"] and t["booting"] and not missed:
                vals["boot_total"].append(t["ready"] - t["launch"])  # type: ignore[operator]
                vals["boot_containers"].append(t["ready"] - t["booting"])
                vals["per_container_start"].append((t["ready"] - t["booting"]) / (n + 1))
            vals["pid1_pss"].append(mem["pss"])
            vals["pid1_rss"].append(mem["rss"])
            vals["monitors_pss"].append(mons["pss"])
            vals["missed"].append(len(missed))
        out[str(n)] = {k: stat(v) for k, v in vals.items()}
        shutil.rmtree(sub, ignore_errors=True)
    return out


def fig_docker_scale(docker: DockerEngine, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        log(f"docker scale: {n} apps (+ host OS)")
        total = docker_run_host_os_and_apps(docker, [f"a{i:03d}" for i in range(n)])
        time.sleep(SETTLE)
        pids = docker.pids()
        engine = smaps_sum(pids["dockerd"] + pids["containerd"])
        shims = smaps_sum(pids["containerd-shim"])
        docker.remove_all()
        out[str(n)] = {
            "start_total": total,
            "per_container_start": total / (n + 1),
            "engine_pss": engine["pss"],
            "engine_rss": engine["rss"],
            "shims_pss": shims["pss"],
            "shims_count": shims["count"],
        }
    return out


# -- 6: store size ------------------------------------------------------------------------


def fig_store(work: Path, keys: Path, counts: list[int]) -> dict[str, Any]:
    """N revisions of one base (host OS + 5 apps), each changing app5's image."""
    import yaml

    from pvpy.device import update as up
    from pvpy.log import configure
    from pvpy.signing import load_signing_key, sign_state
    from pvpy.store import SIGNATURE_FILE, STATE_FILE
    from pvpy.trust import load_trust
    from pvpy.workstation.pack import squash_dir
    from pvpy.workstation.spec import build

    images = work / "images"
    images.mkdir()
    squash_dir(HOSTOS_TREE, images / "hostos.squashfs", all_root=True)
    squash_dir(APP_TREE, images / "app.squashfs", all_root=True)
    configure(level="warning", lean=True)  # stage() logs every step at info
    key = load_signing_key(keys)
    out: dict[str, Any] = {}
    for n in counts:
        log(f"store: {n} revisions")
        sub = work / f"store{n}"
        storage = sub / "storage"
        rev_dir = sub / "rev"
        unique: dict[str, int] = {}
        revision_bytes = []
        t0 = time.perf_counter()
        for r in range(1, n + 1):
            tree = variant_tree(sub, r)
            containers: dict[str, Any] = {
                "hostos": {
                    "role": "host-os",
                    "rootfs": str(images / "hostos.squashfs"),
                    "args": ["/sbin/init"],
                },
                **{
                    f"app{i}": {
                        "rootfs": str(images / "app.squashfs"),
                        "args": ["/bin/sh", "-c", IDLE],
                    }
                    for i in range(1, 5)
                },
                "app5": {
                    "rootfs": {"dir": str(tree), "all_root": True},
                    "args": ["/bin/sh", "-c", IDLE],
                },
            }
            spec = sub / "spec.yaml"
            spec.write_text(yaml.safe_dump({"revision": r, "containers": containers}))
            build(spec, rev_dir)
            data = (rev_dir / STATE_FILE).read_bytes()
            (rev_dir / SIGNATURE_FILE).write_bytes(sign_state(data, [key]))
            if r == 1:
                provision(rev_dir, storage, keys)
            else:
                up.stage(storage, rev_dir, load_trust(storage))
            objs = _objects(rev_dir)
            unique.update(objs)
            revision_bytes.append(
                sum(objs.values()) + len(data) + (rev_dir / SIGNATURE_FILE).stat().st_size
            )
            shutil.rmtree(tree)
        elapsed = time.perf_counter() - t0
        trails = storage / "trails"
        meta = sum(p.stat().st_size for p in trails.rglob("*") if p.is_file())
        du = subprocess.run(
            ["du", "-sB1", str(storage / "objects"), str(trails)], capture_output=True, text=True
        ).stdout.split()
        out[str(n)] = {
            "revisions": n,
            "store_objects_bytes": _dir_bytes(storage / "objects"),
            "store_trails_bytes": meta,
            "store_disk_bytes": int(du[0]) + int(du[2]) if len(du) >= 4 else None,
            "unique_object_bytes": sum(unique.values()),
            "full_copies_bytes": sum(revision_bytes),
            "build_and_stage_seconds": elapsed,
        }
        shutil.rmtree(sub, ignore_errors=True)
    return out


# -- 7: profile of PID 1's imports ------------------------------------------------------


def fig_profile(reps: int) -> dict[str, Any]:
    """-X importtime of PID 1's modules (median of reps), tracemalloc of the same import."""
    per_module: dict[str, list[tuple[int, int]]] = {}
    totals = []
    for _ in range(reps):
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {PID1_IMPORTS}"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        total = 0
        for line in res.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if m:
                per_module.setdefault(m.group(4), []).append((int(m.group(1)), int(m.group(2))))
                if len(m.group(3)) == 1:  # top level
                    total += int(m.group(2))
        totals.append(total / 1e6)
    rows: list[dict[str, Any]] = []
    for name, samples in per_module.items():
        selfs = sorted(s for s, _ in samples)
        cums = sorted(c for _, c in samples)
        rows.append(
            {
                "module": name,
                "self_ms": selfs[len(selfs) // 2] / 1000,
                "cumulative_ms": cums[len(cums) // 2] / 1000,
            }
        )
    rows.sort(key=lambda r: -r["cumulative_ms"])
    script = (
        "import sys, tracemalloc\n"
        "before = set(sys.modules)\n"
        "tracemalloc.start()\n"
        f"import {PID1_IMPORTS}\n"
        "snap = tracemalloc.take_snapshot()\n"
        "import json\n"
        "stats = snap.statistics('filename')\n"
        "top = [{'file': s.traceback[0].filename, 'kib': s.size / 1024} for s in stats[:15]]\n"
        "new = sorted(set(sys.modules) - before)\n"
        "print(json.dumps({'total_kib': sum(s.size for s in stats) / 1024, 'top': top,\n"
        "                  'modules': new}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    traced = json.loads(res.stdout)
    return {"import_total_s": stat(totals), "modules": rows[:25], "tracemalloc": traced}


MODULES = (
    "dataclasses",
    "inspect",
    "typing",
    "argparse",
    "importlib.resources",
    "ctypes",
    "pathlib",
    "subprocess",
    "json",
    "selectors",
    "socket",
    "shutil",
    "enum",
    "pvpy.state.model",
    "pvpy.device.pid1",
)


def fig_module_pss(reps: int) -> dict[str, Any]:
    """USS an idle interpreter gains by importing one module (vs bare), median of reps.

    USS (private pages), not PSS: PSS moves with every other python process that
    comes and goes on the machine; a module's own objects are private anyway.
    """

    def uss(code: str) -> float:
        vals = []
        for _ in range(reps):
            proc = subprocess.Popen([sys.executable, "-c", f"{code}; signal.pause()"], cwd=REPO)
            time.sleep(1.0)
            vals.append(smaps(proc.pid)["uss"])
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        return sorted(vals)[len(vals) // 2]

    bare = uss("import signal")
    return {"bare_uss": bare, "modules": {m: uss(f"import signal, {m}") - bare for m in MODULES}}


# Squashfs trees: the app image every figure uses, and a bigger, many-file one when the
# machine has it (Debian's Python standard library: ~50 MB, ~1,000 .py and .pyc files).
SQUASH_TREES = {"app": APP_TREE, "python3.11 stdlib": Path("/usr/lib/python3.11")}
COMPRESSIONS = ("gzip", "zstd", "lz4", "xz", "lzo")
# Read every regular file of a tree once (what a cold container start pays, in full).
READ_ALL = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "for root, _, files in os.walk(sys.argv[1]):\n"
    "    for f in files:\n"
    "        p = os.path.join(root, f)\n"
    "        if os.path.isfile(p) and not os.path.islink(p):\n"
    "            with open(p, 'rb') as fh:\n"
    "                fh.read()\n"
    "print(time.perf_counter() - t)\n"
)
FIRST_EXEC = (
    "import subprocess, sys, time; t = time.perf_counter(); "
    "subprocess.run(['chroot', sys.argv[1], '/bin/true']); "
    "print(time.perf_counter() - t)"
)


def fig_squashfs(work: Path, reps: int) -> dict[str, Any]:
    """Per squashfs compression: image size, build time, and from a freshly loop-mounted
    image the first exec of busybox and a read of every file (decompression, cold)."""
    mnt = work / "mnt"
    mnt.mkdir()

    def cold(image: Path, code: str) -> float | None:
        res = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -o loop,ro "$1" "$2" && exec "$3" -c "$4" "$2"', "-",
             str(image), str(mnt), sys.executable, code],
            capture_output=True, text=True)  # fmt: skip
        return float(res.stdout.strip()) if res.returncode == 0 else None

    out: dict[str, Any] = {}
    for tree_name, tree in SQUASH_TREES.items():
        if not tree.is_dir():
            out[tree_name] = {"error": f"{tree} not on this machine"}
            continue
        per: dict[str, Any] = {}
        for comp in COMPRESSIONS:
            image = work / f"{comp}.squashfs"
            builds = []
            for _ in range(3):
                t0 = time.perf_counter()
                made = subprocess.run(
                    ["mksquashfs", str(tree), str(image), "-comp", comp, "-noappend", "-quiet",
                     "-no-progress", "-all-root", "-mkfs-time", "0", "-all-time", "0"],
                    capture_output=True)  # fmt: skip
                builds.append(time.perf_counter() - t0)
                if made.returncode != 0:
                    break
            if made.returncode != 0:
                per[comp] = {"error": made.stderr.decode(errors="replace")[-200:]}
                continue
            entry: dict[str, Any] = {"bytes": image.stat().st_size, "build": stat(builds)}
            if (tree / "bin" / "true").exists():
                entry["first_exec"] = stat(
                    [t for _ in range(reps) if (t := cold(image, FIRST_EXEC)) is not None]
                )
            entry["read_all"] = stat(
                [t for _ in range(reps) if (t := cold(image, READ_ALL)) is not None]
            )
            per[comp] = entry
            image.unlink()
        out[tree_name] = {"tree_bytes": _file_bytes(tree), "images": per}
    dir_times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(["chroot", str(APP_TREE), "/bin/true"])
        dir_times.append(time.perf_counter() - t0)
    out["app directory (page cache)"] = {"first_exec": stat(dir_times)}
    return out


def _file_bytes(tree: Path) -> int:
    """Bytes of the regular files under ``tree``: no symlink followed, hard links once."""
    seen: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(tree):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_mode & 0o170000 == 0o100000:
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def fig_pid1_modules(work: Path, keys: Path) -> dict[str, Any]:
    """The modules the running PID 1 imported, from one boot under PYTHONPROFILEIMPORTTIME.

    Not a memory boot (importtime's own bookkeeping): only the names, the count and
    PID 1's import time. Its section of the log is the one that imports pvpy.device.supervisor.
    """
    rev = build_revision(work, keys, 1, six_containers())
    storage = work / "dev"
    provision(rev, storage, keys)
    log_path = work / "importtime.log"
    with device(storage, log_path, env={"PYTHONPROFILEIMPORTTIME": "1"}) as dev:
        dev.wait_goals(60)
    header = "import time: self [us] | cumulative | imported package"
    for section in log_path.read_text(errors="replace").split(header):
        rows = re.findall(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", section)
        names = [name for _, _, _, name in rows]
        if "pvpy.device.pid1" in names and "pvpy.device.supervisor" in names:
            top = sum(int(cum) for _, cum, indent, _ in rows if len(indent) == 1)
            found = sorted({n for n in names if n in sys.modules or _importable(n)})
            return {"modules": found, "count": len(found), "import_s": top / 1e6}
    return {"error": "no PID 1 section in the importtime output"}


def _importable(name: str) -> bool:
    """importtime also lists the imports that failed (nt, _winapi, ... on Linux)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fig_pyspy(work: Path, keys: Path) -> dict[str, Any]:
    """py-spy dump of an idle PID 1 (where does it sit?)."""
    spy = BENCH / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        return {"error": "py-spy not installed"}
    rev = build_revision(work, keys, 1, six_containers())
    storage = work / "dev"
    provision(rev, storage, keys)
    with device(storage, work / "spy.log") as dev:
        dev.wait_goals(60)
        time.sleep(SETTLE)
        res = subprocess.run(
            [str(spy), "dump", "--pid", str(dev.pid1())], capture_output=True, text=True, timeout=60
        )
    return {"dump": (res.stdout or res.stderr).strip()}


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per figure")
    parser.add_argument("--scale-reps", type=int, default=3)
    parser.add_argument("--scale", default="1,10,50,100", help="container counts")
    parser.add_argument("--store", default="1,10,100", help="revision counts")
    parser.add_argument("--only", default="", help="comma list of figures to run")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, mounts, crun, dockerd)", file=sys.stderr)
        return 2
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    subprocess.run([REPO / "examples/demo/make-rootfs"], check=True)
    work = Path(tempfile.mkdtemp(prefix="pvbench-", dir="/tmp"))
    keys = work / "keys"
    pvpy("key", "gen", "--out", keys)
    docker = DockerEngine(work / "docker")
    results: dict[str, Any] = {"reps": args.reps, "scale_reps": args.scale_reps}
    earlier: dict[str, Any] = {}  # a partial run (--only) adds to the last full run's results
    if Path(args.out).exists() and only:
        earlier = json.loads(Path(args.out).read_text())
        results = {**earlier, **results}
    results["load_before"] = os.getloadavg()
    t_start = time.monotonic()

    ran: list[str] = []

    def section(name: str, fn: Any, *fargs: Any) -> None:
        ran.append(name)
        sub = work / name
        sub.mkdir(parents=True, exist_ok=True)
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            results[name] = fn(sub, *fargs)
        except Exception as e:  # a figure that fails is reported, not invented
            log(f"{name} failed: {type(e).__name__}: {e}")
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        results.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    try:
        if want("memory") or want("boot") or want("start"):
            section("pvpy_boot6", fig_pvpy_boot6, keys, args.reps)
            section("python", lambda _w, r: fig_bare_python(r), args.reps)
        if want("start"):
            section("runtimes", fig_runtimes, args.reps)
        if want("update"):
            section("update", fig_update, keys, args.reps)
        if want("scale"):
            sizes = [int(s) for s in args.scale.split(",")]
            section("scale", fig_scale, keys, sizes, args.scale_reps)
        if want("store"):
            section("store", fig_store, keys, [int(s) for s in args.store.split(",")])
        if want("profile"):
            section("profile", lambda _w, r: fig_profile(r), args.reps)
            section("module_pss", lambda _w, r: fig_module_pss(r), args.reps)
            section("squashfs", fig_squashfs, args.reps)
            section("pid1_modules", fig_pid1_modules, keys)
            section("pyspy", fig_pyspy, keys)
        if want("qemu"):
            from qemuboot import fig_qemu_boot  # bench/ is sys.path[0]

            section("qemu_boot", fig_qemu_boot, min(args.reps, 3))  # ~25 s a boot under TCG
        needs_docker = want("memory") or want("start") or want("scale")
        if needs_docker and not args.no_docker:
            log("== docker: starting a private dockerd")
            if docker.start():
                docker.image("pvbench/hostos", HOSTOS_TREE)
                docker.image("pvbench/app", APP_TREE)
                results["docker_info"] = {
                    "engine": "Debian docker.io (dockerd + its own "
                    "containerd), private data root under /tmp",
                    "storage_driver": docker.docker("info", "-f", "{{.Driver}}").stdout.strip(),
                }
                if want("memory") or want("start"):
                    section("docker_boot6", lambda w, r: fig_docker_boot6(docker, w, r), args.reps)
                if want("start"):
                    section("docker_run", lambda w, r: fig_docker_run(docker, w, r), args.reps)
                if want("scale"):
                    sizes = [int(s) for s in args.scale.split(",")]
                    section("docker_scale", lambda _w, s: fig_docker_scale(docker, s), sizes)
            else:
                results["docker_error"] = docker.error
                log(f"docker unavailable: {docker.error}")
        elif args.no_docker:
            results["docker_error"] = "skipped (--no-docker)"
    finally:
        docker.stop()
        results["machine"] = machine_info(docker.cli)
        results["load_after"] = os.getloadavg()
        results["total_seconds"] = round(time.monotonic() - t_start, 1)
        if earlier:  # the header keeps describing the full run; this one is noted apart
            partial = {k: results[k] for k in ("reps", "machine", "load_before", "load_after",
                                                "total_seconds")}  # fmt: skip
            for key in ("reps", "scale_reps", "machine", "load_before", "load_after",
                        "total_seconds"):  # fmt: skip
                if key in earlier:
                    results[key] = earlier[key]
            for name in ran:
                results.setdefault("separate_runs", {})[name] = partial
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    log(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
