"""The device API's credentials file (pvpy.api_credentials): formats, checks, no echo."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvpy.api_credentials import ApiCredentials, parse_credentials, read_credentials
from pvpy.errors import UsageError

TOKEN = "0123456789abcdef0123"
PIN = "ab" * 32


def test_round_trip_and_the_token_only_format() -> None:
    creds = ApiCredentials(TOKEN, PIN)
    assert parse_credentials(creds.render(), "f") == creds
    assert parse_credentials(f"{TOKEN}\n".encode(), "f") == ApiCredentials(TOKEN)
    colons = ":".join(PIN[i : i + 2].upper() for i in range(0, 64, 2))  # openssl's form
    text = f"# c\ntoken: {TOKEN}\ntls-sha256: {colons}\nnewer-key: x\n"
    assert parse_credentials(text.encode(), "f") == creds  # unknown keys: ignored


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (f"tls-sha256: {PIN}\n".encode(), "no `token:`"),
        (f"token: {TOKEN}\ntoken: {TOKEN}\n".encode(), "given twice"),
        (f"token: {TOKEN}\ntls-sha256: 12\n".encode(), "64 hex"),
        (f"token: {TOKEN}\n{TOKEN}\n".encode(), "line 2"),
        (b"x" * 5000, "too large"),
        (b"-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n-----END EC PRIVATE KEY-----\n", "PEM"),
    ],
)
def test_refusals_name_the_problem_not_the_contents(data: bytes, why: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_credentials(data, "FILE")
    assert str(e.value).startswith("FILE: ") and why in str(e.value)
    assert TOKEN not in str(e.value) and "c2VjcmV0" not in str(e.value)


def test_an_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        read_credentials(tmp_path / "none")
