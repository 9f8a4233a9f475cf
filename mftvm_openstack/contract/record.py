"""Typed records that cross a process boundary, checked on the way in.

A record is a frozen dataclass that derives from :class:`Record`. It turns
into plain JSON with :meth:`Record.to_dict` and back with
:meth:`Record.from_dict`, which checks every field against its annotation
and refuses unknown fields, so a producer and a consumer that disagree
fail loudly instead of passing ``None`` around::

    @dataclasses.dataclass(frozen=True)
    class Point(Record):
        x: int = field(range=(0, 10))
        label: str = ''

    Point.from_dict({'x': 3})            # Point(x=3, label='')
    Point.from_dict({'x': 11})           # ContractError: x: must be ...
    Point.from_dict({'x': 3, 'y': 1})    # ContractError: y: is not a field

Supported annotations: ``int``, ``float``, ``str``, ``bool``, an
:class:`enum.Enum`, another :class:`Record`, ``Optional[...]`` of any of
these, ``tuple[X, ...]`` and ``dict[str, X]``. :func:`field` adds the
checks an annotation cannot say: a numeric ``range``, a regular
expression ``pattern`` (matched in full; in a ``tuple[str, ...]``, by
each item, as ``choices``), ``choices`` (a tuple, or a
function returning one, for choices read at run time such as plugin
names), ``max_len``, and ``nullable=False`` for an ``Optional`` field
whose ``None`` means "not given": JSON may leave it out but not send
``null``, and :meth:`Record.to_dict` leaves it out while it is ``None``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union

R = TypeVar('R', bound='Record')


class ContractError(ValueError):
    """A value that does not fit the contract; the message names the
    field and says what was expected: ``'<field>: <reason>'``."""

    @property
    def field(self) -> str:
        """The dotted name of the field that does not fit."""
        return str(self).partition(': ')[0]

    @property
    def reason(self) -> str:
        """What is wrong with it."""
        return str(self).partition(': ')[2]


def field(*, default: Any = dataclasses.MISSING,
          default_factory: Any = dataclasses.MISSING,
          range: tuple[float, float] | None = None,  # noqa: A002
          pattern: str | None = None,
          choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None
          = None,
          max_len: int | None = None,
          nullable: bool = True) -> Any:
    """A dataclass field with checks for :meth:`Record.from_dict`."""
    meta = {'range': range, 'pattern': pattern and re.compile(pattern),
            'choices': choices, 'max_len': max_len, 'nullable': nullable}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory,
                                 metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def shown(value: Any) -> str:
    """A value as an error message may show it: short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


class Record:
    """Base of the contract's records (see the module docstring)."""

    _hints: ClassVar[dict[type, dict[str, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name))
                for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) is not None
                or f.metadata.get('nullable', True)}

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = '') -> R:
        """``data`` checked field by field; ContractError names the first
        field that does not fit (prefixed with ``where``)."""
        if not isinstance(data, dict):
            raise ContractError(f'{where or cls.__name__}: must be a JSON '
                                f'object (got {type(data).__name__})')
        prefix = f'{where}.' if where else ''
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore
        for key in data:
            if key not in fields:
                raise ContractError(
                    f'{prefix}{key}: is not a field of {cls.__name__} '
                    f'(fields: {", ".join(fields)})')
        hints = cls._type_hints()
        values = {}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING and \
                        f.default_factory is dataclasses.MISSING:
                    raise ContractError(f'{prefix}{name}: is required')
                continue
            values[name] = _check(hints[name], data[name], prefix + name,
                                  f.metadata)
        return cls(**values)

    @classmethod
    def _type_hints(cls) -> dict[str, Any]:
        if cls not in Record._hints:
            Record._hints[cls] = typing.get_type_hints(cls)
        return Record._hints[cls]


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check(hint: Any, value: Any, name: str,
           meta: Any = types.MappingProxyType({})) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            if not meta.get('nullable', True):
                raise ContractError(f'{name}: must not be null (leave it '
                                    f'out for the default)')
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, name, meta)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ContractError(f'{name}: must be a list (got '
                                f'{type(value).__name__})')
        if len(args) == 2 and args[1] is Ellipsis:
            if meta.get('max_len') is not None and \
                    len(value) > meta['max_len']:
                raise ContractError(f'{name}: at most {meta["max_len"]} '
                                    f'items (got {len(value)})')
            # each item takes the field's pattern and choices
            item = {k: meta[k] for k in ('pattern', 'choices')
                    if meta.get(k) is not None}
            return tuple(_check(args[0], v, f'{name}[{i}]', item)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise ContractError(f'{name}: must have {len(args)} items '
                                f'(got {len(value)})')
        return tuple(_check(a, v, f'{name}[{i}]')
                     for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f'{name}: must be a JSON object (got '
                                f'{type(value).__name__})')
        return {_check(args[0], k, f'{name} key'):
                _check(args[1], v, f'{name}.{k}') for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, name)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ContractError(
                f'{name}: must be one of '
                f'{", ".join(str(m.value) for m in hint)} (got '
                f'{shown(value)})') from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ContractError(f'{name}: must be true or false (got '
                                f'{shown(value)})')
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ContractError(f'{name}: must be an integer (got '
                                f'{shown(value)})')
        return _in_range(value, name, meta)
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise ContractError(f'{name}: must be a number (got '
                                f'{shown(value)})')
        return _in_range(float(value), name, meta)
    if hint is str:
        if not isinstance(value, str):
            raise ContractError(f'{name}: must be a string (got '
                                f'{type(value).__name__})')
        if meta.get('max_len') is not None and len(value) > meta['max_len']:
            raise ContractError(f'{name}: at most {meta["max_len"]} '
                                f'characters (got {len(value)})')
        pattern = meta.get('pattern')
        if pattern is not None and not pattern.fullmatch(value):
            raise ContractError(f'{name}: must match {pattern.pattern} '
                                f'(got {shown(value)})')
        choices = meta.get('choices')
        if callable(choices):
            choices = choices()
        if choices is not None and value not in choices:
            raise ContractError(f'{name}: must be one of '
                                f'{", ".join(choices)} (got {shown(value)})')
        return value
    if hint is Any:
        return value
    raise TypeError(f'{name}: the contract cannot check {hint!r}')


def _in_range(value: Any, name: str, meta: Any) -> Any:
    bounds = meta.get('range')
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ContractError(f'{name}: must be from {bounds[0]} to '
                            f'{bounds[1]} (got {shown(value)})')
    return value
