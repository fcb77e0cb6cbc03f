"""The ``pvpy`` command line: ``pvpy <noun> <verb>``.

Exit codes: 0 success; 1 other pvpy error; 2 usage; 3 trust refused
(signature, key, rollback, expiry); 4 manifest/spec invalid; 5 storage or
object error; 6 key file; 7 an outside program failed; 8 boot environment;
9 container; 10 device; 11 registry; 70 internal error (a bug: set
PVPY_DEBUG=1 for the traceback); 130 interrupted. (pvpy.errors holds the tree.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pvpy.errors import PvpyError, UsageError

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers).rstrip())
    for row in rows:
        print(line.format(*row).rstrip())


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- key ---------------------------------------------------------------------


def cmd_key_gen(args: argparse.Namespace) -> int:
    from pvpy.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key

    key = generate_key(Path(args.out))
    print(f"key id   {key.keyid}")
    print(f"private  {Path(args.out) / PRIVATE_KEY_FILE}  (keep it secret, off the device)")
    print(f"public   {Path(args.out) / PUBLIC_KEY_FILE}  (give it to devices: --trust)")
    return 0


def cmd_key_keyset(args: argparse.Namespace) -> int:
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
    print(f"key set v{args.version}: {len(publics)} key(s), threshold {args.threshold}, "
          f"signed by {len(signers)} -> {args.out}")
    return 0


# --- state -------------------------------------------------------------------


def cmd_state_build(args: argparse.Namespace) -> int:
    from pvpy.workstation.spec import build

    result = build(Path(args.spec), Path(args.out), revision=args.revision)
    state = result.state
    total = sum(ref.size for ref in state.objects().values())
    print(
        f"built revision {state.revision}: {len(state.containers)} container(s), "
        f"{len(state.objects())} object(s), {_size(total)} "
        f"({result.objects_added} new) -> {args.out}"
    )
    print(f"next: pvpy state sign {args.out} --key KEY")
    return 0


def cmd_state_sign(args: argparse.Namespace) -> int:
    from pvpy.signing import load_signing_key, sign_state
    from pvpy.state import canonical, validate
    from pvpy.store import SIGNATURE_FILE, STATE_FILE, write_atomic

    out = Path(args.dir)
    try:
        data = (out / STATE_FILE).read_bytes()
    except OSError as e:
        raise UsageError(f"{out}: no readable {STATE_FILE} ({e.strerror})") from e
    doc = canonical.decode(data)
    if canonical.encode(doc) != data:
        from pvpy.errors import ManifestError

        raise ManifestError("state.json is not in canonical form; rebuild it")
    validate(doc)  # never sign what a device would refuse
    keys = [load_signing_key(Path(k)) for k in args.key]
    write_atomic(out / SIGNATURE_FILE, sign_state(data, keys))
    if args.keyset:
        from pvpy.signing import parse_keyset_unverified
        from pvpy.trust import KEYSET_FILE

        ks = Path(args.keyset).read_bytes()
        parse_keyset_unverified(ks)
        write_atomic(out / KEYSET_FILE, ks)
    ids = ", ".join(k.keyid[:16] for k in keys)
    print(f"signed revision {doc['revision']} with {ids}")
    return 0


def cmd_state_verify(args: argparse.Namespace) -> int:
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


def cmd_state_show(args: argparse.Namespace) -> int:
    from pvpy.errors import SignatureError
    from pvpy.signing import parse_envelope_unverified
    from pvpy.state import parse_unverified
    from pvpy.trust import read_revision_dir

    state_bytes = Path(args.dir) / "state.json"
    if args.json:
        sys.stdout.write(state_bytes.read_text() + "\n")
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
            _size(c.rootfs.size),
            " ".join(c.args)[:40],
        ]
        for c in state.start_order()
    ]
    _print_table(["NAME", "ROLE", "GROUP", "GOAL", "RESTART", "ROOTFS", "SIZE", "ARGS"], rows)
    return 0


def _registry(args: argparse.Namespace, host: str) -> Any:
    from pvpy.oci import Registry, load_auth

    auth = load_auth(Path(args.auth_file)) if getattr(args, "auth_file", None) else None
    return Registry(host, plain_http=args.plain_http, cacert=args.cacert, auth=auth)


def cmd_state_publish(args: argparse.Namespace) -> int:
    from pvpy.oci import Reference
    from pvpy.workstation.publish import publish

    ref = Reference.parse(args.ref)
    publish(_registry(args, ref.registry), ref, Path(args.dir),
            say=lambda line: print(line, flush=True))  # fmt: skip
    return 0


# --- device ------------------------------------------------------------------


def cmd_device_provision(args: argparse.Namespace) -> int:
    from pvpy.provision import provision

    rev = provision(Path(args.storage), Path(args.state), [Path(p) for p in args.trust])
    print(f"provisioned revision {rev} into {args.storage}")
    print(f"API token  {Path(args.storage) / 'config' / 'api-token'} (for --api-tcp clients)")
    print(f"next: pvpy device run --storage {args.storage}")
    return 0


def cmd_device_run(args: argparse.Namespace) -> int:
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
    if args.pull:
        init_args += ["--pull", args.pull, "--pull-interval", str(args.pull_interval)]
        if args.pull_plain_http:
            init_args.append("--pull-plain-http")
    if args.watchdog:
        init_args += ["--watchdog", args.watchdog,
                      "--watchdog-interval", str(args.watchdog_interval)]  # fmt: skip
    return run(Path(args.storage), init_args, max_boots=args.max_boots, max_tries=args.max_tries)


def cmd_device_verify_installed(args: argparse.Namespace) -> int:
    """Used by PID 1 at boot, in a child process: the crypto never lives in PID 1."""
    from pvpy.signing import TrustStore
    from pvpy.store import Storage
    from pvpy.trust import load_trust, verify_revision

    storage = Storage(Path(args.storage))
    trust = load_trust(storage.root)
    assert isinstance(trust, TrustStore)
    state, signature = storage.read_trail(args.revision)
    verify_revision(state, signature, trust, objects=storage.objects, check_expiry=False)
    return 0


def cmd_device_write_boot(args: argparse.Namespace) -> int:
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


def control_request(
    storage: Path, request: dict[str, object], timeout: float = 10
) -> dict[str, Any]:
    """One request to a running sandbox's PID 1; raises DeviceError unless ok."""
    from pvpy import control
    from pvpy.errors import DeviceError
    from pvpy.paths import control_socket, sandbox_run_dir

    reply = control.request(control_socket(sandbox_run_dir(storage)), dict(request), timeout)
    if not reply.get("ok"):
        raise DeviceError(str(reply.get("error")))
    return reply


