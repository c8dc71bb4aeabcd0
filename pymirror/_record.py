"""Frozen value classes without :mod:`dataclasses` at run time.

``@record`` turns a class whose body declares annotated fields (with or
without defaults) into what ``@dataclasses.dataclass(frozen=True)`` makes of
it, as far as pymirror's value classes use it: an ``__init__`` taking the
fields by position or keyword (then calling ``__post_init__`` if defined),
``__repr__`` (``Name(field=value, ...)``), ``__eq__`` and ``__hash__`` over the
fields, ``__match_args__``, ``__replace__`` (``copy.replace``), and assignment refused (:class:`FrozenInstanceError`,
an ``AttributeError``).  What it leaves out: ``dataclasses.fields()``,
``asdict()`` and ``replace()`` do not apply (the classes offer their own
``as_dict``/``replace`` where users need them; :func:`fields` lists the names).

Why: importing :mod:`dataclasses` imports :mod:`inspect` (with ``ast``,
``dis``, ``tokenize``), and each dataclass generates and compiles its methods
when its module loads: 10-20 ms of a command's start, before its copy can
begin (docs/copier.md, "The command's start and end").  Here the methods are
shared and nothing is compiled.  The type checker sees real dataclasses
(``if TYPE_CHECKING: from dataclasses import dataclass as record``), so the
signatures it checks are the same.

Annotations are read as strings (``from __future__ import annotations``):
a field is every name annotated in the class body itself, in order; a
field with a class attribute of the same name has that default.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, TypeVar
    T = TypeVar("T")

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """An attempt to assign to a field of a frozen record."""


def fields(obj: Any) -> tuple[str, ...]:
    """The field names of a record class or instance, in order."""
    return obj._record_fields  # type: ignore[no-any-return]


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls._record_fields
    if len(args) > len(names):
        required = sum(1 for n in names if cls._record_defaults_or_required[n] is _MISSING)
        takes = f"{len(names) + 1}" if required == len(names) else f"from {required + 1} to {len(names) + 1}"
        raise TypeError(f"{cls.__name__}.__init__() takes {takes} positional arguments "
                        f"but {len(args) + 1} were given")
    values = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in cls._record_defaults_or_required:
            raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {k!r}")
        if k in values:
            raise TypeError(f"{cls.__name__}.__init__() got multiple values for argument {k!r}")
        values[k] = v
    d = self.__dict__
    missing = []
    for name in names:
        if name in values:
            d[name] = values[name]
        else:
            default = cls._record_defaults_or_required[name]
            if default is _MISSING:
                missing.append(name)
            else:
                d[name] = default
    if missing:
        listed = " and ".join(repr(m) for m in missing) if len(missing) <= 2 else \
            ", ".join(repr(m) for m in missing[:-1]) + f", and {missing[-1]!r}"
        raise TypeError(f"{cls.__name__}.__init__() missing {len(missing)} required positional "
                        f"argument{'s' if len(missing) > 1 else ''}: {listed}")
    post = getattr(self, "__post_init__", None)
    if post is not None:
        post()


def _repr(self: Any) -> str:
    d = self.__dict__
    inner = ", ".join(f"{n}={d[n]!r}" for n in type(self)._record_fields)
    return f"{type(self).__qualname__}({inner})"


def _astuple(self: Any) -> tuple[Any, ...]:
    d = self.__dict__
    return tuple(d[n] for n in type(self)._record_fields)


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        return _astuple(self) == _astuple(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(_astuple(self))


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _replace(self: Any, **changes: Any) -> Any:
    """``copy.replace(record, **changes)`` (Python 3.13), as for a dataclass."""
    return type(self)(**dict(self.__dict__, **changes))


def _record(cls: T) -> T:
    c: Any = cls
    own = c.__dict__.get("__annotations__", {})
    names: list[str] = []
    table: dict[str, Any] = {}
    for base in reversed(c.__mro__[1:]):        # fields of record bases first, as dataclasses does
        for n in getattr(base, "_record_fields", ()):
            if n not in table:
                names.append(n)
            table[n] = base._record_defaults_or_required[n]
    for n, ann in own.items():
        if isinstance(ann, str) and ann.startswith("ClassVar"):
            continue
        if n not in table:
            names.append(n)
        table[n] = c.__dict__.get(n, _MISSING)
    seen_default = False
    for n in names:
        if table[n] is not _MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {n!r} follows default argument")
    c._record_fields = tuple(names)
    c._record_defaults_or_required = table
    setattr(c, "__match_args__", tuple(names))
    c.__init__ = _init
    c.__repr__ = _repr
    c.__eq__ = _eq
    c.__hash__ = _hash
    c.__setattr__ = _setattr
    c.__delattr__ = _delattr
    c.__replace__ = _replace
    return cls


def record(cls: Any = None, *, frozen: bool = True) -> Any:
    """``@record`` or ``@record(frozen=True)``: see the module's text.  Only
    frozen records exist (``frozen`` is accepted so that the decorator reads
    as the dataclass the type checker sees)."""
    if not frozen:
        raise TypeError("records are frozen")
    if cls is None:
        return _record
    return _record(cls)
