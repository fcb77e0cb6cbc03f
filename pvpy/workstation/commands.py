"""The workstation's verbs of the ``pvpy`` command line: keys, revisions, devices over
their API, images and QEMU.

``pvpy.cli`` parses the command line and calls ``HANDLERS[(noun, verb)]``; each handler
prints its result and returns the exit code, and raises a PvpyError for the CLI to
print in one line. Imports sit inside the handlers: a command loads only what it runs.
Device code is never imported here (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvpy._text import Report, clip, human_size, print_table, show_status
from pvpy.errors import UsageError

if TYPE_CHECKING:
    from pvpy.registry import Registry
    from pvpy.workstation.remote import Device

__all__ = ["HANDLERS"]


def _say(line: str) -> None:
    print(line, flush=True)


# --- key ---------------------------------------------------------------------


def key_gen(args: argparse.Namespace) -> int:
    from pvpy.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory (the key pair goes into one)")
    try:
        key = generate_key(out)
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror}") from e
    private, public = Path(args.out) / PRIVATE_KEY_FILE, Path(args.out) / PUBLIC_KEY_FILE
    report = Report(args.json)
    if args.json:
        report.data({"keyid": key.keyid, "private": str(private), "public": str(public)})
    else:
        print(f"key id   {key.keyid}")
        print(f"private  {private}  (keep it secret, off the device)")
        print(f"public   {public}  (give it to devices: --trust)")
    report.hint(f"pvpy state build SPEC.yaml --out DIR, then pvpy state sign DIR --key {args.out}")
    return 0


def key_keyset(args: argparse.Namespace) -> int:
    from pvpy.signing import load_public_key, load_signing_key, make_keyset
    from pvpy.store import write_atomic

    publics = [load_public_key(Path(p)) for p in args.key]
    signers = [load_signing_key(Path(p)) for p in args.sign]
    if not 1 <= args.threshold <= len(publics):
        raise UsageError("--threshold must be between 1 and the number of --key")
    if args.version < 1:
        raise UsageError("--version must be >= 1")
    data = make_keyset(publics, args.version, args.threshold, signers)
    write_atomic(Path(args.out), data)
    print(
        f"key set v{args.version}: {len(publics)} key(s), threshold {args.threshold}, "
        f"signed by {len(signers)} -> {args.out}"
    )
    return 0


# --- state -------------------------------------------------------------------


def state_build(args: argparse.Namespace) -> int:
    from pvpy.workstation.spec import build

    result = build(Path(args.spec), Path(args.out), revision=args.revision)
    state = result.state
    total = sum(ref.size for ref in state.objects().values())
    report = Report(args.json)
    report(
        f"built revision {state.revision}: {len(state.containers)} container(s), "
        f"{len(state.objects())} object(s), {human_size(total)} "
        f"({result.objects_added} new) -> {args.out}",
        revision=state.revision, containers=len(state.containers),
        objects=len(state.objects()), bytes=total, new_objects=result.objects_added, out=args.out,
    )  # fmt: skip
    report.hint(f"pvpy state sign {args.out} --key KEY_DIR")
    return 0


def state_sign(args: argparse.Namespace) -> int:
    from pvpy.errors import ManifestError
    from pvpy.paths import KEYSET_FILE, SIGNATURE_FILE, STATE_FILE
    from pvpy.signing import load_signing_key, parse_keyset_unverified, sign_state
    from pvpy.state import canonical, validate
    from pvpy.store import write_atomic

    out = Path(args.dir)
    try:
        data = (out / STATE_FILE).read_bytes()
    except OSError as e:
        raise UsageError(f"{out}: no readable {STATE_FILE} ({e.strerror})") from e
    doc = canonical.decode(data)
    if canonical.encode(doc) != data:
        raise ManifestError("state.json is not in canonical form; rebuild it")
    validate(doc)  # never sign what a device would refuse
    keys = [load_signing_key(Path(k)) for k in args.key]
    write_atomic(out / SIGNATURE_FILE, sign_state(data, keys))
    if args.keyset:
        try:
            ks = Path(args.keyset).read_bytes()
        except OSError as e:
            raise UsageError(f"--keyset {args.keyset}: {e.strerror}") from e
        parse_keyset_unverified(ks)
        write_atomic(out / KEYSET_FILE, ks)
    ids = ", ".join(k.keyid[:16] for k in keys)
    report = Report(args.json)
    report(f"signed revision {doc['revision']} with {ids}", revision=doc["revision"],
           keyids=[k.keyid for k in keys], dir=args.dir)  # fmt: skip
    report.hint(f"pvpy device push DEVICE {args.dir} (or: pvpy device provision --storage DIR "
                f"--state {args.dir} --trust PUB)")  # fmt: skip
    return 0


def state_verify(args: argparse.Namespace) -> int:
    from pvpy.signing import TrustStore
    from pvpy.trust import verify_revision_dir

    trust = TrustStore.from_files(Path(p) for p in args.trust)
    verified = verify_revision_dir(
        Path(args.dir),
        trust,
        current_revision=args.current,
        check_objects=not args.no_objects,
    )
    n = len(verified.state.objects())
    checked = "not checked" if args.no_objects else "verified"
    signers = ", ".join(k[:16] for k in verified.signed_by)
    Report(args.json)(
        f"OK: revision {verified.revision} signed by {signers}; {n} object(s) {checked}",
        ok=True, revision=verified.revision, signed_by=list(verified.signed_by), objects=n,
        objects_checked=not args.no_objects,
    )  # fmt: skip
    return 0


def state_show(args: argparse.Namespace) -> int:
    from pvpy.errors import SignatureError
    from pvpy.paths import STATE_FILE
    from pvpy.signing import parse_envelope_unverified
    from pvpy.state import parse_unverified
    from pvpy.trust import read_revision_dir

    state_bytes = Path(args.dir) / STATE_FILE
    if args.json:
        # The state as stored, after the same parse as without --json (unverified).
        try:
            raw = state_bytes.read_bytes()
        except OSError as e:
            raise UsageError(f"{args.dir}: no readable {STATE_FILE} ({e.strerror})") from e
        parse_unverified(raw)
        sys.stdout.write(raw.decode() + "\n")
        return 0
    try:
        data, sig, _ = read_revision_dir(Path(args.dir))
        signers = [k[:16] for k, _ in parse_envelope_unverified(sig)]
        signed = "by " + ", ".join(signers) + " (unverified: use `pvpy state verify`)"
    except SignatureError:
        data = state_bytes.read_bytes()
        signed = "NO"
    state = parse_unverified(data)
    print(f"revision     {state.revision}")
    if state.description:
        print(f"description  {state.description}")
    print(f"created      {state.created or '-'}")
    print(f"expires      {state.expires or 'never'}")
    print(f"signed       {signed}")
    bsp = state.bsp.to_dict()
    if bsp:
        parts = [f"{k}={v['sha256'][:12]}" for k, v in bsp.items() if isinstance(v, dict)]
        print(f"bsp          {' '.join(parts)}")
    print(f"groups       {' -> '.join(g.name for g in state.groups)}")
    print()
    rows = [
        [
            c.name,
            c.role,
            c.group,
            c.status_goal,
            c.restart.policy,
            c.rootfs.sha256[:12],
            human_size(c.rootfs.size),
            clip(" ".join(c.args), 40, args.no_trunc),
        ]
        for c in state.start_order()
    ]
    print_table(["NAME", "ROLE", "GROUP", "GOAL", "RESTART", "ROOTFS", "SIZE", "ARGS"], rows)
    return 0


def _registry(args: argparse.Namespace, host: str) -> Registry:
    from pvpy.oci import load_auth
    from pvpy.registry import Registry

    auth = load_auth(Path(args.auth_file)) if args.auth_file else None
    return Registry(host, plain_http=args.plain_http, cacert=args.cacert, auth=auth)


def state_publish(args: argparse.Namespace) -> int:
    import dataclasses

    from pvpy.oci import Reference
    from pvpy.workstation.publish import publish

    ref = Reference.parse(args.ref)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else _say
    result = publish(_registry(args, ref.registry), ref, Path(args.dir), say=say)
    if args.json:
        Report(True).data(dataclasses.asdict(result) | {"ref": args.ref})
    return 0


# --- device ------------------------------------------------------------------


def device_provision(args: argparse.Namespace) -> int:
    from pvpy.paths import API_TOKEN
    from pvpy.provision import provision

    rev = provision(Path(args.storage), Path(args.state), [Path(p) for p in args.trust])
    report = Report(args.json)
    token = Path(args.storage) / API_TOKEN
    if args.json:
        report.data({"revision": rev, "storage": args.storage, "api_token": str(token)})
    else:
        print(f"provisioned revision {rev} into {args.storage}")
        print(f"API credentials  {token} (token and certificate pin: "
              "--token-file FILE https://HOST:PORT)")  # fmt: skip
    report.hint(f"pvpy device run --storage {args.storage}")
    return 0


def _remote(args: argparse.Namespace, timeout: float = 30.0) -> Device:
    """The device at args.url; the token from --token, --token-file (with the pin of the
    device's certificate) or $PVPY_API_TOKEN, checked before use (exit 2)."""
    from pvpy.api_credentials import check_token, read_credentials
    from pvpy.workstation.remote import Device

    pin = None
    if args.token_file:
        credentials = read_credentials(Path(args.token_file))  # errors never show its contents
        token: str | None = credentials.token
        pin = credentials.tls_sha256
    elif args.token:
        token = check_token(args.token.strip(), "--token")
    elif os.environ.get("PVPY_API_TOKEN"):
        token = check_token(os.environ["PVPY_API_TOKEN"].strip(), "$PVPY_API_TOKEN")
    else:
        token = None
    return Device(args.url, token, timeout=timeout, cacert=args.cacert, pin_sha256=pin)


def device_status(args: argparse.Namespace) -> int:
    """A device at a URL, over its API (a sandbox's --storage: pvpy.device.commands)."""
    show_status(_remote(args).call("GET", "/v1/status"), args.json, args.no_trunc)
    return 0


def device_history(args: argparse.Namespace) -> int:
    from pvpy._text import history_rows, print_history

    records = _remote(args).call("GET", "/v1/revisions")["revisions"]
    if args.json:
        for row in history_rows(records):
            print(json.dumps(row))
    else:
        print_history(records, args.no_trunc)
    return 0


def device_push(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import push

    return push(_remote(args), Path(args.state), timeout=args.timeout, wait=not args.no_wait,
                say=Report(args.json))  # fmt: skip


def device_logs(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import logs_path

    device = _remote(args)
    path = logs_path(args.containers, args.tail, args.follow, timestamps=args.timestamps,
                     since=args.since, until=args.until, as_json=args.json)  # fmt: skip
    out = sys.stdout.buffer
    for chunk in device.stream(path):
        out.write(chunk)
        out.flush()
    return 0


def device_command(args: argparse.Namespace) -> int:
    """restart a container, reboot, power off: over the API."""
    device = _remote(args)
    if args.verb == "restart":
        from urllib.parse import quote

        from pvpy._text import await_restart, pid_of

        def containers() -> list[dict[str, Any]]:
            return list(device.call("GET", "/v1/containers")["containers"])

        before = pid_of(args.container, containers())
        device.call("POST", f"/v1/containers/{quote(args.container, safe='')}/restart")
        print(await_restart(args.container, before, containers))
    elif args.verb == "stop":
        from urllib.parse import quote

        device.call("POST", f"/v1/containers/{quote(args.container, safe='')}/stop")
        print(f"{args.container}: stop requested")
    else:
        device.call("POST", f"/v1/commands/{args.verb}")
        print(f"{args.verb}: requested")
    return 0


def device_rollback(args: argparse.Namespace) -> int:
    """Back to the newest good older revision, over the API, followed to its end."""
    from pvpy.workstation.remote import follow

    say = Report(args.json)
    device = _remote(args)
    running = device.call("GET", "/v1/status").get("revision")
    target = int(device.call("POST", "/v1/rollback")["revision"])
    say(f"rolling back from revision {running} to revision {target}", revision=target,
        rolling_back_from=running, status="ROLLBACK")  # fmt: skip
    if args.no_wait:
        return 0
    return follow(device, target, args.timeout, say)


def device_add(args: argparse.Namespace) -> int:
    from pvpy.devices import add_device, config_file

    target = add_device(args.name, args.url, args.storage, args.token_file)
    print(f"saved {target.describe()} in {config_file()}")
    print(f"next: pvpy device status {args.name}  (or export PVPY_DEVICE={args.name})")
    return 0


def device_list(args: argparse.Namespace) -> int:
    from pvpy.devices import load_devices

    devices = load_devices()
    default = os.environ.get("PVPY_DEVICE")
    if args.quiet:
        for name in sorted(devices):
            print(name)
    elif args.json:
        for name, t in sorted(devices.items()):
            print(json.dumps({"name": name, **t.to_dict(), "default": name == default}))
    else:
        rows = [[("* " if name == default else "  ") + name, t.url or f"--storage {t.storage}",
                 str(t.token_file or "-")] for name, t in sorted(devices.items())]  # fmt: skip
        print_table(["  NAME", "DEVICE", "TOKEN FILE"], rows)
    return 0


def device_remove(args: argparse.Namespace) -> int:
    from pvpy.devices import remove_device

    remove_device(args.name)
    print(f"removed {args.name}")
    return 0


# --- image, qemu -------------------------------------------------------------


def image_build(args: argparse.Namespace) -> int:
    from pvpy.workstation.image import build_image, is_rpi

    b = build_image(args.board, Path(args.out), spec=Path(args.spec) if args.spec else None,
                    key=Path(args.key) if args.key else None,
                    cache=Path(args.cache) if args.cache else None)  # fmt: skip
    took = sum(b.timings.values())
    print(f"image {b.disk} ({b.board.name}, revision {b.revision}, {b.kernel_package}) "
          f"in {took:.1f}s")  # fmt: skip
    if is_rpi(b.board):
        print(f"next: write {b.disk} to an SD card (README: Raspberry Pi 4/5)")
    else:
        print(f"next: pvpy qemu run {b.out}")
    return 0


def qemu_run(args: argparse.Namespace) -> int:
    from pvpy.workstation.qemu import run

    return run(Path(args.image), args.port or None, args.timeout, args.until,
               Path(args.log) if args.log else None, quiet=args.quiet,
               no_reboot=args.no_reboot)  # fmt: skip


HANDLERS: dict[tuple[str, str], Callable[[argparse.Namespace], int]] = {
    ("key", "gen"): key_gen,
    ("key", "keyset"): key_keyset,
    ("state", "build"): state_build,
    ("state", "sign"): state_sign,
    ("state", "verify"): state_verify,
    ("state", "show"): state_show,
    ("state", "publish"): state_publish,
    ("device", "provision"): device_provision,
    ("device", "status"): device_status,
    ("device", "history"): device_history,
    ("device", "push"): device_push,
    ("device", "update"): device_push,
    ("device", "logs"): device_logs,
    ("device", "restart"): device_command,
    ("device", "reboot"): device_command,
    ("device", "poweroff"): device_command,
    ("device", "stop"): device_command,
    ("device", "halt"): device_command,
    ("device", "rollback"): device_rollback,
    ("device", "add"): device_add,
    ("device", "list"): device_list,
    ("device", "remove"): device_remove,
    ("image", "build"): image_build,
    ("qemu", "run"): qemu_run,
}