def cmd_device_status(args: argparse.Namespace) -> int:
    import json

    if (args.url is None) == (args.storage is None):
        raise UsageError("give the device as a URL or as --storage DIR (one of them)")
    if args.url is not None:
        status = _remote(args).call("GET", "/v1/status")
    else:
        status = control_request(Path(args.storage), {"cmd": "status"})
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
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
    _print_table(["NAME", "GROUP", "STATUS", "GOAL", "RESTARTS", "PID", "REASON"], rows)
    if status.get("updates"):
        print()
        _print_table(
            ["REVISION", "STATE", "KIND", "REASON"],
            [[str(u["revision"]), u["status"], u["kind"] or "-", u["reason"][:60]]
             for u in status["updates"]],
        )  # fmt: skip
    return 0


def follow_update(storage: Path, revision: int, timeout: float) -> int:
    """Print an update's progress until it ends; exit 0 for UPDATED/DONE."""
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


def cmd_device_update(args: argparse.Namespace) -> int:
    from pvpy.device import update as up
    from pvpy.device.update import stage
    from pvpy.store import Storage
    from pvpy.trust import load_trust

    storage = Path(args.storage)
    control_request(storage, {"cmd": "status"})  # the device must be up to apply it
    state = stage(storage, Path(args.state), load_trust(storage))
    print(f"revision {state.revision}: staged")
    up.hand_to_pid1(Storage(storage), state.revision,
                    lambda msg, t: control_request(storage, msg, t))  # fmt: skip
    print(f"revision {state.revision}: handed to PID 1 (it verifies, then applies)")
    if args.no_wait:
        return 0
    return follow_update(storage, state.revision, args.timeout)


def _remote(args: argparse.Namespace, timeout: float = 30.0) -> Any:
    """The device at args.url; the token from --token, --token-file or $PVPY_API_TOKEN."""
    from pvpy.workstation.remote import Device

    token = getattr(args, "token", None) or os.environ.get("PVPY_API_TOKEN")
    token_file = getattr(args, "token_file", None)
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"--token-file {token_file}: {e.strerror}") from e
    return Device(args.url, token, timeout=timeout, cacert=getattr(args, "cacert", None))


