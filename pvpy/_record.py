"""Frozen records for the modules PID 1 loads: dataclasses without their import cost.

``dataclasses`` imports ``inspect`` and with it ``ast``, ``dis``, ``tokenize`` and
``linecache``: about 1.5 MiB of private memory in every process that loads it,
for features PID 1 never uses (bench/findings.md). The state model, the
runtime's paths, update progress, boot choices and the board file are read by
PID 1, so they subclass ``Record`` instead::

    class Volume(Record):
        name: str
        target: str
        persistence: str = "revision"

A subclass gets what ``@dataclass(frozen=True)`` gives: ``__init__`` (positional
or keyword, defaults), ``__eq__`` (same class, equal fields), ``__hash__``,
``__repr__``, and no attribute assignment (``AttributeError``). Fields are the
annotated class attributes, base classes' first. Defaults are shared between
instances, so they must be immutable (``()``, a frozen record, a
``MappingProxyType``); there is no ``field(default_factory=...)``. mypy checks
subclasses as dataclasses (PEP 681 ``dataclass_transform``).

Only the standard library, and not even ``typing`` at run time: that is another
0.6 MiB in PID 1.
"""

from __future__ import annotations

from itertools import pairwise

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_kwargs: object) -> object:
        return lambda cls: cls


__all__ = ["Record"]


@dataclass_transform(eq_default=True, frozen_default=True)
class Record:
    """Base class of a frozen record; see the module docstring."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = list(cls._fields)
        defaults = dict(cls._defaults)
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - no inspect here (see above)
        for name, annotation in own.items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if name not in fields:
                fields.append(name)
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
        for before, name in pairwise(fields):
            if before in defaults and name not in defaults:
                raise TypeError(f"{cls.__name__}: field {name!r} has no default but {before!r} has")
        cls._fields = tuple(fields)
        cls._defaults = defaults
        cls.__init__ = _make_init(cls._fields, defaults)  # type: ignore[method-assign]

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"

    if not TYPE_CHECKING:  # hidden from mypy, which then also flags unknown attributes

        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(f"cannot assign to {name!r}: {type(self).__name__} is frozen")

        def __delattr__(self, name: str) -> None:
            raise AttributeError(f"cannot delete {name!r}: {type(self).__name__} is frozen")


def _make_init(fields: tuple[str, ...], defaults: dict[str, object]) -> Callable[..., None]:
    def __init__(self: Record, *args: object, **kwargs: object) -> None:
        kind = type(self).__name__
        if len(args) > len(fields):
            raise TypeError(f"{kind}() takes {len(fields)} arguments but {len(args)} were given")
        values = dict(zip(fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{kind}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{kind}() got multiple values for argument {name!r}")
            values[name] = value
        for name in fields:
            if name in values:
                value = values[name]
            elif name in defaults:
                value = defaults[name]
            else:
                raise TypeError(f"{kind}() missing required argument {name!r}")
            object.__setattr__(self, name, value)

    return __init__
