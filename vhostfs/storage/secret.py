"""Credentials in a config: kept out of every repr, str, log line and JSON copy.

A Secret only gives its value to `reveal()`, which the code that sends it (a registry
backend's Authorization header) calls. Everything else (dataclass reprs, f-strings, %-style log
arguments, RafsConfig.redacted()) sees a placeholder, as nydusd records a config only after
`clone_without_secrets()`.
"""

from __future__ import annotations

from typing import Final

REDACTED: Final = "<redacted>"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return format(REDACTED, spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would carry the value out in the clear; configs are never pickled.
        raise TypeError("a Secret cannot be pickled")
