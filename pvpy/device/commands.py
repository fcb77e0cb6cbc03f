"""The device's verbs of the ``pvpy`` command line: what runs device code.

The sandbox launcher (``device run``), the processes PID 1 starts (``device api``,
``device pull``, and ``device verify-installed`` and ``device write-boot`` at boot), and
the verbs that talk to a local device's PID 1 over its control socket (``device update
--storage``, ``rollback``, ``status --storage``, ``reboot``, ``restart``, …).

``pvpy.cli`` parses the command line and calls ``HANDLERS[verb]``. Imports sit inside
the handlers: PID 1 runs verify-installed at every boot, in a child process whose
imports are its start-up time. Workstation code is never imported here
(tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvpy._text import Report
from pvpy.errors import PvpyError, UsageError

__all__ = ["HANDLERS", "control_request", "follow_update"]


def _say(line: str) -> None:
    print(line, flush=True)


# --- processes PID 1 starts, and the sandbox that starts PID 1 ----------------


def device_run(args: argparse.Namespace) -> int:
    from pvpy.device.sandbox import run

    init_args = [
        "--runtime", args.runtime,
        "--commit-delay", str(args.commit_delay),
        "--commit-timeout", str(args.commit_timeout),
    ]  # fmt: skip
    if args.api or args.api_tcp:
        init_args.append("--api")
    if args.api_tcp:
        init_args += ["--api-tcp", args.api_tcp]
        if args.api_plain_http:
            init_args.append("--api-plain-http")
    if args.pull:
        init_args += ["--pull", args.pull, "--pull-interval", str(args.pull_interval)]
        if args.pull_plain_http:
            init_args.append("--pull-plain-http")
    if args.watchdog:
        init_args += ["--watchdog", args.watchdog,
                      "--watchdog-interval", str(args.watchdog_interval)]  # fmt: skip
    return run(Path(args.storage), init_args, max_boots=args.max_boots, max_tries=args.max_tries,
               on_first_boot=lambda revision: _banner(args, revision))  # fmt: skip


def _banner(args: argparse.Namespace, revision: int) -> None:
    """What `device run` says once, on stdout, as the device starts."""
    from pvpy import paths

    storage = Path(args.storage)
    run_dir = paths.sandbox_run_dir(storage.resolve())
    lines = [f"pvpy sandbox device: storage {storage}, booting revision {revision}",
             f"  control  {paths.control_socket(run_dir)}  (pvpy device status --storage "
             f"{storage})"]  # fmt: skip
    if args.api or args.api_tcp:
        lines.append(f"  api      unix:{paths.api_socket(run_dir)}  (root, no token)")
    if args.api_tcp:
        scheme = "http" if args.api_plain_http else "https"
        lines.append(f"  api      {scheme}://{args.api_tcp}  (--token-file "
                     f"{storage / paths.API_TOKEN})")  # fmt: skip
    if args.pull:
        lines.append(f"  pulls    {args.pull} every {args.pull_interval:g} s")
    lines.append(f"  logs     {storage / paths.LOGS}/ (pvpy device logs --storage {storage} -f)")
    lines.append(f"  stop     Ctrl-C here, or pvpy device poweroff --storage {storage} "
                 "(powers off in order)")  # fmt: skip
    print("\n".join(lines), flush=True)


def device_api(args: argparse.Namespace) -> int:
    """PID 1 starts this (pvpy.device.pid1); it serves until SIGTERM."""
    from pvpy.device.api import Limits, serve

    limits = Limits(
        max_connections=args.max_connections,
        max_object=args.max_object,
        head_timeout=args.head_timeout,
        client_timeout=args.client_timeout,
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = (Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    serve(
        Path(args.storage),
        Path(args.run_dir),
        tcp=args.tcp,
        token_file=Path(args.token_file) if args.token_file else None,
        limits=limits,
        tls=tls,
        plain_http=args.plain_http,
    )
    return 0


def device_pull(args: argparse.Namespace) -> int:
    """Poll a registry tag; install and apply what is new (never in PID 1)."""
    from pvpy import paths
    from pvpy.device.puller import Puller, run
    from pvpy.log import configure
    from pvpy.oci import Reference, load_auth
    from pvpy.paths import sandbox_run_dir
    from pvpy.registry import Registry
    from pvpy.store import Storage

    if not args.verbose and "PVPY_LOG_LEVEL" not in os.environ:
        configure(level="info")  # a device process: its log says what it did
    if args.interval <= 0:
        raise UsageError("--interval must be > 0")
    ref = Reference.parse(args.source)
    storage = Storage(Path(args.storage))
    auth_file = args.auth_file
    if auth_file is None and (storage.root / paths.REGISTRY_AUTH).is_file():
        auth_file = str(storage.root / paths.REGISTRY_AUTH)
    auth = load_auth(Path(auth_file)) if auth_file else None
    registry = Registry(ref.registry, plain_http=args.plain_http, cacert=args.cacert, auth=auth)
    run_dir = Path(args.run_dir) if args.run_dir else sandbox_run_dir(storage.root)
    puller = Puller(storage, run_dir, registry, ref, retry_failed=args.retry_failed)
    return run(puller, args.interval, args.once, say=_say)


def device_verify_installed(args: argparse.Namespace) -> int:
    """Used by PID 1 at boot and before applying an update, in a child process: the
    crypto never lives in PID 1.

    An installed revision is checked against the keys that were current when it
    was installed (``pvpy.trustroot``: one installed before a key rotation stays
    bootable, a rollback target; one at or after it needs the new keys), without
    expiry (an installed revision must stay bootable whatever the clock says),
    fleet binding or anti-rollback (all checked when it was installed).
    """
    from pvpy.store import Storage
    from pvpy.trust import verify_revision
    from pvpy.trustroot import load_trust_root

    storage = Storage(Path(args.storage))
    trust = load_trust_root(storage.root).keys_for_installed(args.revision)
    state, signature = storage.read_trail(args.revision)
    verify_revision(state, signature, trust, objects=storage.objects, check_expiry=False)
    return 0


def device_write_boot(args: argparse.Namespace) -> int:
    """Used by PID 1 on a Raspberry Pi before a try-boot, in a child process: the
    revision's boot files into the try boot partition (pvpy.rpiboot)."""
    from pvpy import rpiboot
    from pvpy.device import board
    from pvpy.device.board.rpi import RPI_BOOT_DIR, write_boot_partition
    from pvpy.state import canonical
    from pvpy.store import Storage

    storage = Storage(Path(args.storage))
    config = board.load(Path(args.board))
    state_bytes, _ = storage.read_trail(args.revision)
    rpi = config.rpi
    files = rpiboot.boot_files(
        canonical.decode(state_bytes), storage.objects.root, rpi.get("config_txt", ()),
        str(rpi.get("console", "")), rpi.get("dtb"),
    )  # fmt: skip
    write_boot_partition(args.target, files, Path(RPI_BOOT_DIR))
    return 0


