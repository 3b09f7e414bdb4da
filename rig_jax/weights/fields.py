"""One reader for the fields of a diffusers / transformers `config.json`.

Every config reader in rig_jax/weights goes through `FieldReader`: a field is parsed (with
its type checked), takes the library's default when absent, or is refused with a one-line
ConfigError that names the file and the field. A reader never guesses: a value it cannot
honour stops the load instead of building a different network.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from rig_jax.errors import ConfigError

_MISSING = object()


class FieldReader:
    """The fields of one JSON object `values` read from `source` (a file name for errors).

    `defaults` are the library's values for absent fields; `prefix` is how the object is
    reached from the file's top level (`"vision_config."`), so messages name the full field.
    """

    def __init__(self, values: Any, source: str, defaults: Mapping[str, Any] | None = None,
                 prefix: str = ""):
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(values).__name__}")
        self.values = values
        self.source = source
        self.defaults = dict(defaults or {})
        self.prefix = prefix

    def fail(self, message: str) -> ConfigError:
        """A ConfigError for this file: `<source>: <message>`."""
        return ConfigError(f"{self.source}: {message}")

    def name(self, field: str) -> str:
        return f"{self.prefix}{field}"

    def has(self, field: str) -> bool:
        return field in self.values

    def raw(self, field: str, default: Any = _MISSING) -> Any:
        """The value as written, else `default`, else the library default; absent with neither
        is a ConfigError (`field X is missing`)."""
        if field in self.values:
            return self.values[field]
        if default is not _MISSING:
            return default
        if field in self.defaults:
            return self.defaults[field]
        raise self.fail(f"field {self.name(field)} is missing")

    def merged(self) -> dict[str, Any]:
        """The library defaults overlaid with the fields given (keys starting with `_` left out)."""
        return {**self.defaults, **{k: v for k, v in self.values.items() if not k.startswith("_")}}

    def unknown(self, known: Collection[str], ignored: Callable[[str], bool] = lambda k: False) -> list[str]:
        """Fields (sorted) that are neither `known` nor `ignored` (metadata)."""
        return sorted(k for k in self.values if k not in known and not ignored(k))

    def refuse_unknown(self, known: Collection[str], what: str,
                       ignored: Callable[[str], bool] = lambda k: False) -> None:
        """`unknown field X for <what>` on the first field the reader does not know."""
        extra = self.unknown(known, ignored)
        if extra:
            raise self.fail(f"unknown field {self.name(extra[0])} for {what}")

    # ---- typed reads (each names the field on a wrong value) --------------------------

    def integer(self, field: str, minimum: int = 1, default: Any = _MISSING) -> int:
        return self.as_integer(field, self.raw(field, default), minimum)

    def as_integer(self, field: str, value: Any, minimum: int = 1) -> int:
        """`value` (e.g. one entry of a list field) checked as an integer >= `minimum`."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"field {self.name(field)} must be an integer >= {minimum}, got {value!r}")
        return value

    def optional_integer(self, field: str, minimum: int = 0, default: Any = _MISSING) -> int | None:
        value = self.raw(field, default)
        return None if value is None else self.integer(field, minimum, value)

    def number(self, field: str, positive: bool = False, default: Any = _MISSING) -> float:
        value = self.raw(field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
            kind = "a positive number" if positive else "a number"
            raise self.fail(f"field {self.name(field)} must be {kind}, got {value!r}")
        return float(value)

    def boolean(self, field: str, default: Any = _MISSING) -> bool:
        value = self.raw(field, default)
        if not isinstance(value, bool):
            raise self.fail(f"field {self.name(field)} must be true or false, got {value!r}")
        return value

    def string(self, field: str, default: Any = _MISSING) -> str:
        value = self.raw(field, default)
        if not isinstance(value, str):
            raise self.fail(f"field {self.name(field)} must be a string, got {value!r}")
        return value

    def choice(self, field: str, allowed: Collection[Any], default: Any = _MISSING) -> Any:
        """A value among `allowed`; anything else is `field X = v; supported: ...`."""
        value = self.raw(field, default)
        if value not in allowed:
            raise self.fail(f"field {self.name(field)} = {value!r}; supported: {tuple(allowed)}")
        return value

    def integers(self, field: str, minimum: int = 1, default: Any = _MISSING) -> tuple[int, ...]:
        """A non-empty list of integers >= `minimum`."""
        value = self.raw(field, default)
        if (not isinstance(value, (list, tuple)) or not value
                or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)):
            raise self.fail(f"field {self.name(field)} must be a non-empty list of integers >= {minimum}, "
                            f"got {value!r}")
        return tuple(value)

    def token_ids(self, field: str, default: Any = _MISSING) -> tuple[int, ...]:
        """Token ids written as one id, a list of ids or null (no id)."""
        value = self.raw(field, default)
        if value is None:
            return ()
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(f"field {self.name(field)} must be token ids, got {value!r}")
        return tuple(values)

    def fixed(self, field: str, reason: str = "not supported by this implementation") -> None:
        """The field must keep its library default (same value and type): a feature rig_jax
        does not build is refused rather than ignored."""
        default = self.defaults[field]
        value = self.raw(field)
        if value != default or type(value) is not type(default):
            raise self.fail(f"unsupported field {self.name(field)}={value!r} (only {default!r}: {reason})")
