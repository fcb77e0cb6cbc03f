"""pvpy._run: finding programs on the children's PATH (spawn and call run in the device tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pvpy import _run


def test_which_finds_what_shutil_finds() -> None:
    for program in ("sh", "ls", "no-such-program-pvpy"):
        assert _run.which(program) == shutil.which(program, path=_run.child_env()["PATH"])


def test_which_skips_directories_and_files_that_do_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tool").mkdir()  # a directory named like the program
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tool").write_text("#!/bin/sh\n")  # not executable
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "c" / "tool").chmod(0o755)
    path = os.pathsep.join(str(tmp_path / d) for d in "abc")
    monkeypatch.setenv("PATH", path)
    expected = str(tmp_path / "c" / "tool")
    assert _run.which("tool") == expected
    assert _run.which(expected) == expected
    assert _run.which(str(tmp_path / "b" / "tool")) is None
