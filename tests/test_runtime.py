"""pvpy.device.runtime and .confinement helpers that need no container (containers run in
test_sandbox.py and test_hardening.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpy import _run
from pvpy.device.confinement import (
    CGROUP1,
    CGROUP1_SYSTEMD,
    CGROUP2,
    CGROUP2_DELEGATING,
    default_seccomp,
    read_cgroup_layout,
)
from pvpy.device.runtime import Paths, Runtime, oci_config, signal_argument
from pvpy.state.model import Container


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


def _container(**fields: object) -> Container:
    doc: dict[str, object] = {
        "rootfs": {"sha256": "a" * 64, "size": 1, "format": "squashfs"},
        "args": ["/bin/sh"],
        **fields,
    }
    return Container.from_dict("c", doc)


def _config(c: Container, tmp_path: Path) -> dict[str, Any]:
    return oci_config(
        c,
        rootfs=tmp_path,
        volumes={},
        control_dir=tmp_path / "ctl",
        cgroups_path="pvpy/c",
        manager_file=tmp_path / "manager",
    )


def test_an_app_is_confined_and_the_host_os_is_not(tmp_path: Path) -> None:
    app = _config(_container(), tmp_path)
    linux = app["linux"]
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    allowed = {(d["type"], d["major"], d.get("minor")) for d in linux["resources"]["devices"][1:]}
    assert ("c", 1, 3) in allowed and ("c", 136, None) in allowed
    assert not any(d["type"] == "b" for d in linux["resources"]["devices"][1:])
    assert "CAP_NET_RAW" not in app["process"]["capabilities"]["bounding"]
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    sys_mount = next(m for m in app["mounts"] if m["destination"] == "/sys")
    assert "ro" in sys_mount["options"]

    host = _config(_container(role="host-os"), tmp_path)
    assert host["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "seccomp" not in host["linux"]


def test_an_app_gets_what_its_manifest_grants(tmp_path: Path) -> None:
    c = _container(
        devices=[{"path": "/dev/ttyUSB0", "type": "c", "major": 188, "minor": 0, "access": "r"}],
        seccomp="unconfined",
        privileges={"sys": "rw"},
        user={"uid": 1000, "gid": 20},
    )
    linux = _config(c, tmp_path)["linux"]
    assert linux["resources"]["devices"][-1] == {
        "allow": True, "type": "c", "major": 188, "minor": 0, "access": "r"}  # fmt: skip
    assert linux["devices"] == [{"path": "/dev/ttyUSB0", "type": "c", "major": 188, "minor": 0,
                                 "fileMode": 0o660, "uid": 1000, "gid": 20}]  # fmt: skip
    assert "seccomp" not in linux
    sys_mount = next(m for m in _config(c, tmp_path)["mounts"] if m["destination"] == "/sys")
    assert "rw" in sys_mount["options"] and "ro" not in sys_mount["options"]


def test_default_seccomp_follows_capabilities_and_architecture() -> None:
    def allowed(profile: dict[str, Any]) -> set[str]:
        return {
            name
            for rule in profile["syscalls"]
            if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
            for name in rule["names"]
        }

    amd64 = default_seccomp(["CAP_KILL"], machine="x86_64", release="6.1.0-13-amd64")
    assert amd64["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert "arch_prctl" in allowed(amd64) and "bpf" not in allowed(amd64)
    # without CAP_SYS_ADMIN its syscalls fail with EPERM (the excludes rule applies)
    denied = next(rule for rule in amd64["syscalls"] if "bpf" in rule["names"])
    assert (denied["action"], denied["errnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    admin = default_seccomp(["CAP_SYS_ADMIN"], machine="x86_64", release="6.1.0")
    assert "bpf" in allowed(admin)
    arm64 = default_seccomp([], machine="aarch64", release="6.1.0")
    assert arm64["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in allowed(arm64) and "set_tls" in allowed(arm64)
    # only fields the OCI runtime-spec knows
    for rule in amd64["syscalls"]:
        assert set(rule) <= {"names", "action", "errnoRet", "args"}, rule


def test_readiness_exec_has_no_new_privileges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_run, "which", lambda program: f"/usr/bin/{program}")
    runtime = Runtime(Paths(storage=tmp_path / "storage", run=tmp_path / "run"), "crun")
    argv = runtime.exec_argv(_container(), ["true"])
    assert argv[argv.index("exec") :] == ["exec", "--no-new-privs", "c", "true"]


def test_real_time_stop_signals_go_to_the_runtime_as_numbers() -> None:
    assert signal_argument("RTMIN+3") == "37"  # systemd's halt
    assert signal_argument("RTMIN+0") == "34"
    assert signal_argument("RTMIN+30") == "64"
    assert signal_argument("TERM") == "TERM"


def test_every_container_is_told_who_runs_it(tmp_path: Path) -> None:
    """systemd.io/CONTAINER_INTERFACE: container= (a manifest cannot say otherwise) and
    /run/systemd/container, for apps and the host OS alike."""
    for c in (_container(env={"container": "docker"}), _container(role="host-os")):
        config = _config(c, tmp_path)
        env = config["process"]["env"]
        assert [e for e in env if e.startswith("container=")] == ["container=pvpy"]
        marker = next(m for m in config["mounts"] if m["destination"] == "/run/systemd/container")
        assert marker["source"] == str(tmp_path / "manager")
        for scratch in ("/run", "/tmp"):  # systemd's container interface: both tmpfs
            mount = next(m for m in config["mounts"] if m["destination"] == scratch)
            assert mount["type"] == "tmpfs"


def _mount(config: dict[str, Any], destination: str) -> dict[str, Any]:
    return next(m for m in config["mounts"] if m["destination"] == destination)


@pytest.mark.parametrize("layout", [CGROUP1, CGROUP1_SYSTEMD, CGROUP2, CGROUP2_DELEGATING])
def test_every_container_gets_its_own_cgroup_namespace_and_mount(
    tmp_path: Path, layout: str
) -> None:
    for c in (_container(role="host-os"), _container(), _container(namespaces=["cgroup"])):
        config = oci_config(c, rootfs=tmp_path, volumes={}, control_dir=tmp_path / "ctl",
                            cgroups_path="pvpy/c", manager_file=tmp_path / "m",
                            cgroup_layout=layout)  # fmt: skip
        assert config["linux"]["namespaces"].count({"type": "cgroup"}) == 1
        destinations = [m["destination"] for m in config["mounts"]]
        # after /sys: for the host OS it covers the cgroup mounts the rbind of PID 1's
        # /sys brings
        assert destinations.index("/sys/fs/cgroup") > destinations.index("/sys")
        cgroup = _mount(config, "/sys/fs/cgroup")
        assert cgroup["type"] == "cgroup"
        # writable only where that cannot lift the app's limits
        writable = c.is_host_os or layout == CGROUP2_DELEGATING
        assert ("rw" if writable else "ro") in cgroup["options"]
        if layout == CGROUP1_SYSTEMD and not c.is_host_os:
            named = _mount(config, "/sys/fs/cgroup/systemd")
            assert named["source"] == "/sys/fs/cgroup/systemd/pvpy/c"
            assert named["type"] == "bind" and "rw" in named["options"]
        else:
            assert "/sys/fs/cgroup/systemd" not in destinations


def test_the_cgroup_layout_is_read_from_mountinfo(tmp_path: Path) -> None:
    def layout(*lines: str) -> str:
        (tmp_path / "mountinfo").write_text("".join(line + "\n" for line in lines))
        return read_cgroup_layout(str(tmp_path / "mountinfo"))

    proc = "22 1 0:5 / /proc rw,nosuid - proc proc rw"
    v2 = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw,{}"
    assert layout(proc, v2.format("nsdelegate,memory_recursiveprot")) == CGROUP2_DELEGATING
    assert layout(proc, v2.format("memory_recursiveprot")) == CGROUP2
    assert (
        layout(
            "31 24 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755",
            "32 31 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            "33 31 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd",
        )
        == CGROUP1_SYSTEMD
    )
    assert layout("32 31 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory") == CGROUP1
    assert read_cgroup_layout(str(tmp_path / "absent")) == CGROUP1


def test_the_console_is_bound_over_dev_console_after_dev(tmp_path: Path) -> None:
    for c in (_container(), _container(role="host-os")):
        config = oci_config(c, rootfs=tmp_path, volumes={}, control_dir=tmp_path / "ctl",
                            cgroups_path="pvpy/c", manager_file=tmp_path / "m",
                            console="/dev/pts/7")  # fmt: skip
        destinations = [m["destination"] for m in config["mounts"]]
        assert destinations.index("/dev/console") > destinations.index("/dev")
        assert _mount(config, "/dev/console")["source"] == "/dev/pts/7"
        assert config["process"]["terminal"] is False  # stdout and stderr stay a pipe
    assert "/dev/console" not in [
        m["destination"] for m in _config(_container(), tmp_path)["mounts"]
    ]
