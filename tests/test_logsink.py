"""Container logs are capped (one rotation, never more than two files) and timed."""

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
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["app.log", "app.log.1", "app.log.1.idx", "app.log.idx"]  # with their times
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


# -- times and boots (the index beside each log) -----------------------------------


def _sink_in_new_process(path: Path, lines: list[str]) -> None:
    """A boot: a new PID 1 process opens the sink and writes."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from pvpy.device.logsink import LogSink\n"
        "s = LogSink(Path(sys.argv[1]))\n"
        "for line in sys.argv[2:]: s.write(line.encode() + b'\\n')\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), *lines], check=True)


def test_every_line_has_its_time_and_each_boot_a_line(tmp_path: Path) -> None:
    from pvpy.device.api._logs import LogFiles, LogOptions, read_entries

    logs = tmp_path / "logs"
    _sink_in_new_process(logs / "app.log", ["one", "two"])
    _sink_in_new_process(logs / "app.log", ["three"])
    # the log itself is the container's bytes, untouched
    assert (logs / "app.log").read_text() == "one\ntwo\nthree\n"
    entries = read_entries(logs / "app.log", "app")
    assert [(e.boot, e.data) for e in entries] == [
        (True, b""), (False, b"one\n"), (False, b"two\n"), (True, b""), (False, b"three\n"),
    ]  # fmt: skip
    times = [e.at for e in entries]
    assert all(t is not None for t in times) and times == sorted(times)  # type: ignore[type-var]
    text = LogFiles(logs, "app").tail(10).decode()
    assert text.count("-- boot ") == 2 and text.endswith("three\n")
    stamped = LogFiles(logs, "app", LogOptions(timestamps=True)).tail(1).decode().splitlines()
    assert len(stamped) == 2 and stamped[0].startswith("-- boot ")  # the boot of that line
    assert stamped[1].endswith("Z three") and stamped[1][:4].isdigit()


def test_since_until_and_json(tmp_path: Path) -> None:
    import json
    import time

    from pvpy.device.api._logs import LogFiles, LogOptions

    logs = tmp_path / "logs"
    _sink_in_new_process(logs / "app.log", ["old"])
    time.sleep(0.3)
    middle = time.time()
    time.sleep(0.3)
    _sink_in_new_process(logs / "app.log", ["new"])
    _sink_in_new_process(logs / "web.log", ["other"])
    since = LogFiles(logs, "app", LogOptions(since=middle)).tail(10).decode()
    assert "new" in since and "old" not in since
    until = LogFiles(logs, "app", LogOptions(until=middle)).tail(10).decode()
    assert "old" in until and "new" not in until
    docs = [
        json.loads(x) for x in LogFiles(logs, None, LogOptions(as_json=True)).tail(10).splitlines()
    ]
    lines = [(d["container"], d["line"]) for d in docs if not d["boot"]]
    assert lines == [("app", "old"), ("app", "new"), ("web", "other")]  # merged by time
    assert all(isinstance(d["time"], float) for d in docs)


def test_logs_without_an_index_read_as_before(tmp_path: Path) -> None:
    from pvpy.device.api._logs import LogFiles, LogOptions

    (tmp_path / "app.log").write_bytes(b"written before times\nno newline")
    assert LogFiles(tmp_path, "app").tail(5) == b"written before times\nno newline\n"
    # no time is known: outside any window
    assert LogFiles(tmp_path, "app", LogOptions(since=0.0)).tail(5) == b""


def test_a_torn_index_record_is_ignored(tmp_path: Path) -> None:
    from pvpy.device.api._logs import read_entries
    from pvpy.device.logsink import index_path

    path = tmp_path / "app.log"
    sink = LogSink(path)
    sink.write(b"kept\n")
    sink.close()
    with open(index_path(path), "ab") as f:
        f.write(b"\x01\x02\x03")  # a power cut in the middle of a record
    entries = [e for e in read_entries(path, "app") if not e.boot]
    assert [e.data for e in entries] == [b"kept\n"] and entries[0].at is not None


def test_the_index_rotates_with_its_log(tmp_path: Path) -> None:
    from pvpy.device.api._logs import LogFiles, read_entries
    from pvpy.device.logsink import index_path

    path = tmp_path / "app.log"
    sink = LogSink(path, cap=40)
    for i in range(12):
        sink.write(f"line {i:02d}\n".encode())
    sink.close()
    rotated = tmp_path / "app.log.1"
    assert index_path(rotated).exists() and index_path(path).exists()
    for log in (rotated, path):
        assert all(e.at is not None for e in read_entries(log, "app"))
    assert LogFiles(tmp_path, "app").tail(2) == b"line 10\nline 11\n"


def test_log_options_from_the_api_query() -> None:
    import pytest

    from pvpy.device.api._logs import LogOptions
    from pvpy.errors import UsageError

    o = LogOptions.from_query({"timestamps": "1", "format": "json", "since": "12.5"})
    assert o == LogOptions(timestamps=True, as_json=True, since=12.5, until=None)
    assert LogOptions.from_query({}) == LogOptions()
    for bad in ({"since": "10m"}, {"format": "xml"}):
        with pytest.raises(UsageError):
            LogOptions.from_query(bad)
