"""Container logs are capped: one rotation, never more than two files."""

from __future__ import annotations

from pathlib import Path

from pvpy.device.logsink import LogSink


def test_log_rotates_at_cap(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "app.log"
    sink = LogSink(path, cap=100)
    for i in range(30):
        sink.write(f"line {i:02d}\n".encode())  # 8 bytes each
    sink.close()
    rotated = path.with_name("app.log.1")
    assert path.stat().st_size <= 100 and rotated.stat().st_size <= 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["app.log", "app.log.1"]
    # the newest lines are in app.log, the ones before in app.log.1, in order
    text = rotated.read_text() + path.read_text()
    assert text.endswith("line 29\n")
    numbers = [int(line.split()[1]) for line in text.splitlines()]
    assert numbers == list(range(numbers[0], 30))


def test_log_appends_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    LogSink(path).write(b"first run\n")
    sink = LogSink(path)
    sink.write(b"second run\n")
    sink.close()
    assert path.read_text() == "first run\nsecond run\n"


def test_init_refuses_to_run_outside_pid1() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pvpy", "init"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not PID 1" in result.stderr
