"""pvpy.device.runtime helpers that need no container (containers run in test_sandbox.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvpy import _run
from pvpy.device.runtime import Paths, Runtime


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
