"""The workstation's verbs of the ``pvpy`` command line: keys, revisions, devices over
their API, images and QEMU.

``pvpy.cli`` parses the command line and calls ``HANDLERS[(noun, verb)]``; each handler
prints its result and returns the exit code, and raises a PvpyError for the CLI to
print in one line. Imports sit inside the handlers: a command loads only what it runs.
Device code is never imported here (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pvpy._text import human_size, print_table, show_status
from pvpy.errors import UsageError

if TYPE_CHECKING:
    from pvpy.oci import Registry
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
    print(f"key id   {key.keyid}")
    print(f"private  {Path(args.out) / PRIVATE_KEY_FILE}  (keep it secret, off the device)")
    print(f"public   {Path(args.out) / PUBLIC_KEY_FILE}  (give it to devices: --trust)")
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
    print(
        f"built revision {state.revision}: {len(state.containers)} container(s), "
        f"{len(state.objects())} object(s), {human_size(total)} "
        f"({result.objects_added} new) -> {args.out}"
    )
    print(f"next: pvpy state sign {args.out} --key KEY")
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
    print(f"signed revision {doc['revision']} with {ids}")
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
    print(f"OK: revision {verified.revision} signed by {signers}; {n} object(s) {checked}")
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
            " ".join(c.args)[:40],
        ]
        for c in state.start_order()
    ]
    print_table(["NAME", "ROLE", "GROUP", "GOAL", "RESTART", "ROOTFS", "SIZE", "ARGS"], rows)
    return 0


def _registry(args: argparse.Namespace, host: str) -> Registry:
    from pvpy.oci import Registry, load_auth

    auth = load_auth(Path(args.auth_file)) if args.auth_file else None
    return Registry(host, plain_http=args.plain_http, cacert=args.cacert, auth=auth)


def state_publish(args: argparse.Namespace) -> int:
    from pvpy.oci import Reference
    from pvpy.workstation.publish import publish

    ref = Reference.parse(args.ref)
    publish(_registry(args, ref.registry), ref, Path(args.dir), say=_say)
    return 0


# --- device ------------------------------------------------------------------


def device_provision(args: argparse.Namespace) -> int:
    from pvpy.paths import API_TOKEN
    from pvpy.provision import provision

    rev = provision(Path(args.storage), Path(args.state), [Path(p) for p in args.trust])
    print(f"provisioned revision {rev} into {args.storage}")
    print(f"API credentials  {Path(args.storage) / API_TOKEN} (token and certificate pin: "
          "--token-file FILE https://HOST:PORT)")  # fmt: skip
    print(f"next: pvpy device run --storage {args.storage}")
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
    show_status(_remote(args).call("GET", "/v1/status"), args.json)
    return 0


def device_push(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import push

    return push(_remote(args), Path(args.state), timeout=args.timeout, wait=not args.no_wait,
                say=_say)  # fmt: skip


def device_logs(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import logs_path

    device = _remote(args)
    out = sys.stdout.buffer
    for chunk in device.stream(logs_path(args.container, args.tail, args.follow)):
        out.write(chunk)
        out.flush()
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
    ("device", "push"): device_push,
    ("device", "logs"): device_logs,
    ("image", "build"): image_build,
    ("qemu", "run"): qemu_run,
}
