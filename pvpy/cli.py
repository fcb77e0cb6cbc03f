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

from pvpy.errors import EXIT_INTERNAL, PvpyError, UsageError

EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

# The device's verbs that run device code (pvpy.device.commands); every other verb is
# the workstation's (pvpy.workstation.commands). `device status` is either: a sandbox's
# --storage is the device's, a URL the workstation's.
DEVICE_VERBS = frozenset({
    "run", "api", "pull", "verify-installed", "write-boot", "update", "rollback",
    "reboot", "poweroff", "halt", "restart", "stop",
})  # fmt: skip


def find_handler(args: argparse.Namespace) -> Handler:
    """The function that runs the parsed command. This module is the one that imports
    both sides, and only here, lazily: a command loads its own side only (PID 1's
    verify-installed must not pay for the workstation's imports)."""
    if args.noun == "device" and args.verb == "status":
        if (args.url is None) == (args.storage is None):
            raise UsageError("give the device as a URL or as --storage DIR (one of them)")
        device_side = args.storage is not None
    else:
        device_side = args.noun == "device" and args.verb in DEVICE_VERBS
    if device_side:
        from pvpy.device.commands import HANDLERS as DEVICE_HANDLERS

        return DEVICE_HANDLERS[args.verb]
    from pvpy.workstation.commands import HANDLERS

    return HANDLERS[(args.noun, args.verb)]


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
    p = key.add_parser(
        "keyset",
        help="make a signed key set (keys.json) for key rotation",
        description="A key set lists the public keys a device trusts and how many must "
        "sign. A device moves from key set N to a newer one only if it is signed by "
        "a threshold of the old keys AND of the new keys (sign with both).",
    )
    p.add_argument(
        "--key", action="append", required=True, metavar="PUB", help="public key to trust (repeat)"
    )
    p.add_argument(
        "--sign",
        action="append",
        required=True,
        metavar="KEY",
        help="private key that signs the set (repeat: old and new)",
    )
    p.add_argument("--version", type=int, required=True, help="key set version, only goes up")
    p.add_argument("--threshold", type=int, default=1, help="signatures needed (default 1)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write keys.json")

    state = nouns.add_parser("state", help="revisions: build, sign, verify, show").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = state.add_parser("build", help="build a revision from a YAML spec")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="revision directory to write")
    p.add_argument("--revision", type=int, help="override the spec's revision number")
    p = state.add_parser("sign", help="sign a built revision (writes state.sig.json)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="KEY",
        help="private key file or key directory (repeat for a threshold)",
    )
    p.add_argument("--keyset", metavar="FILE", help="ship this keys.json (key rotation)")
    p = state.add_parser(
        "verify",
        help="check signature, schema, anti-rollback, expiry and every object",
        description="Exit 0 when the revision may run; otherwise a one-line reason and "
        "exit 3 (trust), 4 (manifest) or 5 (objects).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar="PUBKEY",
        help="trusted public key (PEM) or keys.json (repeat)",
    )
    p.add_argument(
        "--current", type=int, metavar="REV", help="refuse revisions not newer than this one"
    )
    p.add_argument("--no-objects", action="store_true", help="skip hashing the objects")
    p = state.add_parser("show", help="print a revision (does not verify it)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print state.json as is")
    p = state.add_parser(
        "publish",
        help="store a signed revision in an OCI registry (pull mode)",
        description="Uploads the blobs the registry lacks (progress on stderr), then the "
        "revision's manifest, tagged TAG and the revision number. See pvpy/workstation/publish.py.",
    )
    p.add_argument("dir", metavar="SIGNED_DIR")
    p.add_argument("ref", metavar="REGISTRY/REPO:TAG", help="e.g. registry.example/demo:stable")
    _registry_options(p)

    device = nouns.add_parser("device", help="a device: provision, run (sandbox), status")
    dev = device.add_subparsers(dest="verb", metavar="<verb>", required=True)
    p = dev.add_parser("provision", help="install the factory revision into empty storage")
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--state", required=True, metavar="SIGNED_DIR", help="signed revision dir")
    p.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar="PUBKEY",
        help="public key (PEM) or keys.json the device will trust (repeat)",
    )
    p = dev.add_parser(
        "run",
        help="boot the device in a sandbox (pid+mount+uts+ipc namespaces); Ctrl-C powers off",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--runtime", default="crun", choices=("crun", "runc"))
    p.add_argument("--api", action="store_true", help="serve the device API on a unix socket")
    p.add_argument(
        "--api-tcp",
        metavar="HOST:PORT",
        help="serve the device API on TCP too: TLS, credentials in STORAGE/config/api-token",
    )
    p.add_argument(
        "--api-plain-http",
        action="store_true",
        help="serve the TCP API without TLS (the token crosses the network in clear)",
    )
    p.add_argument(
        "--pull",
        metavar="REGISTRY/REPO:TAG",
        help="let the device poll this registry tag and update itself",
    )
    p.add_argument("--pull-interval", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--pull-plain-http", action="store_true", help="the registry speaks HTTP")
    p.add_argument("--watchdog", metavar="PATH", help="watchdog device or test file")
    p.add_argument("--watchdog-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--max-boots", type=int, help="stop after this many boots (tests)")
    p.add_argument(
        "--max-tries",
        type=int,
        default=1,
        metavar="N",
        help="boots a try revision gets to commit before it is abandoned (default 1)",
    )
    p.add_argument(
        "--commit-delay",
        type=float,
        default=25.0,
        metavar="SECONDS",
        help="how long all goals must hold before an update commits (default 25)",
    )
    p.add_argument(
        "--commit-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long an update may take to meet its goals (default 120)",
    )
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
    p = dev.add_parser("rollback", help="go back to the newest good older revision")
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    p = dev.add_parser(
        "status",
        help="status of a running device: a sandbox (--storage) or one at a URL",
        description="URL: http(s)://HOST:PORT (token: --token, --token-file or "
        "$PVPY_API_TOKEN) or unix:/path/to/api.sock.",
    )
    p.add_argument("url", nargs="?", metavar="URL", help="the device API")
    p.add_argument("--storage", metavar="DIR", help="a sandbox device's storage")
    _token_options(p)
    p.add_argument("--json", action="store_true")
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
    p = dev.add_parser("logs", help="a device's container logs over its API (tail, follow)")
    p.add_argument("url", metavar="URL", help="http(s)://HOST:PORT or unix:/path/to/api.sock")
    p.add_argument("container", nargs="?", help="one container (default: all, prefixed)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument(
        "-n",
        "--tail",
        type=int,
        default=100,
        metavar="LINES",
        help="lines of each log to start with (default 100)",
    )
    _token_options(p)
    p = dev.add_parser(
        "api",
        help="(device) serve the device API; PID 1 runs it",
        description="HTTP/1.1 on RUN_DIR/api.sock (root only) and, with --tcp, HTTPS on TCP "
        "with a bearer token (STORAGE/config/api-token, mode 0600) and the device certificate "
        "(STORAGE/config/api-cert.pem, made when missing). See docs/openapi.yaml.",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--run-dir", required=True, metavar="DIR")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token for TCP (default STORAGE/config/api-token)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=32,
        metavar="N",
        help="connections per listener; more get 503 (default 32)",
    )
    p.add_argument(
        "--max-object",
        type=int,
        default=1 << 30,
        metavar="BYTES",
        help="largest upload no pending signed state names (default 1 GiB)",
    )
    p.add_argument(
        "--head-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time a client has to send a request head (default 10)",
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest silence while a body or reply moves (default 30)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="TLS on TCP with this certificate (default: STORAGE/config/api-cert.pem "
        "and api-key.pem when both exist)",
    )
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--plain-http",
        action="store_true",
        help="serve TCP without TLS (the token then crosses the network in clear)",
    )
    p = dev.add_parser(
        "pull",
        help="(device) poll a registry tag; install and apply new revisions",
        description="Each round: skip while the device is updating; resolve the tag; check "
        "the state's signature, schema and revision; fetch the missing objects (hash "
        "checked); ask PID 1 to apply it and wait for UPDATED, DONE, WONTGO or ERROR. "
        "--once exits 0 (updated or nothing new), 3 (refused or failed) or 10 (registry or "
        "device unreachable, busy).",
    )
    p.add_argument("--storage", required=True, metavar="DIR")
    p.add_argument("--run-dir", metavar="DIR", help="PID 1's run dir (default: the sandbox's)")
    p.add_argument("--from", dest="source", required=True, metavar="REGISTRY/REPO:TAG")
    p.add_argument(
        "--interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds between polls (default 300)",
    )
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument(
        "--retry-failed",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="wait before trying a revision whose download failed again (default 600)",
    )
    _registry_options(p)
    for verb, text in (
        ("reboot", "reboot the device"),
        ("poweroff", "power the device off"),
        ("halt", "halt the device"),
    ):
        p = dev.add_parser(verb, help=text)
        p.add_argument("--storage", required=True, metavar="DIR")
    for verb, text in (("restart", "restart a container"), ("stop", "stop a container")):
        p = dev.add_parser(verb, help=text)
        p.add_argument("container")
        p.add_argument("--storage", required=True, metavar="DIR")
    p = dev.add_parser(
        "verify-installed", help="(internal) verify an installed revision; PID 1 runs it at boot"
    )
    p.add_argument("--storage", required=True)
    p.add_argument("--revision", type=int, required=True)
    p = dev.add_parser(
        "write-boot", help="(internal) write a revision's boot files into a Raspberry Pi's "
        "try boot partition; PID 1 runs it before a try-boot"
    )  # fmt: skip
    p.add_argument("--storage", required=True)
    p.add_argument("--revision", type=int, required=True)
    p.add_argument("--target", required=True, help="the boot partition (or a directory)")
    p.add_argument("--board", required=True, help="the board file (board.json)")

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
    p.add_argument(
        "--board", required=True, help="boards/<name> (qemu-arm64, rpi4, rpi5) or a board dir"
    )
    p.add_argument("--out", required=True, metavar="DIR_OR_IMG")
    p.add_argument("--spec", help="revision spec (default examples/demo/spec.yaml)")
    p.add_argument("--key", help="signing key (default: a new dev key in OUT/keys)")
    p.add_argument("--cache", metavar="DIR", help="package cache (default ~/.cache/pvpy)")

    qemu = nouns.add_parser("qemu", help="boot an image in QEMU").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = qemu.add_parser("run", help="boot an image of `image build` on qemu-system-aarch64")
    p.add_argument("image", metavar="IMG", help="the image directory (or its disk.img)")
    p.add_argument(
        "--port",
        type=int,
        default=8022,
        help="host 127.0.0.1:PORT -> the guest's API port (0: none)",
    )
    p.add_argument("--timeout", type=float, help="stop QEMU after this many seconds (exit 124)")
    p.add_argument("--until", metavar="REGEX", help="stop QEMU when the console shows this")
    p.add_argument("--log", help="console log (default IMAGE_DIR/console.log)")
    p.add_argument("--quiet", action="store_true", help="do not echo the console")
    p.add_argument("--no-reboot", action="store_true", help="a reboot or watchdog reset ends QEMU")
    return parser


def _registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plain-http",
        action="store_true",
        help="speak HTTP, not HTTPS, to the registry (a local test registry)",
    )
    p.add_argument("--cacert", metavar="PEM", help="https: trust this CA (default: the system's)")
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help="basic auth, user:password, mode 0600 (device default: "
        "STORAGE/config/registry-auth when it exists)",
    )


def _token_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--token", help="API bearer token (TCP; visible in ps: prefer the others)")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="the device's API credentials file (its token, and the certificate https pins)",
    )
    p.add_argument(
        "--cacert",
        metavar="PEM",
        help="https: trust this CA or device certificate (default: the pin in --token-file, "
        "else the system's CAs)",
    )


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
    try:
        return find_handler(args)(args)
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
        print(
            f"pvpy: internal error: {type(e).__name__}: {e} (PVPY_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
