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

from pvpy.errors import UsageError

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
    return run(Path(args.storage), init_args, max_boots=args.max_boots, max_tries=args.max_tries)


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
    from pvpy.oci import Reference, Registry, load_auth
    from pvpy.paths import sandbox_run_dir
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


def follow_update(storage: Path, revision: int, timeout: float) -> int:
    """Print an update's progress until it ends; exit 0 for UPDATED/DONE, 3 for a
    refused or failed one, 1 when it is still going after ``timeout`` seconds."""
    import time

    from pvpy.device import update as up

    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        p = up.read_progress(storage, revision)
        if p is not None and (p.status, p.reason, p.percent) != seen:
            seen = (p.status, p.reason, p.percent)
            pct = f" {p.percent}%" if p.percent is not None else ""
            print(f"revision {revision}: {p.status}{pct} {p.reason}".rstrip(), flush=True)
            if p.status in up.FINAL:
                return 0 if p.status in (up.UPDATED, up.DONE) else 3
        time.sleep(0.2)
    print(f"revision {revision}: still {seen[0] if seen else 'unknown'} after {timeout:g}s")
    return 1


def device_status(args: argparse.Namespace) -> int:
    """A sandbox's status over its control socket (a URL: pvpy.workstation.commands)."""
    from pvpy._text import show_status

    show_status(control_request(Path(args.storage), {"cmd": "status"}), args.json)
    return 0


def device_update(args: argparse.Namespace) -> int:
    from pvpy.device import update as up
    from pvpy.store import Storage
    from pvpy.trust import load_trust

    storage = Path(args.storage)
    control_request(storage, {"cmd": "status"})  # the device must be up to apply it
    state = up.stage(storage, Path(args.state), load_trust(storage))
    print(f"revision {state.revision}: staged")
    up.hand_to_pid1(Storage(storage), state.revision,
                    lambda msg, t: control_request(storage, msg, t))  # fmt: skip
    print(f"revision {state.revision}: handed to PID 1 (it verifies, then applies)")
    if args.no_wait:
        return 0
    return follow_update(storage, state.revision, args.timeout)


def device_rollback(args: argparse.Namespace) -> int:
    storage = Path(args.storage)
    reply = control_request(storage, {"cmd": "rollback"})
    print(f"rolling back to revision {reply['revision']}")
    if args.no_wait:
        return 0
    return follow_update(storage, int(reply["revision"]), args.timeout)


def device_command(args: argparse.Namespace) -> int:
    """reboot, poweroff, halt; restart and stop a container."""
    request: dict[str, object] = {"cmd": args.verb}
    if getattr(args, "container", None):  # only restart and stop take one
        request["container"] = args.container
    control_request(Path(args.storage), request)
    print(f"{args.verb}: requested")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": device_run,
    "api": device_api,
    "pull": device_pull,
    "verify-installed": device_verify_installed,
    "write-boot": device_write_boot,
    "status": device_status,
    "update": device_update,
    "rollback": device_rollback,
    "reboot": device_command,
    "poweroff": device_command,
    "halt": device_command,
    "restart": device_command,
    "stop": device_command,
}
