"""Reading a JSON config: typed field access that names the key path in every error.

`JsonObject` wraps one object of the document and knows where it sits, so a bad value reports
e.g. `device.backend.config.dir: expected a string, got a number`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from vhostfs.storage.secret import Secret


class ConfigError(ValueError):
    """The config cannot be used; the message starts with the offending key path."""


class UnsupportedConfigError(ConfigError):
    """Well-formed, but asks for something vhostfs does not do (yet)."""


_REQUIRED: Final = object()


class JsonObject:
    """A JSON object and where it sits in the document, for error messages."""

    def __init__(self, fields: Mapping[str, Any], where: str) -> None:
        self._fields = fields
        self._where = where

    @classmethod
    def of(cls, value: object, where: str) -> JsonObject:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {_json_type(value)}")
        return cls(value, where)

    def path(self, key: str) -> str:
        return key if self._where == "config" else f"{self._where}.{key}"

    def names(self) -> list[str]:
        return list(self._fields)

    def has(self, key: str) -> bool:
        return key in self._fields and self._fields[key] is not None

    def _get(self, key: str, default: object) -> object:
        if self.has(key):
            return self._fields[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.path(key)}: required")
        return default

    def section(self, key: str) -> JsonObject:
        return JsonObject.of(self._get(key, _REQUIRED), self.path(key))

    def sections(self, key: str) -> list[JsonObject]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self.path(key)}: expected a list of objects")
        return [JsonObject.of(item, f"{self.path(key)}[{i}]") for i, item in enumerate(value)]

    def string(self, key: str, default: object = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path(key)}: expected a string, got {_json_type(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def optional_secret(self, key: str) -> Secret | None:
        """A credential; blank (nydusd: whitespace only) means none."""
        value = self.optional_string(key)
        return Secret(value) if value is not None and value.strip() else None

    def strings(self, key: str) -> list[str]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self.path(key)}: expected a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.path(key)}[{i}]: expected a string, got {_json_type(item)}"
                )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(key)}: expected true or false, got {_json_type(value)}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path(key)}: expected an integer, got {_json_type(value)}")
        if not low <= value <= high:
            raise ConfigError(f"{self.path(key)}: {value} is outside {low}..{high}")
        return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
