"""Builtins under the `builtin:` prefix, after Congress's set.

Each builtin takes `inputs` leading arguments and yields `outputs` trailing ones. A check (no outputs)
returns a bool; a function returns its output (a tuple when there are several) or NO when it has no result
for those inputs (wrong types, malformed address or date, division by zero). Either way the answer depends
only on the inputs, so a derivation counted on insert is counted the same way on delete.

`now` is the exception: it reads the engine's clock, which only moves on `Engine.tick()`.
Datetimes are ISO-8601 strings ("2016-06-01 12:00:00"); durations are seconds or "[[[[w:]d:]h:]m:]s".
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

NO: Any = object()
"""Result of a builtin function that has no value for its inputs."""

DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class Builtin:
    name: str
    inputs: int
    outputs: int
    fn: Callable[..., Any] | None    # None only for `now`, bound by the engine

    @property
    def arity(self) -> int:
        return self.inputs + self.outputs


def _check(op: Callable[..., bool]) -> Callable[..., bool]:
    def check(*args: Any) -> bool:
        try:
            return bool(op(*args))
        except (TypeError, ValueError, ArithmeticError):
            return False
    return check


def _function(op: Callable[..., Any]) -> Callable[..., Any]:
    def function(*args: Any) -> Any:
        try:
            value = op(*args)
        except (TypeError, ValueError, ArithmeticError, OverflowError):
            return NO
        return NO if value != value else value    # noqa: PLR0124 - NaN equals nothing, so it could never be retracted
    return function


def _numbers(*args: Any) -> None:
    for a in args:
        if type(a) not in (int, float):
            raise TypeError("not a number")


def _arith(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def arith(x: Any, y: Any) -> Any:
        _numbers(x, y)
        return op(x, y)
    return arith


def _div(x: Any, y: Any) -> Any:
    _numbers(x, y)
    return x // y if type(x) is int and type(y) is int else x / y


def _scalar_text(x: Any) -> str:
    if type(x) not in (str, int, float):
        raise TypeError("not a value")
    return x if type(x) is str else repr(x)


def _concat(x: Any, y: Any) -> str:
    return _scalar_text(x) + _scalar_text(y)


def _len(x: Any) -> int:
    if type(x) is not str:
        raise TypeError("not a string")
    return len(x)


@lru_cache(maxsize=4096)
def _datetime(x: Any) -> dt.datetime:
    if type(x) is not str:
        raise TypeError("not a datetime string")
    return dt.datetime.fromisoformat(x.strip()).replace(tzinfo=None)


def _duration(y: Any) -> dt.timedelta:
    if type(y) in (int, float):
        return dt.timedelta(seconds=y)
    if type(y) is not str:
        raise TypeError("not a duration")
    fields = [int(f) for f in y.split(":")][::-1]
    if len(fields) > 5:
        raise ValueError("too many duration fields")
    return dt.timedelta(**dict(zip(("seconds", "minutes", "hours", "days", "weeks"), fields)))


def _unpack_date(x: Any) -> tuple[int, int, int]:
    d = _datetime(x)
    return d.year, d.month, d.day


def _unpack_time(x: Any) -> tuple[int, int, int]:
    d = _datetime(x)
    return d.hour, d.minute, d.second


def _ints(*args: Any) -> None:
    for a in args:
        if type(a) is not int:
            raise TypeError("not an integer")


def _pack_date(y: Any, m: Any, d: Any) -> str:
    _ints(y, m, d)
    return str(dt.date(y, m, d))


def _pack_time(h: Any, m: Any, s: Any) -> str:
    _ints(h, m, s)
    return str(dt.time(h, m, s))


def _pack_datetime(y: Any, mo: Any, d: Any, h: Any, mi: Any, s: Any) -> str:
    _ints(y, mo, d, h, mi, s)
    return str(dt.datetime(y, mo, d, h, mi, s))


_EPOCH_1900 = dt.datetime(1900, 1, 1)


@lru_cache(maxsize=4096)
def _ip(x: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if type(x) is not str:
        raise TypeError("not an address")
    return ipaddress.ip_address(x.strip())


@lru_cache(maxsize=4096)
def _net(x: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if type(x) is not str:
        raise TypeError("not a network")
    return ipaddress.ip_network(x.strip(), strict=False)


def _same_family(a: Any, b: Any) -> None:
    if a.version != b.version:
        raise TypeError("IPv4 and IPv6 do not compare")


def _ip_cmp(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(x: Any, y: Any) -> bool:
        a, b = _ip(x), _ip(y)
        _same_family(a, b)
        return op(a, b)
    return compare


def _networks_overlap(x: Any, y: Any) -> bool:
    a, b = _net(x), _net(y)
    _same_family(a, b)
    return a.overlaps(b)


def _ip_in_network(x: Any, y: Any) -> bool:
    a, n = _ip(x), _net(y)
    _same_family(a, n)
    return a in n


def _registry() -> dict[str, Builtin]:
    checks: dict[str, Callable[..., bool]] = {
        "lt": lambda x, y: x < y,
        "lteq": lambda x, y: x <= y,
        "equal": lambda x, y: x == y,
        "gt": lambda x, y: x > y,
        "gteq": lambda x, y: x >= y,
        "datetime_lt": lambda x, y: _datetime(x) < _datetime(y),
        "datetime_lteq": lambda x, y: _datetime(x) <= _datetime(y),
        "datetime_gt": lambda x, y: _datetime(x) > _datetime(y),
        "datetime_gteq": lambda x, y: _datetime(x) >= _datetime(y),
        "datetime_equal": lambda x, y: _datetime(x) == _datetime(y),
        "ips_equal": _ip_cmp(lambda a, b: a == b),
        "ips_lt": _ip_cmp(lambda a, b: a < b),
        "ips_lteq": _ip_cmp(lambda a, b: a <= b),
        "ips_gt": _ip_cmp(lambda a, b: a > b),
        "ips_gteq": _ip_cmp(lambda a, b: a >= b),
        "networks_equal": lambda x, y: _net(x) == _net(y),
        "networks_overlap": _networks_overlap,
        "ip_in_network": _ip_in_network,
    }
    functions: dict[str, tuple[int, int, Callable[..., Any]]] = {
        "max": (2, 1, lambda x, y: max(x, y)),
        "plus": (2, 1, _arith(lambda x, y: x + y)),
        "minus": (2, 1, _arith(lambda x, y: x - y)),
        "mul": (2, 1, _arith(lambda x, y: x * y)),
        "div": (2, 1, _div),
        "float": (1, 1, lambda x: float(x)),
        "int": (1, 1, lambda x: int(x)),
        "concat": (2, 1, _concat),
        "len": (1, 1, _len),
        "datetime_plus": (2, 1, lambda x, y: str(_datetime(x) + _duration(y))),
        "datetime_minus": (2, 1, lambda x, y: str(_datetime(x) - _duration(y))),
        "datetime_to_seconds": (1, 1, lambda x: int((_datetime(x) - _EPOCH_1900).total_seconds())),
        "extract_date": (1, 1, lambda x: str(_datetime(x).date())),
        "extract_time": (1, 1, lambda x: str(_datetime(x).time())),
        "unpack_date": (1, 3, _unpack_date),
        "unpack_time": (1, 3, _unpack_time),
        "unpack_datetime": (1, 6, lambda x: _unpack_date(x) + _unpack_time(x)),
        "pack_date": (3, 1, _pack_date),
        "pack_time": (3, 1, _pack_time),
        "pack_datetime": (6, 1, _pack_datetime),
    }
    table = {name: Builtin(name, 2, 0, _check(op)) for name, op in checks.items()}
    table.update({name: Builtin(name, i, o, _function(op)) for name, (i, o, op) in functions.items()})
    table["now"] = Builtin("now", 0, 1, None)
    return table


BUILTINS: dict[str, Builtin] = _registry()


def format_datetime(moment: dt.datetime) -> str:
    return moment.strftime(DATETIME_FORMAT)
