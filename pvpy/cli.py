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
from typing import TYPE_CHECKING

from pvpy._parser import TARGET_VERBS, build_parser
from pvpy.errors import EXIT_INTERNAL, PvpyError

if TYPE_CHECKING:
    from pvpy.devices import Target

EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

# The device's verbs that always run device code (pvpy.device.commands). The verbs that
# talk to one device (pvpy._parser.TARGET_VERBS) run on the side its target is on: a
# sandbox's --storage on the device's, a URL on the workstation's (the device API).
DEVICE_VERBS = frozenset({
    "run", "api", "pull", "verify-installed", "write-boot", "gc",
})  # fmt: skip


def find_handler(args: argparse.Namespace) -> Handler:
    """The function that runs the parsed command. This module is the one that imports
    both sides, and only here, lazily: a command loads its own side only (PID 1's
    verify-installed must not pay for the workstation's imports)."""
    if args.noun == "completion":
        return print_completion
    target = bind_target(args)
    device_side = args.noun == "device" and (
        args.verb in DEVICE_VERBS or (target is not None and target.storage is not None)
    )
    if device_side:
        from pvpy.device.commands import HANDLERS as DEVICE_HANDLERS

        return DEVICE_HANDLERS[args.verb]
    from pvpy.workstation.commands import HANDLERS

    return HANDLERS[(args.noun, args.verb)]


def bind_target(args: argparse.Namespace) -> Target | None:
    """For a verb that talks to one device: resolve the device it was given
    (``pvpy.devices.resolve``: NAME, URL, --storage or $PVPY_DEVICE) and set
    ``args.url``/``args.storage`` (and ``args.token_file`` from a saved device).
    Returns the target, or None for other verbs. Raises UsageError."""
    if args.noun != "device" or args.verb not in TARGET_VERBS:
        return None
    from pvpy.devices import is_device_word, resolve

    word = args.device
    # `logs web` with the device from --storage or $PVPY_DEVICE: web is a container
    if (
        args.verb == "logs"
        and word is not None
        and (args.storage is not None or not is_device_word(word))
    ):
        args.containers, word = [word, *args.containers], None
    target = resolve(word, args.storage)
    args.url = target.url
    args.storage = str(target.storage) if target.storage is not None else None
    if target.token_file is not None and not args.token_file and not args.token:
        args.token_file = str(target.token_file)
    return target


def print_completion(args: argparse.Namespace) -> int:
    from pvpy._completion import completion_script

    print(completion_script(build_parser(), args.shell))
    return 0


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
    verb = getattr(args, "verb", None)  # `pvpy completion SHELL` has none
    narrating = (args.noun, verb) in (("device", "run"), ("device", "api"), ("image", "build"))
    quiet = "info" if narrating else "warning"
    configure(
        level="debug" if args.verbose else os.environ.get("PVPY_LOG_LEVEL", quiet),
        # PID 1 runs these at every boot: structlog's import alone costs ~0.15 s there;
        # the API helper lives as long as PID 1: structlog would be ~7 MiB of its PSS
        lean=(args.noun, verb)
        in (("device", "verify-installed"), ("device", "write-boot"), ("device", "api")),
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
