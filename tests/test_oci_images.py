"""Apps from images made by real tools keep the image's intent (#15, part 5).

The images are made here by Debian's ``umoci`` (an OCI layout: User, Volumes,
StopSignal, two layers), ``skopeo copy`` (that image as a docker-archive, and a
docker-archive back into an OCI layout) and ``buildah`` (a docker-format image
with a Healthcheck: umoci's OCI configs have no such field), never by pvpy.
What pvpy makes of them: users resolved through the image's own /etc/passwd and
/etc/group, volumes, the stop signal and the readiness check; and one device
that runs such an image in the sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pvpy.store import ObjectStore
from pvpy.workstation.pack import pack_rootfs
from tests.device import COMMIT, HOSTOS, build_revision, pvpy
from tests.test_pack import build_fails

pytestmark = [
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("umoci", "skopeo", "buildah", "mksquashfs")),
        reason="umoci, skopeo, buildah or squashfs-tools not installed (tools/setup installs them)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership in images, buildah)"),
]

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:app\n"
# The app of the device test: says who it runs as, stops on SIGUSR1 only (as PID 1
# of its namespace it ignores a signal it has no handler for: TERM would mean a
# SIGKILL at the stop timeout). It notes each run in its volume /data, whose new
# directory takes the owner of the image's /data (the image's user), so it can write.
APP_SCRIPT = (
    "trap 'echo stopped by USR1; exit 0' USR1; "
    'echo "run ${REV:-1} as $(id)"; echo "${REV:-1}" >> /data/runs; '
    "while :; do sleep 1 & wait $!; done"
)


def run(*argv: str | Path) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def buildah(storage: Path, *args: str | Path) -> str:
    """buildah on its own storage (vfs: plain directories, nothing mounted)."""
    return run(
        "buildah", "--root", storage / "root", "--runroot", storage / "run",
        "--storage-driver", "vfs", *args,
    ).strip()  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, demo_trees: Path) -> dict[str, Path]:
    """Images made by real tools from the demo's busybox tree:

    - ``oci``: an OCI layout by umoci; tag ``v1`` (User app:staff, Volumes /data and
      /var/cache/app, StopSignal SIGUSR1), ``v2`` (a second layer adds user svc to
      /etc/passwd; User svc), ``ghost`` (User ghost, in no /etc/passwd);
    - ``archive``: ``v1`` as a docker-archive, by skopeo;
    - ``health``: ``v1`` through buildah with a Healthcheck and the device test's
      command, committed in docker format and pushed as a docker-archive;
    - ``health-oci``: ``health`` copied back into an OCI layout by skopeo.
    """
    work = tmp_path_factory.mktemp("images")
    layout = work / "oci"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    bundle = work / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:base", bundle)
    shutil.copytree(demo_trees / "hello", bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    (bundle / "rootfs" / "etc" / "passwd").write_text(PASSWD)
    (bundle / "rootfs" / "etc" / "group").write_text(GROUP)
    (bundle / "rootfs" / "data").mkdir(exist_ok=True)  # as `RUN chown app /data` makes it
    os.chown(bundle / "rootfs" / "data", 1000, 1000)
    os.chmod(bundle / "rootfs" / "data", 0o750)
    run("umoci", "repack", "--image", f"{layout}:base", bundle)
    run(
        "umoci", "config", "--image", f"{layout}:base", "--tag", "v1",
        "--config.user", "app:staff", "--config.volume", "/data",
        "--config.volume", "/var/cache/app", "--config.stopsignal", "SIGUSR1",
        "--config.cmd", "/bin/sh",
    )  # fmt: skip
    upper = work / "bundle2"
    run("umoci", "unpack", "--image", f"{layout}:v1", upper)
    with open(upper / "rootfs" / "etc" / "passwd", "a") as f:
        f.write("svc:x:2000:2000::/:/bin/sh\n")
    run("umoci", "repack", "--image", f"{layout}:v2", upper)
    run("umoci", "config", "--image", f"{layout}:v2", "--config.user", "svc")
    run("umoci", "config", "--image", f"{layout}:v1", "--tag", "ghost", "--config.user", "ghost")

    archive = work / "app.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"docker-archive:{archive}:example/app:v1")

    storage = work / "buildah"
    container = buildah(storage, "from", "--quiet", f"oci:{layout}:v1")
    buildah(
        storage, "config",
        "--healthcheck", "CMD-SHELL test -e /data/go",
        "--healthcheck-interval", "300ms", "--healthcheck-timeout", "2s",
        "--healthcheck-retries", "3", "--healthcheck-start-period", "5s",
        "--cmd", json.dumps(["/bin/sh", "-c", APP_SCRIPT]),
        container,
    )  # fmt: skip
    buildah(storage, "commit", "--quiet", "--format", "docker", container, "example/health:v1")
    health = work / "health.tar"
    buildah(storage, "push", "--quiet", "example/health:v1", f"docker-archive:{health}:health:v1")
    shutil.rmtree(storage)
    health_oci = work / "health-oci"
    run("skopeo", "copy", "--quiet", f"docker-archive:{health}", f"oci:{health_oci}:v1")
    return {"oci": layout, "archive": archive, "health": health, "health-oci": health_oci}


def docker_config(archive: Path) -> dict[str, Any]:
    """The config a docker-archive holds, as the tool wrote it (read with tar)."""
    manifest = json.loads(run("tar", "-xOf", archive, "manifest.json"))
    config: dict[str, Any] = json.loads(run("tar", "-xOf", archive, manifest[0]["Config"]))
    return config


def build_state(tmp_path: Path, containers: dict[str, Any]) -> dict[str, Any]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"revision": 1, "containers": containers}))
    result = pvpy("state", "build", spec, "--out", tmp_path / "rev")
    assert result.returncode == 0, result.stderr
    state: dict[str, Any] = json.loads((tmp_path / "rev" / "state.json").read_text())
    return state["containers"]


def test_the_tools_wrote_what_the_image_says(images: dict[str, Path]) -> None:
    """What the tools themselves wrote (so the tests below start from real files)."""
    config = docker_config(images["health"])["config"]
    assert config["User"] == "app:staff" and config["StopSignal"] == "SIGUSR1"
    assert config["Volumes"] == {"/data": {}, "/var/cache/app": {}}
    assert config["Healthcheck"]["Test"] == ["CMD-SHELL", "test", "-e", "/data/go"]  # buildah's
    assert config["Healthcheck"]["Interval"] == 300_000_000
    # skopeo's conversion into an OCI config keeps everything but the Healthcheck
    assert "Healthcheck" not in docker_config(images["archive"])["config"]


def test_an_oci_image_keeps_its_user_volumes_and_stop_signal(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    oci = str(images["oci"])
    volumes = [
        {"name": "data", "target": "/data", "persistence": "permanent"},
        {"name": "var-cache-app", "target": "/var/cache/app", "persistence": "permanent"},
    ]
    containers = build_state(
        tmp_path,
        {
            "v1": {"rootfs": {"oci": oci, "tag": "v1"}},
            "v2": {"rootfs": {"oci": oci, "tag": "v2"}},  # svc: only in the second layer
            "named": {"rootfs": {"oci": oci, "tag": "v1"}, "user": "app:1000"},
            "numeric": {"rootfs": {"oci": oci, "tag": "v2"}, "user": 2000},
            "own": {
                "rootfs": {"oci": oci, "tag": "v1"},
                "user": {"uid": 7, "gid": 8},
                "stop_signal": "TERM",
                "volumes": [{"name": "mine", "target": "/data/", "persistence": "revision"}],
                "image_volumes": "boot",
            },
            "none": {"rootfs": {"oci": oci, "tag": "v1"}, "image_volumes": "none"},
        },
    )
    v1 = containers["v1"]
    assert v1["user"] == {"uid": 1000, "gid": 50}
    assert v1["volumes"] == volumes
    assert v1["stop_signal"] == "USR1"
    assert v1["args"] == ["/bin/sh"]
    assert "readiness" not in v1 and v1["status_goal"] == "STARTED"  # OCI configs have none
    assert containers["v2"]["user"] == {"uid": 2000, "gid": 2000}
    assert containers["named"]["user"] == {"uid": 1000, "gid": 1000}
    assert containers["numeric"]["user"] == {"uid": 2000, "gid": 2000}
    own = containers["own"]
    assert own["user"] == {"uid": 7, "gid": 8} and own["stop_signal"] == "TERM"
    assert own["volumes"] == [  # the spec's own /data wins; the other as the spec says
        {"name": "mine", "target": "/data/", "persistence": "revision"},
        {"name": "var-cache-app", "target": "/var/cache/app", "persistence": "boot"},
    ]
    assert containers["none"]["volumes"] == []


def test_a_docker_archive_is_the_same_image_and_keeps_the_healthcheck(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    store = ObjectStore(tmp_path / "objects").ensure()
    from_layout = pack_rootfs(images["oci"], store, tag="v1")
    from_archive = pack_rootfs(images["archive"], store, docker_archive=True)
    assert from_archive == from_layout  # skopeo's copy: the same tree, object and config

    containers = build_state(
        tmp_path,
        {
            "health": {"rootfs": {"docker-archive": str(images["health"]), "tag": "v1"}},
            "converted": {"rootfs": {"oci": str(images["health-oci"])}},
            "own": {
                "rootfs": {"docker-archive": str(images["health"])},
                "readiness": {"type": "file", "path": "/tmp/up"},
            },
        },
    )
    health = containers["health"]
    assert health["readiness"] == {
        "type": "command",
        "command": ["/bin/sh", "-c", "test -e /data/go"],
        "interval_ms": 300,
        "timeout_ms": 2000,
    }
    assert health["status_goal"] == "READY"
    assert health["user"] == {"uid": 1000, "gid": 50} and health["stop_signal"] == "USR1"
    assert health["args"] == ["/bin/sh", "-c", APP_SCRIPT]
    converted = containers["converted"]  # through skopeo's OCI layout: no Healthcheck left
    assert "readiness" not in converted and converted["user"] == health["user"]
    own = containers["own"]
    assert own["readiness"]["type"] == "file" and own["status_goal"] == "STARTED"


@pytest.mark.parametrize(
    ("container", "message"),
    [
        ({"tag": "ghost"}, "{oci}: user 'ghost': no user 'ghost' in the image's /etc/passwd"),
        ({"tag": "v1", "user": "svc"}, "{oci}: user 'svc': no user 'svc' in the image's"),
        ({"tag": "v2", "user": "svc:wheel"}, "no group 'wheel' in the image's /etc/group"),
    ],
)
def test_a_user_the_image_does_not_know_is_one_line_and_exit_4(
    tmp_path: Path, images: dict[str, Path], container: dict[str, str], message: str
) -> None:
    tag = container.pop("tag")
    spec = tmp_path / "spec.yaml"
    app = {"rootfs": {"oci": str(images["oci"]), "tag": tag}, **container}
    spec.write_text(yaml.safe_dump({"revision": 1, "containers": {"app": app}}))
    line = build_fails(spec, tmp_path / "rev")
    assert line.startswith("pvpy: error: $.containers.app.user: ")
    assert message.format(oci=images["oci"]) in line


def test_a_corrupt_docker_archive_layer_is_refused(tmp_path: Path, images: dict[str, Path]) -> None:
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    run("tar", "-xf", images["archive"], "-C", unpacked)
    layer = unpacked / json.loads((unpacked / "manifest.json").read_text())[0]["Layers"][0]
    data = bytearray(layer.read_bytes())
    data[-2000] ^= 0xFF  # in the tar's end: still a readable tarball, not the same one
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    broken = tmp_path / "broken.tar"
    run("tar", "-cf", broken, "-C", unpacked, ".")
    spec = tmp_path / "spec.yaml"
    app = {"rootfs": {"docker-archive": str(broken)}}
    spec.write_text(yaml.safe_dump({"revision": 1, "containers": {"app": app}}))
    assert "is corrupt (not its config's diff_id)" in build_fails(spec, tmp_path / "rev")


@pytest.mark.root
def test_a_device_runs_the_image_as_its_user_with_its_volume_stop_signal_and_healthcheck(
    tmp_path: Path, images: dict[str, Path], sandbox: Any, signing_dir: Path
) -> None:
    svc = {"rootfs": {"docker-archive": str(images["health"])}}
    rev1 = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "svc": svc})
    rev2 = build_revision(
        tmp_path, signing_dir, 2, {"hostos": HOSTOS, "svc": {**svc, "env": {"REV": "2"}}}
    )
    device = sandbox(rev1, *COMMIT)
    volumes = device.storage / "disks" / "permanent" / "svc" / "volumes"
    log = device.storage / "logs" / "svc.log"
    ran_as = "as uid=1000(app) gid=50(staff)"  # the image's user, by name, its own group

    # Started, but not READY until the Healthcheck passes: the goals are not met
    device.wait_for("svc started", lambda s: log.exists() and ran_as in log.read_text())
    assert sorted(p.name for p in volumes.iterdir()) == ["data", "var-cache-app"]
    deadline = time.monotonic() + 1.5  # five check intervals
    while time.monotonic() < deadline:
        assert not device.status()["all_goals_met"]
        assert device.container("svc")["status"] == "STARTED"
        time.sleep(0.1)
    (volumes / "data" / "go").touch()  # the app's /data/go: now the check passes
    device.wait_goals(timeout=10)
    assert device.container("svc")["status"] == "READY"

    # an app-only update restarts svc: stopped by the image's StopSignal; the
    # permanent volume is kept (go is still there: READY again without help)
    result = pvpy("device", "update", rev2, "--storage", device.storage, timeout=90)
    assert "UPDATED" in result.stdout, result.stdout + device.tail()
    device.wait_for("revision 2", lambda s: s["committed"] == 2 and s["all_goals_met"])
    assert (volumes / "data" / "go").exists()
    data, cache = (volumes / "data").stat(), (volumes / "var-cache-app").stat()
    assert (data.st_uid, data.st_gid, data.st_mode & 0o777) == (1000, 1000, 0o750)  # the image's
    assert (cache.st_uid, cache.st_gid) == (1000, 50)  # none in the image: the app's user's
    assert (volumes / "data" / "runs").read_text() == "1\n2\n"
    assert log.read_text().splitlines() == [f"run 1 {ran_as}", "stopped by USR1", f"run 2 {ran_as}"]
    assert device.stop() == 0
    assert log.read_text().splitlines()[-1] == "stopped by USR1"
