"""pvpy.workstation.spec through ``pvpy state build``: what a spec may say, and bad specs
ending in one line and the documented exit code (never 70, an internal error)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.test_pack import build_fails, make_tree, pvpy

pytestmark = [
    pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="squashfs-tools not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership in images)"),
]

APP = "containers:\n  app:\n    rootfs: rootfs\n    args: [/bin/app]\n"


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    make_tree(tmp_path / "rootfs")
    return tmp_path


def write_spec(spec_dir: Path, text: str) -> Path:
    spec = spec_dir / "spec.yaml"
    spec.write_text(text)
    return spec


def test_fleet_is_copied_into_the_state(spec_dir: Path) -> None:
    spec = write_spec(spec_dir, f"revision: 1\nfleet: acme/demo\n{APP}")
    result = pvpy("state", "build", spec, "--out", spec_dir / "rev")
    assert result.returncode == 0, result.stderr
    assert json.loads((spec_dir / "rev" / "state.json").read_text())["fleet"] == "acme/demo"

    write_spec(spec_dir, f"revision: 2\n{APP}")  # no fleet: none in the state
    assert pvpy("state", "build", spec, "--out", spec_dir / "rev").returncode == 0
    assert "fleet" not in json.loads((spec_dir / "rev" / "state.json").read_text())


@pytest.mark.parametrize(
    "fleet", ["Acme/Demo", "acme//demo", '"acme/demo\\n"', "'/acme'", "[acme]", "12", "''"]
)
def test_bad_fleet_is_one_line_and_exit_4(spec_dir: Path, fleet: str) -> None:
    spec = write_spec(spec_dir, f"revision: 1\nfleet: {fleet}\n{APP}")
    assert build_fails(spec, spec_dir / "rev").startswith("pvpy: error: $.fleet: ")
    assert not (spec_dir / "rev").exists()  # refused before anything was written


BAD_SPECS = {
    "a-list": ("- revision: 1\n", "a spec is a YAML mapping"),
    "not-a-date": (f"revision: 1\nexpires: 2030-13-45\n{APP}", "invalid YAML value"),
    "alias-in-itself": (f"revision: 1\nx: &a [*a]\n{APP}", "nested deeper than 32"),
    "alias-bomb": (
        "revision: 1\n"
        + "".join(
            f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 9)}]\n" for i in range(9)
        )
        + APP,
        "more than 100000 values",
    ),
    "all-root-not-a-bool": (
        "revision: 1\ncontainers:\n  app:\n    rootfs: {dir: rootfs, all_root: maybe}\n"
        "    args: [/bin/app]\n",
        "$.containers.app.rootfs.all_root: all_root must be a bool",
    ),
    "mixed-option-keys": (
        "revision: 1\ncontainers:\n  app:\n    rootfs: {dir: rootfs, 5: a, b: c}\n"
        "    args: [/bin/app]\n",
        "unknown source option(s) ['5', 'b']",
    ),
    "image-volumes-unknown": (
        f"revision: 1\n{APP}    image_volumes: forever\n",
        "$.containers.app.image_volumes: 'forever' is not one of permanent, revision, boot, none",
    ),
    "user-name-not-in-the-tree": (
        f"revision: 1\n{APP}    user: nobody\n",
        "$.containers.app.user: ",  # make_tree has no /etc/passwd
    ),
    "user-not-a-string-or-ids": (f"revision: 1\n{APP}    user: [app]\n", "$.containers.app.user"),
    "docker-archive-not-one": (
        "revision: 1\ncontainers:\n  app:\n    rootfs: {docker-archive: rootfs}\n",
        "rootfs: a docker-archive is a file (docker save's tarball)",
    ),
    "number-key-in-a-container": (
        "revision: 1\ncontainers:\n  app:\n    rootfs: rootfs\n    args: [/bin/app]\n    5: 30s\n",
        "$.containers.app",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_and_exit_4(spec_dir: Path, case: str) -> None:
    text, message = BAD_SPECS[case]
    started = time.monotonic()
    line = build_fails(write_spec(spec_dir, text), spec_dir / "rev")
    assert message in line
    assert time.monotonic() - started < 60  # an alias bomb is refused, not expanded


def test_bad_source_date_epoch_is_a_usage_error(
    spec_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    line = build_fails(write_spec(spec_dir, f"revision: 1\n{APP}"), spec_dir / "rev", code=2)
    assert "SOURCE_DATE_EPOCH is not a time in seconds: 'yesterday'" in line


def test_a_failed_build_leaves_the_out_dir_as_it_was(spec_dir: Path) -> None:
    """The first container packs, the second cannot: its object is not left behind,
    and an earlier build in the same dir keeps its state and objects."""
    (spec_dir / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 64)
    out = spec_dir / "rev"
    good = write_spec(spec_dir, f"revision: 1\n{APP}")
    assert pvpy("state", "build", good, "--out", out).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    state = (out / "state.json").read_bytes()

    broken = write_spec(
        spec_dir,
        f"revision: 2\n{APP}    env: {{CHANGED: '1'}}\n"
        "  web:\n    rootfs: {tar: broken.tar.gz, all_root: true}\n    args: [/a]\n",
    )
    result = pvpy("state", "build", broken, "--out", out)
    assert result.returncode == 4, result.stderr
    assert "broken.tar.gz: not a readable tarball" in result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "state.json").read_bytes() == state

    shutil.rmtree(out)
    build_fails(broken, out)  # a fresh dir: nothing at all is left
    assert not out.exists()


def test_a_spec_user_name_resolves_through_the_trees_own_passwd(spec_dir: Path) -> None:
    """A directory rootfs (the developer's own tree) has its /etc/passwd read too,
    never the workstation's: "nobody" below is not this machine's nobody."""
    etc = spec_dir / "rootfs" / "etc"
    (etc / "passwd").write_text("root:x:0:0::/:\nnobody:x:4711:4712::/:\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:4712:\nvideo:x:44:nobody\n")
    spec = write_spec(spec_dir, f"revision: 1\n{APP}    user: nobody:video\n")
    assert pvpy("state", "build", spec, "--out", spec_dir / "rev").returncode == 0
    state = json.loads((spec_dir / "rev" / "state.json").read_text())
    assert state["containers"]["app"]["user"] == {"uid": 4711, "gid": 44}


def test_image_volume_names_come_from_their_targets() -> None:
    from pvpy.workstation.spec import image_volume_name

    assert image_volume_name("/var/lib/My DB", set()) == "var-lib-my-db"
    taken = image_volume_name("/data", {"data"})  # the spec named another volume "data"
    assert taken.startswith("data-") and len(taken) == len("data-") + 8
    assert taken == image_volume_name("/data", {"data"})  # the same in every revision
    long = image_volume_name("/" + "x" * 80, set())
    assert len(long) <= 63 and long.startswith("x" * 54 + "-")
    assert image_volume_name("/.../", set()).startswith("volume-")
