"""PID 1's flags: ``Options`` with their defaults, and a parser without argparse.

``pvpy init --help`` prints ``usage()``; the sandbox launcher and a board's
initramfs /init write the argv (see ``OPTIONS``).
"""

from __future__ import annotations


class Options:
    """PID 1's flags, with their defaults (``pvpy init --help`` lists them)."""

    sandbox: bool = False
    storage: str = "/storage"
    run_dir: str = "/run/pvpy"
    boot_revision: int | None = None
    trying: bool = False
    failed_try: int | None = None
    runtime: str = "crun"
    watchdog: str = "/dev/watchdog"
    watchdog_interval: float = 5.0
    bootenv: str | None = None
    api: bool = False
    api_tcp: str | None = None
    api_plain_http: bool = False
    pull: str | None = None
    pull_interval: float = 60.0
    pull_plain_http: bool = False
    commit_delay: float = 25.0
    commit_timeout: float = 120.0
    board: str | None = None
    log_level: str | None = None


# flag -> (kind, metavar, help). kind: "flag" (no value), str, int, float or a tuple of
# choices. Not argparse: its import (~0.7 MiB with gettext and locale) would stay in
# PID 1 for its whole life, to parse an argv that the launcher or the image wrote.
OPTIONS: dict[str, tuple[object, str, str]] = {
    "--sandbox": ("flag", "", "run in a sandbox (set by `device run`)"),
    "--storage": (str, "DIR", "storage root"),
    "--run-dir": (str, "DIR", "volatile state dir"),
    "--boot-revision": (int, "N", "revision the bootloader chose"),
    "--trying": ("flag", "", "the boot revision is on trial"),
    "--failed-try": (int, "N", "a try revision that did not commit"),
    "--runtime": (("crun", "runc"), "crun|runc", "OCI runtime"),
    "--watchdog": (str, "DEV", "watchdog device"),
    "--watchdog-interval": (float, "SECONDS", "seconds between feeds"),
    "--bootenv": (str, "KIND:PATH", "boot environment, e.g. file:/storage/bootenv"),
    "--api": ("flag", "", "run the device API server (unix socket RUN_DIR/api.sock)"),
    "--api-tcp": (str, "HOST:PORT",
                  "also serve the API on TCP: TLS, credentials in STORAGE/config/api-token"),
    "--api-plain-http": ("flag", "", "serve the TCP API without TLS (a trusted network only)"),
    "--pull": (str, "REGISTRY/REPO:TAG",
               "poll this registry tag for new revisions (else STORAGE/config/pull.json)"),
    "--pull-interval": (float, "SECONDS", "seconds between polls"),
    "--pull-plain-http": ("flag", "", "the registry speaks HTTP"),
    "--commit-delay": (float, "SECONDS", "seconds all goals must hold before an update commits"),
    "--commit-timeout": (float, "SECONDS", "seconds an update may take to meet its goals"),
    "--board": (str, "FILE", "board mode (the image's /init): modules, storage, network and "
                "the boot choice from this board file and /proc/cmdline"),
    "--log-level": (str, "LEVEL", "debug, info, warning or error (default $PVPY_LOG_LEVEL, info)"),
}  # fmt: skip


def parse_options(argv: list[str]) -> tuple[Options, list[str]]:
    """``--flag``, ``--name VALUE`` and ``--name=VALUE`` into Options.

    Returns the options and the problems found (unknown flag, missing or bad
    value); a flag with a problem keeps its default. PID 1 logs the problems
    and boots anyway: refusing to start would panic the kernel.
    """
    opts = Options()
    problems: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        name, has_value, value = word.partition("=")
        if name not in OPTIONS:
            problems.append(f"unknown argument {word!r}")
            continue
        kind = OPTIONS[name][0]
        attr = name[2:].replace("-", "_")
        if kind == "flag":
            if has_value:
                problems.append(f"{name} takes no value")
            else:
                setattr(opts, attr, True)
            continue
        if not has_value:
            if i == len(argv):
                problems.append(f"{name} needs a value")
                continue
            value = argv[i]
            i += 1
        try:
            if isinstance(kind, tuple):
                if value not in kind:
                    raise ValueError(f"one of {', '.join(kind)}")
                setattr(opts, attr, value)
            elif kind is int:
                setattr(opts, attr, int(value))
            elif kind is float:
                setattr(opts, attr, float(value))
            else:
                setattr(opts, attr, value)
        except ValueError as e:
            problems.append(f"{name} {value!r}: {e}")
    return opts, problems


def usage() -> str:
    rows = [("-h, --help", "show this help and exit")]
    for name, (_kind, metavar, text) in OPTIONS.items():
        default = getattr(Options, name[2:].replace("-", "_"))
        if default not in (None, False):
            text += f" (default {default})"
        rows.append((f"{name} {metavar}" if metavar else name, text))
    width = max(len(flag) for flag, _ in rows) + 2
    lines = ["usage: pvpy init [OPTIONS]", "", "Run as PID 1 (or in the sandbox).", "", "options:"]
    lines += [f"  {flag:<{width}}{text}" for flag, text in rows]
    return "\n".join(lines) + "\n"
