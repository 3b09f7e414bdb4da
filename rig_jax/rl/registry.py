"""Name -> function tables, so a study adds an estimator, loss or reward without editing the trainer.

Each table names the module holding its built-ins and imports it on the first lookup, so
`ADVANTAGES.get("grpo", ...)` works without the caller importing `rig_jax.rl.advantages` first.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from rig_jax.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """name -> function, so a study adds an estimator / loss / reward without editing the trainer."""

    def __init__(self, kind: str, builtin_module: str):
        self.kind = kind
        self.builtin_module = builtin_module
        self._entries: dict[str, Callable[..., Any]] = {}
        self._builtins_loaded = False

    def _load_builtins(self) -> None:
        # A module part-way through its own import is already in sys.modules, so this never
        # recurses; the flag is set only after success, so a failed import is retried and re-raised.
        if not self._builtins_loaded:
            importlib.import_module(self.builtin_module)
            self._builtins_loaded = True

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`; a second function under one name is refused."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"(by {self._entries[name].__module__})")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str, field: str) -> Callable[..., Any]:
        """The function under `name`; an unknown name is a ConfigError naming the config `field`."""
        self._load_builtins()
        if name not in self._entries:
            raise ConfigError(f"{field}: unknown {self.kind} {name!r} (known: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        self._load_builtins()
        return tuple(sorted(self._entries))


ADVANTAGES = Registry("advantage estimator", "rig_jax.rl.advantages")
LOSSES = Registry("loss", "rig_jax.rl.losses")
REWARDS = Registry("reward", "rig_jax.rl.rewards")
