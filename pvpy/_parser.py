"""The ``pvpy`` command line's grammar: ``pvpy <noun> <verb> [args]``.

``pvpy.cli`` parses with ``build_parser()`` and runs the handler it finds. The
device verbs that talk to a device (``TARGET_VERBS``: status, logs, history,
restart, stop, reboot, poweroff, halt, push, update, rollback) all take the device
the same way, as ``NAME``, a URL or ``--storage DIR`` (``pvpy.devices``); their
positional words are sorted out after parsing (``pvpy.cli.bind_target``), because
a device may be left out (``$PVPY_DEVICE``).
"""

from __future__ import annotations

import argparse

from pvpy import __version__

__all__ = ["DEVICE_WORD", "TARGET_VERBS", "build_parser"]

TARGET_VERBS = frozenset({
    "status", "history", "rollback", "reboot", "poweroff", "halt", "restart", "stop", "push",
    "update", "logs",
})  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvpy",
        description="Signed container revisions for embedded Linux devices.",
        epilog="Run `pvpy <noun> <verb> --help` for details.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=f"pvpy {__version__}")
    nouns = parser.add_subparsers(dest="noun", metavar="<noun>", required=True)

    key = nouns.add_parser("key", help="signing keys").add_subparsers(
        dest="verb", metavar="<verb>", required=True
    )
    p = key.add_parser("gen", help="make an Ed25519 key pair (pvpy.key, pvpy.pub)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    _json_option(p)
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
    _json_option(p)
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
    _json_option(p)
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
    _json_option(p)
    p = state.add_parser("show", help="print a revision (does not verify it)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print state.json as is")
    _no_trunc_option(p)
    p = state.add_parser(
        "publish",
        help="store a signed revision in an OCI registry (pull mode)",
        description="Uploads the blobs the registry lacks (progress on stderr), then the "
        "revision's manifest, tagged TAG and the revision number. See pvpy/workstation/publish.py.",
    )
    p.add_argument("dir", metavar="SIGNED_DIR")
    p.add_argument("ref", metavar="REGISTRY/REPO:TAG", help="e.g. registry.example/demo:stable")
    _registry_options(p)
    _json_option(p)

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
    _json_option(p)
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
    _target_verbs(dev)
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
        help="wait before trying again a revision refused for its objects' bytes "
        "(default 600); failed transfers are retried with backoff",
    )
    _registry_options(p)
    p = dev.add_parser(
        "gc", help="collect garbage now: unpinned revisions and unreferenced objects",
        description="What runs after every commit, on request: keeps the running, committed, "
        "trying and newest good older revision and the trails running containers use.",
    )  # fmt: skip
    p.add_argument("--storage", required=True, metavar="DIR")
    _json_option(p)
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

    p = nouns.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description='bash: `eval "$(pvpy completion bash)"` in ~/.bashrc; zsh: '
        '`eval "$(pvpy completion zsh)"` in ~/.zshrc (after compinit).',
    )
    p.add_argument("shell", choices=("bash", "zsh"))
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
        help="user:password, mode 0600, given only when the registry asks (Basic, or to its "
        "token server for a bearer token; device default: STORAGE/config/registry-auth)",
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


def _json_option(p: argparse.ArgumentParser, what: str = "print JSON (for scripts)") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _no_trunc_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-trunc", action="store_true", help="do not cut long table cells")


def _device_options(p: argparse.ArgumentParser) -> None:
    """How every verb that talks to a device is told which one."""
    p.add_argument("--storage", metavar="DIR", help="a sandbox device's storage (this machine)")
    _token_options(p)


DEVICE_WORD = "NAME|URL"
DEVICE_HELP = (
    "The device: a NAME saved by `pvpy device add`, a URL (https://HOST:PORT, "
    "unix:/path/api.sock) or --storage DIR (a sandbox here); default $PVPY_DEVICE."
)


def _target_verbs(dev: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The verbs that talk to one device, each taking it as NAME, URL or --storage."""
    p = dev.add_parser(
        "add",
        help="save a device under a name (then: pvpy device status NAME)",
        description="Saves NAME -> URL (with its credentials file) or --storage DIR in "
        "$XDG_CONFIG_HOME/pvpy/devices.json (mode 0600). Every device verb then takes NAME; "
        "$PVPY_DEVICE=NAME makes it the default.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("url", nargs="?", metavar="URL", help="https://HOST:PORT or unix:/path")
    p.add_argument("--storage", metavar="DIR", help="a sandbox device's storage")
    p.add_argument("--token-file", metavar="FILE", help="the device's API credentials file")
    p = dev.add_parser("list", help="the saved devices")
    _json_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    p = dev.add_parser("remove", help="forget a saved device")
    p.add_argument("name", metavar="NAME")

    p = dev.add_parser("status", help="containers, revisions, updates (offline: what is "
                       "installed)", description=DEVICE_HELP)  # fmt: skip
    p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
    _device_options(p)
    _json_option(p)
    _no_trunc_option(p)
    p = dev.add_parser(
        "history", help="every update: when, what, how it ended", description=DEVICE_HELP
    )
    p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
    _device_options(p)
    _json_option(p)
    _no_trunc_option(p)
    for verb in ("push", "update"):
        p = dev.add_parser(
            verb,
            help="send a signed revision to a device and follow it to the end"
            + (" (= push)" if verb == "update" else ""),
            description="Over the API: uploads only the objects the device lacks, posts the "
            "signed state, prints the update's progress. With --storage: stages it into the "
            "sandbox's storage and hands it to PID 1. The revision the device already runs is "
            "'up to date' (exit 0). Exit 0 when UPDATED or DONE, 3 when refused (WONTGO) or "
            "rolled back (ERROR). " + DEVICE_HELP,
        )
        p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
        p.add_argument("state", metavar="SIGNED_DIR")
        _device_options(p)
        _follow_options(p)
    p = dev.add_parser("rollback", help="go back to the newest good older revision",
                       description=DEVICE_HELP)  # fmt: skip
    p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
    _device_options(p)
    _follow_options(p)
    p = dev.add_parser(
        "logs",
        help="container logs: tail, follow, times, boots",
        description="All containers (lines prefixed NAME|, in time order) or the ones named. "
        "A line '-- boot ... --' marks each boot. " + DEVICE_HELP,
    )
    p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
    p.add_argument("containers", nargs="*", metavar="CONTAINER")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("-n", "--tail", type=int, default=100, metavar="LINES",
                   help="lines of each log to start with (default 100)")  # fmt: skip
    p.add_argument("-t", "--timestamps", action="store_true", help="show each line's time")
    p.add_argument("--since", metavar="WHEN",
                   help="lines from then on: a duration ago (10m, 1h30m, 45s) or a time "
                   "(2026-12-02T10:00:00, 10:00)")  # fmt: skip
    p.add_argument("--until", metavar="WHEN", help="lines up to then (as --since)")
    _device_options(p)
    _json_option(p, "one JSON object per line: container, time, line, boot")
    for verb, text in (
        ("reboot", "reboot the device"),
        ("poweroff", "power the device off"),
        ("halt", "halt the device"),
    ):
        p = dev.add_parser(verb, help=text, description=DEVICE_HELP)
        p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
        _device_options(p)
    for verb, text in (("restart", "restart a container"), ("stop", "stop a container")):
        p = dev.add_parser(verb, help=text, description=DEVICE_HELP)
        p.add_argument("device", nargs="?", metavar=DEVICE_WORD)
        p.add_argument("container", metavar="CONTAINER")
        _device_options(p)


def _follow_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    _json_option(p, "progress as JSON lines")
