"""State format v1: schema, canonical JSON, model round trip, clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvpy.errors import ManifestError
from pvpy.state import State, canonical, load_schema, parse_unverified, validate
from tests.conftest import minimal_state

FULL: dict[str, Any] = {
    "#spec": "pvpy-state@1",
    "revision": 7,
    "created": "2026-11-23T10:00:00Z",
    "expires": "2027-11-23T10:00:00Z",
    "description": "everything set",
    "annotations": {"build": "ci-42"},
    "bsp": {
        "kernel": {"sha256": "1" * 64, "size": 10},
        "initrd": {"sha256": "2" * 64, "size": 20},
        "dtb": {"sha256": "3" * 64, "size": 30},
        "modules": {"sha256": "4" * 64, "size": 40, "format": "squashfs"},
        "firmware": {"sha256": "5" * 64, "size": 50, "format": "squashfs"},
        "cmdline": "console=ttyAMA0",
    },
    "groups": [{"name": "root", "timeout_ms": 20000}, {"name": "app"}],
    "containers": {
        "os": {
            "role": "host-os",
            "rootfs": {"sha256": "6" * 64, "size": 60, "format": "squashfs"},
            "args": ["/sbin/init"],
            "mounts": [{"type": "bind", "source": "/dev", "target": "/dev", "options": ["rbind"]}],
        },
        "web": {
            "rootfs": {"sha256": "7" * 64, "size": 70, "format": "squashfs"},
            "args": ["/bin/httpd", "-f"],
            "env": {"PORT": "80"},
            "cwd": "/www",
            "user": {"uid": 33, "gid": 33},
            "hostname": "web",
            "capabilities": ["CAP_NET_BIND_SERVICE"],
            "namespaces": ["pid", "uts"],
            "network": "isolated",
            "cgroup": {"memory_max": 33554432, "cpu_weight": 100, "pids_max": 64},
            "writable": "boot",
            "volumes": [{"name": "data", "target": "/data", "persistence": "permanent"}],
            "restart": {"policy": "always", "max_retries": 3, "backoff_initial_ms": 100},
            "status_goal": "READY",
            "readiness": {"type": "tcp", "port": 80},
            "depends_on": ["os"],
            "stop_timeout_ms": 2000,
        },
    },
}


def test_schema_is_valid_json_schema() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_full_state_validates_and_round_trips() -> None:
    validate(FULL)
    state = State.from_dict(FULL)
    assert state.revision == 7
    assert state.container("web").cgroup.memory_max == 32 * 1024 * 1024
    assert state.host_os is not None and state.host_os.name == "os"
    # Model round trip: to_dict writes every default out, from_dict reads it back.
    again = State.from_dict(state.to_dict())
    assert again == state
    validate(state.to_dict())
    # Serialized form is stable: encoding twice gives the same bytes.
    assert canonical.encode(again.to_dict()) == canonical.encode(state.to_dict())


def test_defaults_are_filled() -> None:
    state = State.from_dict(minimal_state())
    app = state.container("app")
    assert app.role == "app" and app.group == "app"
    assert app.restart.policy == "on-failure"
    assert "pid" in app.namespaces
    assert [g.name for g in state.groups] == ["data", "root", "platform", "app"]


def test_objects_lists_bsp_and_rootfs() -> None:
    state = State.from_dict(FULL)
    assert set(state.objects()) == {str(i) * 64 for i in range(1, 8)}


def test_start_order_follows_groups_then_dependencies() -> None:
    doc = minimal_state()
    ref = doc["containers"]["app"]["rootfs"]
    doc["containers"] = {
        "b": {"rootfs": ref, "args": ["x"], "depends_on": ["c"]},
        "a": {"rootfs": ref, "args": ["x"]},
        "c": {"rootfs": ref, "args": ["x"]},
        "os": {"rootfs": ref, "args": ["x"], "role": "host-os"},
        "d": {"rootfs": ref, "args": ["x"], "group": "platform"},
    }
    validate(doc)
    order = [c.name for c in State.from_dict(doc).start_order()]
    assert order == ["os", "d", "a", "c", "b"]


def test_canonical_encoding() -> None:
    assert (
        canonical.encode({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()
    )
    with pytest.raises(ManifestError, match="floats"):
        canonical.encode({"a": 1.5})
    assert canonical.is_canonical(b'{"a":1}')
    assert not canonical.is_canonical(b'{"a": 1}')


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"a":1,"a":2}', "duplicate key"),
        (b"[NaN]", "NaN is not valid JSON"),
        (b"{", "not JSON"),
        (b"[" * 100000 + b"]" * 100000, "not JSON"),
    ],
)
def test_decode_refuses_bad_json(data: bytes, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        canonical.decode(data)


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(FULL))
    target = doc
    for p in path[:-1]:
        target = target[p]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "where", "reason"),
    [
        (["revision"], 0, "$.revision", "less than the minimum"),
        (["revision"], "7", "$.revision", "is not of type 'integer'"),
        (["#spec"], "pvpy-state@2", "$['#spec']", "was expected"),
        (
            ["containers", "web", "restart", "policy"],
            "sometimes",
            "$.containers.web.restart.policy",
            "is not one of",
        ),
        (
            ["containers", "web", "rootfs", "sha256"],
            "../../etc/passwd",
            "$.containers.web.rootfs.sha256",
            "does not match",
        ),
        (["containers", "web", "args"], [], "$.containers.web.args", "should be non-empty"),
        (["containers", "web", "bogus"], 1, "$.containers.web", "Additional properties"),
        (["containers", "Bad Name"], {}, "$.containers", "does not match"),
        (
            ["containers", "web", "volumes", 0, "persistence"],
            "forever",
            "$.containers.web.volumes[0].persistence",
            "is not one of",
        ),
        (
            ["containers", "web", "depends_on"],
            ["nope"],
            "$.containers.web.depends_on[0]",
            "unknown container",
        ),
        (["containers", "web", "depends_on"], ["web"], "$.containers.web.depends_on[0]", "itself"),
        (["containers", "web", "group"], "nogroup", "$.containers.web.group", "unknown group"),
        (["containers", "web", "readiness"], DELETE, "$.containers.web", "needs a readiness"),
        (["containers", "web", "readiness"], {"type": "tcp"}, "$.containers.web.readiness", "port"),
        (
            ["containers", "os", "depends_on"],
            ["web"],
            "$.containers.os.depends_on[0]",
            "starts after",
        ),
        (["expires"], "tomorrow", "$.expires", "does not match"),
        (
            ["containers", "web", "cgroup", "memory_max"],
            10,
            "$.containers.web.cgroup.memory_max",
            "less than the minimum",
        ),
    ],
)
def test_validation_errors_name_path_and_reason(
    path: list[Any], value: Any, where: str, reason: str
) -> None:
    with pytest.raises(ManifestError) as info:
        validate(mutate(path, value))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(where + ":"), message
    assert reason in message, message


def test_dependency_cycle_is_named() -> None:
    doc = minimal_state()
    ref = doc["containers"]["app"]["rootfs"]
    doc["containers"] = {
        "a": {"rootfs": ref, "args": ["x"], "depends_on": ["b"]},
        "b": {"rootfs": ref, "args": ["x"], "depends_on": ["a"]},
    }
    with pytest.raises(ManifestError, match="cycle: a -> b -> a"):
        validate(doc)


def test_two_host_os_refused() -> None:
    doc = mutate(["containers", "web", "role"], "host-os")
    with pytest.raises(ManifestError, match="only one host-os"):
        validate(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bytes_give_a_clear_error(data: bytes) -> None:
    try:
        parse_unverified(data)
    except ManifestError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_garbage_documents_give_a_clear_error(doc: Any) -> None:
    try:
        validate(doc)
    except ManifestError as e:
        assert "\n" not in str(e) and str(e).startswith("$")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(list(FULL["containers"]["web"])), json_values), max_size=3)
)
def test_mutated_containers_never_crash(changes: list[tuple[str, Any]]) -> None:
    doc = json.loads(json.dumps(FULL))
    for key, value in changes:
        doc["containers"]["web"][key] = value
    try:
        validate(doc)
    except ManifestError as e:
        assert "\n" not in str(e)
    else:  # whatever passes validation must load into the model
        State.from_dict(doc).to_dict()


# -- hardening (#13): names end where they seem to, app privileges are said out loud --

ROOTFS = {"sha256": "a" * 64, "size": 1, "format": "squashfs"}


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda d: d["containers"].update({"web\n": d["containers"]["app"]}), "$.containers"),
        (
            lambda d: d["containers"]["app"].update(
                volumes=[{"name": "data\n", "target": "/data", "persistence": "boot"}]
            ),
            "$.containers.app.volumes[0].name",
        ),
        (lambda d: d.update(groups=[{"name": "app\n"}]), "$.groups[0].name"),
        (
            lambda d: d["containers"]["app"]["rootfs"].update(sha256="a" * 64 + "\n"),
            "$.containers.app.rootfs.sha256",
        ),
        (lambda d: d.update(fleet="acme/demo\n"), "$.fleet"),
        (lambda d: d.update(created="2026-11-23T10:00:00Z\n"), "$.created"),
        (lambda d: d["containers"]["app"].update(hostname="web\n"), "$.containers.app.hostname"),
        (
            lambda d: d["containers"]["app"].update(capabilities=["CAP_KILL\n"]),
            "$.containers.app.capabilities[0]",
        ),
    ],
    ids=["container", "volume", "group", "sha256", "fleet", "timestamp", "hostname", "cap"],
)
def test_a_trailing_newline_is_not_part_of_a_name(change: Any, path: str) -> None:
    # Python's re.search lets "$" match before a final "\n": the patterns must not
    doc = minimal_state()
    change(doc)
    with pytest.raises(ManifestError) as e:
        validate(doc)
    assert e.value.path == path and "does not match" in e.value.reason


def test_app_defaults_are_podmans_capabilities_seccomp_and_no_host_access() -> None:
    doc = minimal_state()
    doc["containers"]["os"] = {"role": "host-os", "rootfs": ROOTFS, "args": ["/sbin/init"]}
    state = State.from_dict(doc)
    app, host = state.container("app"), state.container("os")
    assert set(app.capabilities) == {
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
        "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
        "CAP_SYS_CHROOT",
    }  # fmt: skip
    assert (app.seccomp, app.privileges.host_mounts, app.privileges.sys) == (
        "default", False, "ro")  # fmt: skip
    assert (host.seccomp, host.privileges.host_mounts, host.privileges.sys) == (
        "unconfined", True, "rw")  # fmt: skip
    # every default is written out: a reviewer sees them in state.json
    written = state.to_dict()["containers"]["app"]
    assert written["seccomp"] == "default" and written["devices"] == []
    assert written["privileges"] == {"host_mounts": False, "sys": "ro"}
    assert State.from_dict(state.to_dict()) == state


@pytest.mark.parametrize(
    ("container", "path", "reason"),
    [
        ({"mounts": [{"type": "bind", "source": "/etc", "target": "/host-etc"}]},
         "$.containers.app.mounts[0]", "privileges.host_mounts: true"),
        ({"mounts": [{"type": "sysfs", "target": "/sys2"}]},
         "$.containers.app.mounts[0]", "privileges.sys: rw"),
        ({"devices": [{"path": "/dev/../etc/x", "type": "c", "major": 1, "minor": 3}]},
         "$.containers.app.devices[0].path", "'..'"),
        ({"devices": [{"path": "/dev/ttyUSB0", "type": "c", "major": 188, "minor": 0,
                       "access": "x"}]},
         "$.containers.app.devices[0].access", "does not match"),
        ({"seccomp": "lenient"}, "$.containers.app.seccomp", "is not one of"),
        ({"role": "host-os", "privileges": {"host_mounts": False}},
         "$.containers.app.privileges", "privileged"),
        ({"role": "host-os", "devices": [{"path": "/dev/x", "type": "c", "major": 1,
                                          "minor": 3}]},
         "$.containers.app.devices", "every device"),
    ],
)  # fmt: skip
def test_host_access_needs_a_visible_opt_in(
    container: dict[str, Any], path: str, reason: str
) -> None:
    doc = minimal_state()
    doc["containers"]["app"].update(container)
    with pytest.raises(ManifestError) as e:
        validate(doc)
    assert e.value.path == path and reason in e.value.reason, str(e.value)
    assert "\n" not in str(e.value)


def test_opted_in_host_access_validates_and_round_trips() -> None:
    doc = minimal_state()
    doc["containers"]["app"].update(
        mounts=[
            {"type": "bind", "source": "/etc", "target": "/host-etc", "options": ["ro"]},
            {"type": "sysfs", "target": "/sys2"},
            {"type": "tmpfs", "target": "/scratch"},  # not the host's: no opt-in needed
        ],
        privileges={"host_mounts": True, "sys": "rw"},
        devices=[{"path": "/dev/ttyUSB0", "type": "c", "major": 188, "minor": 0}],
        seccomp="unconfined",
    )
    validate(doc)
    state = State.from_dict(doc)
    app = state.container("app")
    assert app.devices[0].access == "rw" and app.seccomp == "unconfined"
    validate(state.to_dict())
    assert State.from_dict(state.to_dict()) == state


@pytest.mark.parametrize("name", ["TERM", "WINCH", "KILL", "RTMIN+0", "RTMIN+3", "RTMIN+30"])
def test_stop_signal_accepts_real_time_signals(name: str) -> None:
    validate(mutate(["containers", "web", "stop_signal"], name))


@pytest.mark.parametrize("name", ["SIGTERM", "RTMIN+31", "RTMIN+03", "RTMIN+", "RTMIN-1", "STOP"])
def test_stop_signal_refuses_what_no_runtime_sends(name: str) -> None:
    with pytest.raises(ManifestError, match=r"^\$\.containers\.web\.stop_signal: "):
        validate(mutate(["containers", "web", "stop_signal"], name))


@pytest.mark.parametrize(
    ("image", "state"),
    [("SIGRTMIN+3", "RTMIN+3"), ("SIGQUIT", "QUIT"), ("37", "RTMIN+3"), ("3", "QUIT"),
     ("SIGRTMIN", "RTMIN+0"), ("SIGRTMAX-2", "RTMIN+28"), ("winch", "WINCH"), ("", None)],
)  # fmt: skip
def test_an_images_stop_signal_is_named_as_a_state_names_it(image: str, state: str | None) -> None:
    from pvpy.workstation.pack import _stop_signal_name

    assert _stop_signal_name(image, "config") == state