# --- a local device over PID 1's control socket --------------------------------


def control_request(
    storage: Path, request: dict[str, object], timeout: float = 10
) -> dict[str, Any]:
    """One request to a running sandbox's PID 1; raises DeviceError unless ok."""
    from pvpy import control
    from pvpy.paths import control_socket, sandbox_run_dir

    return control.call(control_socket(sandbox_run_dir(storage)), dict(request), timeout)


def follow_update(storage: Path, revision: int, timeout: float, say: Report) -> int:
    """Print an update's progress until it ends; exit 0 for UPDATED/DONE, 3 for a
    refused or failed one, 1 when it is still going after ``timeout`` seconds."""
    import time

    from pvpy._text import TestingTicker
    from pvpy.device import update as up

    deadline = time.monotonic() + timeout
    seen = None
    ticker = TestingTicker(say)
    while time.monotonic() < deadline:
        p = up.read_progress(storage, revision)
        if p is not None and (p.status, p.reason, p.percent) != seen:
            seen = (p.status, p.reason, p.percent)
            pct = f" {p.percent}%" if p.percent is not None else ""
            say(f"revision {revision}: {p.status}{pct} {p.reason}".rstrip(), **p.to_dict())
            if p.status in up.FINAL:
                return 0 if p.status in (up.UPDATED, up.DONE) else 3
        if p is not None:
            ticker.record(p.to_dict())
        time.sleep(0.2)
    state = seen[0] if seen else "unknown"
    say(f"revision {revision}: still {state} after {timeout:g}s", revision=revision,
        status=state, timed_out=True)  # fmt: skip
    return 1


