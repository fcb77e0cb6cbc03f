"""README "Using it", run as written: its own code blocks, in order, from a fresh directory.

Each line of each ``sh`` block of the section runs as a new user would type it (``bash -c``),
from a directory holding only what a clone has that the commands read (``.venv`` and
``examples``, linked). A line whose comment says ``exit N`` must exit N, any other 0; a
comment saying "up to date" must be what the command prints. ``pvpy device run`` is the
command a user leaves running in its own terminal: it runs in the background, and the next
line waits (as that user would) until the device's goals are met; after a ``poweroff`` line,
until it has ended. A block after ``<!-- not run by tests/test_readme.py: WHY -->`` is not
run (a registry, QEMU); the test checks there are only those.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.device import need_root_tools

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
NOT_RUN = "<!-- not run by tests/test_readme.py:"
EXIT = re.compile(r"\bexit (\d+)\b")


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str) -> Iterator[tuple[bool, list[str]]]:
    """Each ``sh`` block: whether it runs, and its lines."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "```sh":
            continue
        end = lines.index("```", i + 1)
        runs = not (i > 0 and lines[i - 1].startswith(NOT_RUN))
        yield runs, lines[i + 1 : end]


def comment_of(line: str) -> str:
    # the comments here never hold a quoted '#': the first ' #' starts the comment
    return line.split(" #", 1)[1] if " #" in line else ""


def test_the_section_has_what_the_issue_asks() -> None:
    text = section((REPO / "README.md").read_text(), "Using it")
    skipped = [lines for runs, lines in blocks(text) if not runs]
    run = [line for runs, lines in blocks(text) if runs for line in lines]
    assert len(skipped) == 2, "only the registry and the QEMU blocks are not run"
    assert any("state build" in line and "rev2/" in line for line in run)
    assert any(line.startswith("pvpy device rollback") for line in run)
    after_rollback = run[next(i for i, ln in enumerate(run) if "device rollback" in ln) :]
    assert any("device push" in line for line in after_rollback)
    assert not any("[" in line.split(" #")[0] for line in run), "no [optional] args as written"


class Session:
    """The user's terminals: one shell per command, a device running in the background."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PVPY_")}
        self.env.update(XDG_CONFIG_HOME=str(work / "config"), PVPY_DEBUG="")
        self.env["PATH"] = f"{work / '.venv' / 'bin'}:{self.env['PATH']}"
        self.device: subprocess.Popen[bytes] | None = None
        self.device_log = work / "device-run.log"
        self.transcript: list[str] = []

    def run(self, line: str) -> None:
        if line.startswith("pvpy device run "):
            self.start_device(line)
            return
        self.wait_ready()
        result = subprocess.run(["bash", "-c", line], cwd=self.work, env=self.env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        self.transcript.append(f"$ {line}\n{result.stdout}{result.stderr}")
        want = EXIT.search(comment_of(line))
        expected = int(want.group(1)) if want else 0
        assert result.returncode == expected, self.why(f"{line!r} exited {result.returncode}")
        if expected:
            stderr = result.stderr.strip().splitlines()
            assert len(stderr) == 1 and stderr[0].startswith("pvpy: error: "), self.why(line)
        if "up to date" in comment_of(line):
            assert "up to date" in result.stdout, self.why(line)
        if "poweroff" in line.split(" #")[0]:
            self.wait_device_end()

    def start_device(self, line: str) -> None:
        assert self.device is None, "a device already runs"
        out = open(self.device_log, "ab")  # noqa: SIM115 - the child's, closed by wait_device_end
        self.device = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.work,
                                       env=self.env, stdout=out, stderr=out,
                                       start_new_session=True)  # fmt: skip
        out.close()
        self.ready = False

    def wait_ready(self, timeout: float = 90) -> None:
        """What the user does before typing in the other terminal: wait for the boot."""
        if self.device is None or self.ready:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.device.poll() is None, self.why("pvpy device run ended")
            status = subprocess.run(
                ["pvpy", "device", "status", "--storage", "dev/", "--json"], cwd=self.work,
                env=self.env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if status.returncode == 0 and json.loads(status.stdout).get("all_goals_met"):
                self.ready = True
                return
            time.sleep(0.5)
        raise AssertionError(self.why("the device never met its goals"))

    def wait_device_end(self, timeout: float = 60) -> None:
        assert self.device is not None
        try:
            code = self.device.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.why("the device did not power off")) from None
        self.device = None
        assert code == 0, self.why(f"pvpy device run exited {code}")

    def why(self, what: str) -> str:
        log = self.device_log.read_text(errors="replace") if self.device_log.exists() else ""
        return (
            f"{what}\n--- transcript:\n{''.join(self.transcript[-6:])}\n--- device:\n{log[-3000:]}"
        )

    def close(self) -> None:
        if self.device is not None and self.device.poll() is None:
            os.killpg(self.device.pid, signal.SIGINT)  # Ctrl-C: powers off in order
            try:
                self.device.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.device.pid, signal.SIGKILL)
                self.device.wait()


def test_using_it_runs_as_written(tmp_path: Path) -> None:
    need_root_tools()
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    text = section((REPO / "README.md").read_text(), "Using it")
    session = Session(tmp_path)
    try:
        for runs, lines in blocks(text):
            if not runs:
                continue
            for line in lines:
                if line.strip() and not line.lstrip().startswith("#"):
                    session.run(line)
        assert session.device is None, "the README leaves a device running"
    finally:
        session.close()
    said = "".join(session.transcript)
    # what the issue asked the sequence to show, in the commands' own words
    assert "--revision 3" in said  # the refusal says which number to build
    assert "rollback from 2" in said  # history says what the rollback did
    assert re.search(r"committed after TESTING of \d+ s", said)  # how long each update tested
    assert "not running" in said  # status of a device that is off
    banner = (tmp_path / "device-run.log").read_text()
    assert "Ctrl-C" in banner and "control.sock" in banner and "https://127.0.0.1:8000" in banner
