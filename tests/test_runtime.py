"""pvpy.device.runtime helpers that need no container (containers run in test_sandbox.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvpy import _run
from pvpy.device.runtime import Paths, Runtime, _remove_tree


def test_remove_tree_removes_everything_and_follows_no_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    work = tmp_path / "work"
    (work / "work" / "deep").mkdir(parents=True)
    (work / "work" / "deep" / "file").write_text("x")
    if os.geteuid() == 0:
        (work / "work").chmod(0)  # as overlayfs leaves its work/work (PID 1 is root)
    (work / "link-dir").symlink_to(outside)
    (work / "link-file").symlink_to(outside / "keep")
    (work / "dangling").symlink_to(tmp_path / "nowhere")
    _remove_tree(work)
    assert not os.path.lexists(work)
    assert (outside / "keep").read_text() == "keep"


def test_remove_tree_of_nothing_is_fine(tmp_path: Path) -> None:
    _remove_tree(tmp_path / "missing")


def test_delete_spawns_the_runtime_only_when_it_keeps_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def call(argv: list[str], **_kw: object) -> int:
        calls.append(list(argv))
        return 0

    monkeypatch.setattr(_run, "which", lambda program: f"/usr/bin/{program}")
    monkeypatch.setattr(_run, "call", call)
    runtime = Runtime(Paths(storage=tmp_path / "storage", run=tmp_path / "run"), "crun")
    runtime.delete("app")
    assert calls == []  # no state: nothing to forget, nothing spawned
    (tmp_path / "run" / "crun" / "app").mkdir(parents=True)
    runtime.delete("app")
    assert calls and calls[0][-3:] == ["delete", "--force", "app"]
