"""pvpy.device.runtime and .confinement helpers that need no container (containers run in
test_sandbox.py and test_hardening.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpy import _run
from pvpy.device.confinement import default_seccomp
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
        run = next(m for m in config["mounts"] if m["destination"] == "/run")
        assert run["type"] == "tmpfs"


def test_the_host_os_gets_its_own_cgroup_namespace_and_mount(tmp_path: Path) -> None:
    host = _config(_container(role="host-os"), tmp_path)
    assert {"type": "cgroup"} in host["linux"]["namespaces"]
    destinations = [m["destination"] for m in host["mounts"]]
    # after /sys, so it covers the cgroup mounts the rbind of PID 1's /sys brings
    assert destinations.index("/sys/fs/cgroup") > destinations.index("/sys")
    cgroup = host["mounts"][destinations.index("/sys/fs/cgroup")]
    assert cgroup["type"] == "cgroup" and "rw" in cgroup["options"]
    # a manifest that already asks for it gets it once
    twice = _config(_container(role="host-os", namespaces=["pid", "cgroup"]), tmp_path)
    assert twice["linux"]["namespaces"].count({"type": "cgroup"}) == 1