def offline_status(storage: Path) -> dict[str, Any]:
    """What a stopped sandbox has installed, read from its storage (no PID 1)."""
    from pvpy import paths
    from pvpy.bootvars import BootVars
    from pvpy.device import update as up
    from pvpy.device.bootenv.file import FileBootEnv
    from pvpy.store import Storage

    installed = Storage(storage).revisions()
    env = BootVars.parse(FileBootEnv(storage / paths.BOOTENV).read())
    records = up.all_progress(storage)
    return {
        "ok": True, "offline": True, "storage": str(storage), "installed": installed,
        "revision": None, "committed": env.rev, "try": env.try_rev,
        "next_boot": env.try_rev if env.try_rev is not None else env.rev,
        "containers": [], "all_goals_met": False,
        "updates": [p.to_dict() for p in records[-10:]], "updates_total": len(records),
    }  # fmt: skip


def _status_or_offline(storage: Path) -> dict[str, Any]:
    from pvpy.errors import DeviceError
    from pvpy.store import Storage

    try:
        return control_request(storage, {"cmd": "status"})
    except DeviceError:
        if not Storage(storage).revisions():
            raise  # not a device's storage: nothing to show offline either
        return offline_status(storage)


def device_status(args: argparse.Namespace) -> int:
    """A sandbox's status over its control socket, or what it has installed when it is
    off (a URL: pvpy.workstation.commands)."""
    from pvpy._text import show_status

    show_status(_status_or_offline(Path(args.storage)), args.json, args.no_trunc)
    return 0


def history_records(storage: Path) -> list[dict[str, Any]]:
    """Every update record, and the installed revisions no update recorded (the
    factory one), each saying whether its trail is installed."""
    from pvpy.device import update as up
    from pvpy.store import Storage

    installed = set(Storage(storage).revisions())
    records = [{**p.to_dict(), "installed": p.revision in installed}
               for p in up.all_progress(storage)]  # fmt: skip
    known = {r["revision"] for r in records}
    factory = [{"revision": r, "status": None, "reason": "", "percent": None, "kind": None,
                "time": None, "installed": True} for r in sorted(installed - known)]  # fmt: skip
    return factory + records


def device_history(args: argparse.Namespace) -> int:
    import json

    from pvpy._text import history_rows, print_history

    records = history_records(Path(args.storage))
    if args.json:
        for row in history_rows(records):
            print(json.dumps(row))
    else:
        print_history(records, args.no_trunc)
    return 0


def device_logs(args: argparse.Namespace) -> int:
    """A sandbox's container logs, read from its storage (running or not)."""
    import sys

    from pvpy import paths
    from pvpy.device.api._logs import LogFiles, LogOptions
    from pvpy.timespec import parse_when

    options = LogOptions(timestamps=args.timestamps, as_json=args.json,
                         since=parse_when(args.since, "--since"),
                         until=parse_when(args.until, "--until"))  # fmt: skip
    logs_dir = Path(args.storage) / paths.LOGS
    for name in args.containers:
        if not (logs_dir / f"{name}.log").is_file():
            raise UsageError(f"no log of container {name!r} in {logs_dir}")
    files = LogFiles(logs_dir, None, options, names=args.containers or None)
    out = sys.stdout.buffer
    tail = [files.tail(args.tail)]
    chunks = files.follow(args.tail, lambda: False) if args.follow else iter(tail)
    for chunk in chunks:
        out.write(chunk)
        out.flush()
    return 0


