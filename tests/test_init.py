"""pvpy.device.pid1 without a device: its flags and what it imports (PID 1 stays lean).

Booting PID 1 is tested in test_sandbox.py (sandbox) and test_init_device.py (device mode).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pvpy.device.pid1.options import OPTIONS, Options, parse_options

REPO = Path(__file__).resolve().parent.parent

# What PID 1 loads to boot and supervise, on a board and in the sandbox.
PID1_MODULES = (
    "pvpy.device.pid1, pvpy.device.pid1.process, pvpy.device.pid1.boot, pvpy.device.pid1.control, "
    "pvpy.device.apply, pvpy.device.supervisor, pvpy.device.runtime, pvpy.device.update, pvpy.store, "
    "pvpy.state, pvpy.state.canonical, pvpy.state.model, pvpy.device.bootenv.file, "
    "pvpy.device.bootenv.uboot, pvpy.device.board, pvpy.device.board.modules, "
    "pvpy.device.pid1.loop, pvpy.device.pid1.children, pvpy.device.pid1.mounts, "
    "pvpy.device.pid1.shutdown, pvpy.device.pid1.watchdog, pvpy.device.pid1.options, "
    "pvpy.device.launcher, pvpy.device.managed, pvpy.device.readiness, pvpy.device.logsink, "
    "pvpy.device.storagelock, "
    "pvpy.device.confinement, pvpy.bootvars, pvpy.paths, pvpy.errors"
)
# Each costs PID 1 memory for its whole life and is not needed there (bench/findings.md).
# hashlib maps OpenSSL's libcrypto (~3 MiB of RSS); the boot verifier hashes, in a child.
NOT_IN_PID1 = ("argparse", "dataclasses", "inspect", "typing", "importlib.resources", "shutil",
               "subprocess", "structlog", "jsonschema", "cryptography", "asyncio", "yaml",
               "hashlib", "ssl")  # fmt: skip


def test_parse_the_argv_the_sandbox_writes() -> None:
    opts, problems = parse_options([
        "--sandbox", "--storage", "/s", "--run-dir", "/r", "--boot-revision", "3", "--trying",
        "--failed-try", "2", "--runtime", "runc", "--commit-delay=1.5", "--api-tcp",
        "127.0.0.1:8000", "--pull-plain-http",
    ])  # fmt: skip
    assert problems == []
    assert (opts.sandbox, opts.storage, opts.run_dir) == (True, "/s", "/r")
    assert (opts.boot_revision, opts.trying, opts.failed_try) == (3, True, 2)
    assert (opts.runtime, opts.commit_delay, opts.api_tcp) == ("runc", 1.5, "127.0.0.1:8000")
    assert opts.pull_plain_http and not opts.api
    assert opts.commit_timeout == Options.commit_timeout == 120.0


def test_defaults() -> None:
    opts, problems = parse_options([])
    assert problems == []
    assert (opts.storage, opts.run_dir, opts.watchdog) == ("/storage", "/run/pvpy", "/dev/watchdog")
    assert opts.boot_revision is None and opts.board is None and not opts.sandbox


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--storage"], "--storage needs a value"),
        (["--boot-revision", "x"], "--boot-revision 'x'"),
        (["--runtime", "docker"], "one of crun, runc"),
        (["--sandbox=1"], "--sandbox takes no value"),
        (["--watchdog-interval=soon"], "--watchdog-interval 'soon'"),
    ],
)
def test_bad_arguments_are_reported_and_the_defaults_kept(argv: list[str], problem: str) -> None:
    opts, problems = parse_options(argv)
    assert len(problems) == 1 and problem in problems[0]
    assert vars(opts) == {}  # nothing was set: every flag keeps its default


def test_help_lists_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "pvpy", "init", "--help"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0
    for flag in OPTIONS:
        assert flag in result.stdout
    assert "(default /storage)" in result.stdout


def test_bad_arguments_outside_pid1_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "pvpy", "init", "--bogus"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert "unknown argument '--bogus'" in result.stderr


def _loaded_after(code: str) -> list[str]:
    """Heavy modules in sys.modules after ``code``, in a bare interpreter (-S: no site)."""
    script = f"import sys\n{code}\nprint(' '.join(m for m in {NOT_IN_PID1!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout  # fmt: skip
    return out.split()


def test_pid1_modules_stay_lean() -> None:
    assert _loaded_after(f"import {PID1_MODULES}") == []


def test_python_m_pvpy_init_skips_the_cli() -> None:
    code = (
        "import runpy\n"
        "sys.argv = ['pvpy', 'init']\n"
        "try:\n"
        "    runpy.run_module('pvpy', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"  # not PID 1: exits 2 after parsing its flags
    )
    assert _loaded_after(code) == []
