"""The API's pending sizes (pvpy.device.api._staging.Pending), against a real
`pvpy device api` process (no PID 1 needed: checking a state and uploading objects
are the storage half of the API; fixtures from tests/test_api.py)."""

from __future__ import annotations

from pathlib import Path

from pvpy.signing import SigningKey, sign_state
from pvpy.state import canonical
from tests.conftest import minimal_state
from tests.device import free_port
from tests.test_api import Client, api_process, provision_token, sha, wait_api


def signed_body(revision: int, key: SigningKey, name: str, size: int) -> dict[str, str]:
    doc = minimal_state(revision)
    doc["containers"]["app"]["rootfs"] = {"sha256": name, "size": size, "format": "squashfs"}
    state = canonical.encode(doc)
    return {"state": state.decode(), "signature": sign_state(state, [key]).decode()}


def test_a_wrong_size_in_an_older_state_does_not_block_the_right_one(
    tmp_path: Path, key: SigningKey, key_dir: Path
) -> None:
    """A signed state naming an object with a wrong (larger) size, then a corrected
    one (the next revision) naming it with its real size: the upload of the real
    bytes goes through at once, not after the first state's hour is over."""
    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    (storage / "trust").mkdir(parents=True)
    (storage / "trust" / "00-pvpy.pub").write_bytes((key_dir / "pvpy.pub").read_bytes())
    client = Client(port, provision_token(storage))
    data = b"the real object bytes"
    name = sha(data)
    with api_process(storage, run_dir, port):
        wait_api(client)
        for revision, size in ((7, len(data) + 100), (8, len(data))):
            status, doc = client.json("POST", "/v1/objects/missing",
                                      signed_body(revision, key, name, size))  # fmt: skip
            assert (status, doc["missing"]) == (200, [name]), doc
        status, doc = client.request("PUT", f"/v1/objects/{name}", data)
        assert (status, doc.get("created")) == (201, True), doc
        # the newest state's size is still enforced: another length is refused unread
        short = b"y" * 9
        status, doc = client.json("POST", "/v1/objects/missing",
                                  signed_body(9, key, sha(b"y" * 10), 10))  # fmt: skip
        assert status == 200, doc
        status, doc = client.request("PUT", f"/v1/objects/{sha(b'y' * 10)}", short)
        assert status == 422 and "10 bytes in a pending revision, not 9" in doc["error"], doc
