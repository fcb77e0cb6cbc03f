"""pvpy._record: frozen records behave like frozen dataclasses, without importing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from pvpy._record import Record
from pvpy.state.model import Image, ObjectRef, State

REPO = Path(__file__).resolve().parent.parent


class Point(Record):
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


class Point3(Point):
    z: int = 0


def test_init_positional_keyword_and_defaults() -> None:
    assert Point(1).y == 0
    assert Point(1, 2) == Point(x=1, y=2) == Point(y=2, x=1)
    assert Point3(1, 2, ("a",), 3).z == 3
    assert Point3(1, z=4).tags == ()


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((), {}, "missing required argument 'x'"),
        ((1, 2, (), 4), {}, "takes 3 arguments but 4 were given"),
        ((1,), {"x": 2}, "multiple values for argument 'x'"),
        ((1,), {"w": 2}, "unexpected keyword argument 'w'"),
    ],
)
def test_init_refuses_what_a_dataclass_refuses(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)  # type: ignore[arg-type]


def test_frozen() -> None:
    p = Point(1)
    with pytest.raises(AttributeError, match="frozen"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        p.other = 2  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="frozen"):
        del p.x


def test_eq_hash_repr() -> None:
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != Point3(1, 2)  # another class is never equal, as with dataclasses
    assert Point(1, 2) != (1, 2, ())
    assert len({Point(1, 2), Point(1, 2), Point(2)}) == 2
    assert repr(Point3(1)) == "Point3(x=1, y=0, tags=(), z=0)"


def test_subclass_keeps_the_base_fields() -> None:
    image = Image("a" * 64, 10)
    assert isinstance(image, ObjectRef)
    assert image.format == "squashfs"
    assert Image._fields == ("sha256", "size", "format")
    assert Image("a" * 64, 10) != ObjectRef("a" * 64, 10)


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="'b' has no default but 'a' has"):

        class Bad(Record):
            a: int = 0
            b: int  # type: ignore[misc]


def test_immutable_defaults_are_shared_safely() -> None:
    class Config(Record):
        options: MappingProxyType[str, str] = MappingProxyType({})

    assert Config().options is Config().options
    assert Config(MappingProxyType({"a": "b"})).options["a"] == "b"


def test_state_round_trip_uses_records() -> None:
    doc = {
        "revision": 3,
        "containers": {"app": {"rootfs": {"sha256": "b" * 64, "size": 1, "format": "squashfs"},
                               "args": ["/bin/sh"]}},
    }  # fmt: skip
    state = State.from_dict(doc)
    assert State.from_dict(state.to_dict()) == state
    assert hash(State.from_dict(state.to_dict())) == hash(state)


def test_the_state_model_does_not_load_dataclasses() -> None:
    code = (
        "import sys, pvpy.state.model; "
        "print(sorted(m for m in ('dataclasses', 'inspect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout  # fmt: skip
    assert out.strip() == "[]"