def _up_to_date(storage: Path, status: dict[str, Any], source: Path, say: Report) -> bool:
    """The revision in ``source`` is the one running, byte for byte: nothing to do."""
    from pvpy.paths import STATE_FILE
    from pvpy.state import parse_unverified
    from pvpy.store import Storage

    try:
        state_bytes = (source / STATE_FILE).read_bytes()
        revision = parse_unverified(state_bytes).revision
    except (OSError, PvpyError):
        return False  # staging says what is wrong with it
    stored = Storage(storage)
    if status.get("revision") != revision or not stored.has_revision(revision):
        return False
    if stored.read_trail(revision)[0] != state_bytes:
        return False
    say(f"revision {revision}: up to date (the device runs it)", revision=revision,
        status="UP-TO-DATE")  # fmt: skip
    return True


def device_update(args: argparse.Namespace) -> int:
    from pvpy._text import rollback_advice
    from pvpy.device import update as up
    from pvpy.errors import RollbackError
    from pvpy.store import Storage
    from pvpy.trust import load_trust

    say = Report(args.json)
    storage = Path(args.storage)
    status = control_request(storage, {"cmd": "status"})  # the device must be up to apply it
    if _up_to_date(storage, status, Path(args.state), say):
        return 0
    try:
        state = up.stage(storage, Path(args.state), load_trust(storage))
    except RollbackError as e:
        from pvpy.state import parse_unverified
        from pvpy.trust import read_revision_dir

        revision = parse_unverified(read_revision_dir(Path(args.state))[0]).revision
        highest = up.highest_revision(Storage(storage))
        raise RollbackError(rollback_advice(revision, highest)) from e
    say(f"revision {state.revision}: staged", revision=state.revision, status="STAGED")
    up.hand_to_pid1(Storage(storage), state.revision,
                    lambda msg, t: control_request(storage, msg, t))  # fmt: skip
    say(f"revision {state.revision}: handed to PID 1 (it verifies, then applies)",
        revision=state.revision, status="HANDED")  # fmt: skip
    if args.no_wait:
        return 0
    return follow_update(storage, state.revision, args.timeout, say)


def device_rollback(args: argparse.Namespace) -> int:
    say = Report(args.json)
    storage = Path(args.storage)
    status = control_request(storage, {"cmd": "status"})
    reply = control_request(storage, {"cmd": "rollback"})
    say(f"rolling back from revision {status.get('revision')} to revision {reply['revision']}",
        revision=reply["revision"], rolling_back_from=status.get("revision"),
        status="ROLLBACK")  # fmt: skip
    if args.no_wait:
        return 0
    return follow_update(storage, int(reply["revision"]), args.timeout, say)


def device_command(args: argparse.Namespace) -> int:
    """reboot, poweroff, halt; restart and stop a container."""
    from pvpy._text import await_restart, pid_of

    storage = Path(args.storage)
    request: dict[str, object] = {"cmd": args.verb}
    if getattr(args, "container", None):  # only restart and stop take one
        request["container"] = args.container
    if args.verb != "restart":
        control_request(storage, request)
        print(f"{args.verb}: requested")
        return 0

    def containers() -> list[dict[str, Any]]:
        return list(control_request(storage, {"cmd": "status"})["containers"])

    before = pid_of(args.container, containers())
    control_request(storage, request)
    print(await_restart(args.container, before, containers))
    return 0


def device_gc(args: argparse.Namespace) -> int:
    """GC now (PID 1 does it between updates; refused while one is under way)."""
    reply = control_request(Path(args.storage), {"cmd": "gc"}, timeout=60)
    if args.json:
        Report(True).data({k: v for k, v in reply.items() if k != "ok"})
        return 0
    removed = ", ".join(map(str, reply.get("removed", []))) or "none"
    kept = ", ".join(map(str, reply.get("kept_in_use", []))) or "none"
    print(f"gc: removed revisions {removed}; {reply.get('objects', 0)} objects, "
          f"{reply.get('freed', 0)} bytes freed; kept for running containers: {kept}")  # fmt: skip
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": device_run,
    "api": device_api,
    "pull": device_pull,
    "verify-installed": device_verify_installed,
    "write-boot": device_write_boot,
    "status": device_status,
    "history": device_history,
    "logs": device_logs,
    "update": device_update,
    "push": device_update,
    "rollback": device_rollback,
    "reboot": device_command,
    "poweroff": device_command,
    "halt": device_command,
    "restart": device_command,
    "stop": device_command,
    "gc": device_gc,
}