def cmd_device_push(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import push

    return push(_remote(args), Path(args.state), timeout=args.timeout, wait=not args.no_wait,
                say=lambda line: print(line, flush=True))  # fmt: skip


def cmd_device_logs(args: argparse.Namespace) -> int:
    from pvpy.workstation.remote import logs_path

    device = _remote(args)
    out = sys.stdout.buffer
    for chunk in device.stream(logs_path(args.container, args.tail, args.follow)):
        out.write(chunk)
        out.flush()
    return 0


def cmd_device_api(args: argparse.Namespace) -> int:
    """PID 1 runs this (``Init.ensure_api``); it serves until SIGTERM."""
    from pvpy.device.api import Limits, serve

    limits = Limits(max_connections=args.max_connections, max_object=args.max_object,
                    head_timeout=args.head_timeout, client_timeout=args.client_timeout)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = (Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    serve(Path(args.storage), Path(args.run_dir), tcp=args.tcp,
          token_file=Path(args.token_file) if args.token_file else None, limits=limits, tls=tls)


def cmd_device_pull(args: argparse.Namespace) -> int:
    """Poll a registry tag; install and apply what is new (never in PID 1)."""
    from pvpy.device.puller import Puller, run
    from pvpy.log import configure
    from pvpy.oci import AUTH_FILE, Reference
    from pvpy.paths import sandbox_run_dir
    from pvpy.store import Storage

    if not args.verbose and "PVPY_LOG_LEVEL" not in os.environ:
        configure(level="info")  # a device process: its log says what it did
    if args.interval <= 0:
        raise UsageError("--interval must be > 0")
    ref = Reference.parse(args.source)
    storage = Storage(Path(args.storage))
    if args.auth_file is None and (storage.root / AUTH_FILE).is_file():
        args.auth_file = str(storage.root / AUTH_FILE)
    run_dir = Path(args.run_dir) if args.run_dir else sandbox_run_dir(storage.root)
    puller = Puller(storage, run_dir, _registry(args, ref.registry), ref,
                    retry_failed=args.retry_failed)  # fmt: skip
    return run(puller, args.interval, args.once, say=lambda line: print(line, flush=True))


def cmd_device_rollback(args: argparse.Namespace) -> int:
    storage = Path(args.storage)
    reply = control_request(storage, {"cmd": "rollback"})
    print(f"rolling back to revision {reply['revision']}")
    if args.no_wait:
        return 0
    return follow_update(storage, int(reply["revision"]), args.timeout)


def cmd_device_command(args: argparse.Namespace) -> int:
    request: dict[str, object] = {"cmd": args.verb}
    if getattr(args, "container", None):
        request["container"] = args.container
    control_request(Path(args.storage), request)
    print(f"{args.verb}: requested")
    return 0


# --- image, qemu ----------------------------------------------------------------


def cmd_image_build(args: argparse.Namespace) -> int:
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


def cmd_qemu_run(args: argparse.Namespace) -> int:
    from pvpy.workstation.qemu import run

    return run(Path(args.image), args.port or None, args.timeout, args.until,
               Path(args.log) if args.log else None, quiet=args.quiet,
               no_reboot=args.no_reboot)  # fmt: skip


# --- parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvpy",
        description="Signed container revisions for embedded Linux devices.",
        epilog="Run `pvpy <noun> <verb> --help` for details.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    nouns = parser.add_subparsers(dest="noun", metavar="<noun>", required=True)

    key = nouns.add_parser("key", help="signing keys").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = key.add_parser("gen", help="make an Ed25519 key pair (pvpy.key, pvpy.pub)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    p.set_defaults(func=cmd_key_gen)
    p = key.add_parser(
        "keyset",
        help="make a signed key set (keys.json) for key rotation",
        description="A key set lists the public keys a device trusts and how many must "
        "sign. A device moves from key set N to a newer one only if it is signed by "
        "a threshold of the old keys AND of the new keys (sign with both).",
    )
    p.add_argument("--key", action="append", required=True, metavar="PUB",
                   help="public key to trust (repeat)")
    p.add_argument("--sign", action="append", required=True, metavar="KEY",
                   help="private key that signs the set (repeat: old and new)")
    p.add_argument("--version", type=int, required=True, help="key set version, only goes up")
    p.add_argument("--threshold", type=int, default=1, help="signatures needed (default 1)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write keys.json")
    p.set_defaults(func=cmd_key_keyset)

    state = nouns.add_parser("state", help="revisions: build, sign, verify, show").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = state.add_parser("build", help="build a revision from a YAML spec")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="revision directory to write")
    p.add_argument("--revision", type=int, help="override the spec's revision number")
    p.set_defaults(func=cmd_state_build)
    p = state.add_parser("sign", help="sign a built revision (writes state.sig.json)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--key", action="append", required=True, metavar="KEY",
                   help="private key file or key directory (repeat for a threshold)")
    p.add_argument("--keyset", metavar="FILE", help="ship this keys.json (key rotation)")
    p.set_defaults(func=cmd_state_sign)
    p = state.add_parser(
        "verify",
        help="check signature, schema, anti-rollback, expiry and every object",
        description="Exit 0 when the revision may run; otherwise a one-line reason and "
        "exit 3 (trust), 4 (manifest) or 5 (objects).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                   help="trusted public key (PEM) or keys.json (repeat)")
    p.add_argument("--current", type=int, metavar="REV",
                   help="refuse revisions not newer than this one")
    p.add_argument("--no-objects", action="store_true", help="skip hashing the objects")
    p.set_defaults(func=cmd_state_verify)
    p = state.add_parser("show", help="print a revision (does not verify it)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print state.json as is")
    p.set_defaults(func=cmd_state_show)
    p = state.add_parser(
        "publish", help="store a signed revision in an OCI registry (pull mode)",
        description="Uploads the blobs the registry lacks (progress on stderr), then the "
        "revision's manifest, tagged TAG and the revision number. See pvpy/registry.py.",
    )
    p.add_argument("dir", metavar="SIGNED_DIR")
    p.add_argument("ref", metavar="REGISTRY/REPO:TAG", help="e.g. registry.example/demo:stable")
    _registry_options(p)
    p.set_defaults(func=cmd_state_publish)

    device = nouns.add_parser("device", help="a device: provision, run (sandbox), status")
    dev = device.add_subparsers(dest="verb", metavar="<verb>", required=True)
    p = dev.add_parser("provision", help="install the factory revision into empty storage")
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--state", required=True, metavar="SIGNED_DIR", help="signed revision dir")
    p.add_argument("--trust", action="append", required=True, metavar="PUBKEY",
                   help="public key (PEM) or keys.json the device will trust (repeat)")
    p.set_defaults(func=cmd_device_provision)
    p = dev.add_parser(
        "run",
        help="boot the device in a sandbox (pid+mount+uts+ipc namespaces); Ctrl-C powers off",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--runtime", default="crun", choices=("crun", "runc"))
    p.add_argument("--api", action="store_true", help="serve the device API on a unix socket")
    p.add_argument("--api-tcp", metavar="HOST:PORT",
                   help="serve the device API on TCP too (token: STORAGE/config/api-token)")
    p.add_argument("--pull", metavar="REGISTRY/REPO:TAG",
                   help="let the device poll this registry tag and update itself")
    p.add_argument("--pull-interval", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--pull-plain-http", action="store_true", help="the registry speaks HTTP")
    p.add_argument("--watchdog", metavar="PATH", help="watchdog device or test file")
    p.add_argument("--watchdog-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--max-boots", type=int, help="stop after this many boots (tests)")
    p.add_argument("--max-tries", type=int, default=1, metavar="N",
                   help="boots a try revision gets to commit before it is abandoned (default 1)")
    p.add_argument("--commit-delay", type=float, default=25.0, metavar="SECONDS",
                   help="how long all goals must hold before an update commits (default 25)")
    p.add_argument("--commit-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long an update may take to meet its goals (default 120)")
    p.set_defaults(func=cmd_device_run)
    p = dev.add_parser(
        "update",
        help="update a running device from a signed revision dir; follows it to the end",
        description="Stages the revision (signature, schema, anti-rollback, objects) into the "
        "storage, asks PID 1 to apply it, prints its progress. Exit 0 when UPDATED or DONE, "
        "3 when refused (WONTGO) or rolled back (ERROR).",
    )
    p.add_argument("state", metavar="SIGNED_DIR")
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    p.set_defaults(func=cmd_device_update)
    p = dev.add_parser("rollback", help="go back to the newest good older revision")
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    p.set_defaults(func=cmd_device_rollback)
    p = dev.add_parser(
        "status", help="status of a running device: a sandbox (--storage) or one at a URL",
        description="URL: http(s)://HOST:PORT (token: --token, --token-file or "
        "$PVPY_API_TOKEN) or unix:/path/to/api.sock.",
    )
    p.add_argument("url", nargs="?", metavar="URL", help="the device API")
    p.add_argument("--storage", metavar="DIR", help="a sandbox device's storage")
    _token_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_device_status)
    p = dev.add_parser(
        "push",
        help="send a signed revision to a device over its API; follows it to the end",
        description="Asks the device which objects it lacks, uploads only those (progress on "
        "stderr), posts the signed state and prints the update's progress. Exit 0 when UPDATED "
        "or DONE, 3 when refused (WONTGO) or rolled back (ERROR).",
    )
    p.add_argument("url", metavar="URL", help="http(s)://HOST:PORT or unix:/path/to/api.sock")
    p.add_argument("state", metavar="SIGNED_DIR")
    _token_options(p)
    p.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    p.set_defaults(func=cmd_device_push)
    p = dev.add_parser("logs", help="a device's container logs over its API (tail, follow)")
    p.add_argument("url", metavar="URL", help="http(s)://HOST:PORT or unix:/path/to/api.sock")
    p.add_argument("container", nargs="?", help="one container (default: all, prefixed)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("-n", "--tail", type=int, default=100, metavar="LINES",
                   help="lines of each log to start with (default 100)")
    _token_options(p)
    p.set_defaults(func=cmd_device_logs)
    p = dev.add_parser(
        "api", help="(device) serve the device API; PID 1 runs it",
        description="HTTP/1.1 on RUN_DIR/api.sock (root only) and, with --tcp, on TCP with "
        "a bearer token (STORAGE/config/api-token, mode 0600). See docs/openapi.yaml.",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--run-dir", required=True, metavar="DIR")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP")
    p.add_argument("--token-file", metavar="FILE",
                   help="bearer token for TCP (default STORAGE/config/api-token)")
    p.add_argument("--max-connections", type=int, default=32, metavar="N",
                   help="connections per listener; more get 503 (default 32)")
    p.add_argument("--max-object", type=int, default=1 << 30, metavar="BYTES",
                   help="largest upload no pending signed state names (default 1 GiB)")
    p.add_argument("--head-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to send a request head (default 10)")
    p.add_argument("--client-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest silence while a body or reply moves (default 30)")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="TLS on TCP with this certificate (default: STORAGE/config/api-cert.pem "
                   "and api-key.pem when both exist)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.set_defaults(func=cmd_device_api)
    p = dev.add_parser(
        "pull", help="(device) poll a registry tag; install and apply new revisions",
        description="Each round: skip while the device is updating; resolve the tag; check "
        "the state's signature, schema and revision; fetch the missing objects (hash "
        "checked); ask PID 1 to apply it and wait for UPDATED, DONE, WONTGO or ERROR. "
        "--once exits 0 (updated or nothing new), 3 (refused or failed) or 10 (registry or "
        "device unreachable, busy).",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--run-dir", metavar="DIR", help="PID 1's run dir (default: the sandbox's)")
    p.add_argument("--from", dest="source", required=True, metavar="REGISTRY/REPO:TAG")
    p.add_argument("--interval", type=float, default=300.0, metavar="SECONDS",
                   help="seconds between polls (default 300)")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument("--retry-failed", type=float, default=600.0, metavar="SECONDS",
                   help="wait before trying a revision whose download failed again (default 600)")
    _registry_options(p)
    p.set_defaults(func=cmd_device_pull)
    for verb, text in (("reboot", "reboot the device"), ("poweroff", "power the device off"),
                       ("halt", "halt the device")):
        p = dev.add_parser(verb, help=text)
        p.add_argument("--storage", required=True, metavar="DIR")
        p.set_defaults(func=cmd_device_command)
    for verb, text in (("restart", "restart a container"), ("stop", "stop a container")):
        p = dev.add_parser(verb, help=text)
        p.add_argument("container")
        p.add_argument("--storage", required=True, metavar="DIR")
        p.set_defaults(func=cmd_device_command)
    p = dev.add_parser(
        "verify-installed", help="(internal) verify an installed revision; PID 1 runs it at boot"
    )
    p.add_argument("--storage", required=True)
    p.add_argument("--revision", type=int, required=True)
    p.set_defaults(func=cmd_device_verify_installed)
    p = dev.add_parser(
        "write-boot", help="(internal) write a revision's boot files into a Raspberry Pi's "
        "try boot partition; PID 1 runs it before a try-boot"
    )  # fmt: skip
    p.add_argument("--storage", required=True)
    p.add_argument("--revision", type=int, required=True)
    p.add_argument("--target", required=True, help="the boot partition (or a directory)")
    p.add_argument("--board", required=True, help="the board file (board.json)")
    p.set_defaults(func=cmd_device_write_boot)

    image = nouns.add_parser("image", help="board images: build").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = image.add_parser(
        "build", help="build a board's disk image with a signed factory revision",
        description="Fetches the board's Debian arm64 packages (cached), builds the initramfs "
        "(python, pvpy, crun) and kernel as the revision's BSP, signs it, provisions the "
        "storage and writes disk.img + the bootloader files. Installs missing Debian host "
        "tools with apt-get.",
    )  # fmt: skip
    p.add_argument("--board", required=True,
                   help="boards/<name> (qemu-arm64, rpi4, rpi5) or a board dir")
    p.add_argument("--out", required=True, metavar="DIR_OR_IMG")
    p.add_argument("--spec", help="revision spec (default examples/demo/spec.yaml)")
    p.add_argument("--key", help="signing key (default: a new dev key in OUT/keys)")
    p.add_argument("--cache", metavar="DIR", help="package cache (default ~/.cache/pvpy)")
    p.set_defaults(func=cmd_image_build)

    qemu = nouns.add_parser("qemu", help="boot an image in QEMU").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = qemu.add_parser("run", help="boot an image of `image build` on qemu-system-aarch64")
    p.add_argument("image", metavar="IMG", help="the image directory (or its disk.img)")
    p.add_argument("--port", type=int, default=8022,
                   help="host 127.0.0.1:PORT -> the guest's API port (0: none)")
    p.add_argument("--timeout", type=float, help="stop QEMU after this many seconds (exit 124)")
    p.add_argument("--until", metavar="REGEX", help="stop QEMU when the console shows this")
    p.add_argument("--log", help="console log (default IMAGE_DIR/console.log)")
    p.add_argument("--quiet", action="store_true", help="do not echo the console")
    p.add_argument("--no-reboot", action="store_true",
                   help="a reboot or watchdog reset ends QEMU")
    p.set_defaults(func=cmd_qemu_run)
    return parser


def _registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true",
                   help="speak HTTP, not HTTPS, to the registry (a local test registry)")
    p.add_argument("--cacert", metavar="PEM", help="https: trust this CA (default: the system's)")
    p.add_argument("--auth-file", metavar="FILE",
                   help="basic auth, user:password, mode 0600 (device default: "
                   "STORAGE/config/registry-auth when it exists)")


def _token_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--token", help="API bearer token (TCP; visible in ps: prefer the others)")
    group.add_argument("--token-file", metavar="FILE", help="file holding the API bearer token")
    p.add_argument("--cacert", metavar="PEM",
                   help="https: trust this CA or device certificate (default: the system's)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["init"]:
        # PID 1: skip the CLI's imports and structlog entirely.
        from pvpy.device.pid1 import main as init_main

        init_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from pvpy.log import configure

    # The sandbox narrates boots and the API server its requests (into the device's
    # log); other commands print results, logs only warnings.
    narrating = (args.noun, args.verb) in (("device", "run"), ("device", "api"), ("image", "build"))
    quiet = "info" if narrating else "warning"
    configure(
        level="debug" if args.verbose else os.environ.get("PVPY_LOG_LEVEL", quiet),
        # PID 1 runs this at every boot: structlog's import alone costs ~0.15 s there
        lean=(args.noun, args.verb) in (("device", "verify-installed"), ("device", "write-boot")),
    )
    func: Handler = args.func
    try:
        return func(args)
    except PvpyError as e:
        print(f"pvpy: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `pvpy ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("pvpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one line, traceback on request
        if os.environ.get("PVPY_DEBUG"):
            raise
        print(f"pvpy: internal error: {type(e).__name__}: {e} (PVPY_DEBUG=1 for details)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
