"""One command-line grammar for every tool: Python configs with dotted overrides.

    rig-<tool> --config=configs/<file>.py:<variant> --config.a.b=v [short flags]

`configs/<file>.py` defines `get_config(variant) -> ConfigDict`; `--config.a.b=v` (or
`--config.a.b v`) sets an existing field, its value parsed by the field's type (strings as
given, numbers, booleans, Python literals for tuples). Short flags (`--steps 3`) are sugar:
each sets one config field, and `--config.*` overrides are applied after them. Every way
this can fail (missing file, unknown variant, unknown field, wrong type, impossible mesh) is
a ConfigError naming the file, flag or field: one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from rig_jax.errors import ConfigError

CONFIG_FLAG = "config"
# The repository root: default config paths of the tools resolve against it, so a console
# script started from another folder still finds `configs/`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
    """`path` as given when it exists, else relative to the repository root."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.isfile(in_repo) else path


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:variant]`; the folder above the file's folder is importable, so a config
    in `configs/` can `from configs import common`."""
    path, _, arg = spec.partition(":")
    path = resolve_config_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {spec.partition(':')[0]}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_rig_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as e:
        raise ConfigError(f"--config: {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(variant)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config={spec}: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def _field(config: ml_collections.ConfigDict, key: str, source: str) -> tuple[Any, str]:
    """(parent ConfigDict, last name) of the dotted `key`; an unknown name is a ConfigError."""
    node: Any = config
    walked: list[str] = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, known, n=1)
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"--config.{key}: unknown field {part!r} at {where} of {source}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if i == len(parts) - 1:
            return node, part
        node = node[part]
        walked.append(part)
    raise ConfigError(f"--config.{key}: empty field name")


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], source: str) -> None:
    """Raises ConfigError naming the first `--config.a.b=v` whose field does not exist."""
    for key, _ in split_argv(argv)[1]:
        _field(config, key, source)


def parse_value(raw: str, current: Any, flag: str) -> Any:
    """A command-line string as the type of the field it replaces."""
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"{flag}: is a section; set one of its fields ({', '.join(sorted(current))})")
    if isinstance(current, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{flag}: expected True or False")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{flag}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{flag}: expected a number") from None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{flag}: expected a Python literal like (1, -1, 1)") from None
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    return value


def set_field(config: ml_collections.ConfigDict, key: str, value: Any, source: str, flag: str) -> None:
    """Sets the existing dotted field `key`; a value of the wrong type is a ConfigError naming `flag`."""
    parent, name = _field(config, key, source)
    current = parent[name]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        parent[name] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag}: {str(e).splitlines()[0]}") from None


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(`--config` spec, [(field, raw value)] of `--config.*`, the other arguments)."""
    spec, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == f"--{CONFIG_FLAG}" or a.startswith(f"--{CONFIG_FLAG}=") or a.startswith(f"--{CONFIG_FLAG}."):
            name, has_value, value = a[2:].partition("=")
            if not has_value:
                if i + 1 >= len(args):
                    raise ConfigError(f"{a}: expects a value")
                value = args[i + 1]
                i += 1
            if name == CONFIG_FLAG:
                spec = value
            else:
                overrides.append((name[len(CONFIG_FLAG) + 1:], value))
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest


class SugarParser(argparse.ArgumentParser):
    """argparse for a tool's short flags: each flag's `dest` is the config field it sets
    (`dest="sampler.num_steps"`), and a usage error is a one-line ConfigError."""

    def __init__(self, prog: str, description: str, default_config: str, **kwargs: Any):
        epilog = (f"Config: --config=FILE.py:VARIANT (default {default_config}) and --config.a.b=VALUE "
                  "overrides, applied after the short flags.")
        super().__init__(prog=prog, description=description, epilog=epilog,
                         argument_default=argparse.SUPPRESS, allow_abbrev=False, **kwargs)
        self.default_config = default_config

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def parse_config(argv: Sequence[str], parser: SugarParser) -> ml_collections.ConfigDict:
    """The config a tool runs with: the file and variant of `--config` (or the tool's default),
    then the short flags, then the `--config.a.b=v` overrides; the result is locked."""
    spec, overrides, rest = split_argv(argv)
    spec = spec or parser.default_config
    source = resolve_config_path(spec.partition(":")[0])
    config = load_config_file(spec)
    for dest, value in vars(parser.parse_args(rest)).items():
        set_field(config, dest, value, source, f"--{dest} (sugar flag)")
    for key, raw in overrides:
        parent, name = _field(config, key, source)
        flag = f"--{CONFIG_FLAG}.{key}={raw}"
        set_field(config, key, parse_value(raw, parent[name], flag), source, flag)
    config.lock()
    return config


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks what a ConfigDict cannot: the mesh against the devices, the axis rules."""
    import jax

    from rig_jax.parallel.mesh import resolve_mesh_shape
    from rig_jax.parallel.rules import rules_from_config

    if "mesh" in config:
        if num_devices is None:
            num_devices = jax.device_count()
        resolve_mesh_shape(config.mesh.shape, num_devices)
        rules_from_config(config.mesh.rules)


def _configured_main(main: Callable[[ml_collections.ConfigDict], Any], argv: Sequence[str],
                     parser: SugarParser) -> Any:
    from rig_jax.parallel.mesh import maybe_initialize_distributed

    config = parse_config(argv, parser)
    if "distributed" in config:
        maybe_initialize_distributed(config.distributed)
    validate_config(config)
    return main(config)


def run_tool(main: Callable[[ml_collections.ConfigDict], Any], argv: Sequence[str] | None,
             parser: SugarParser) -> Any:
    """A tool's entry point: parse the config (`sys.argv[1:]` when `argv` is None), start
    multi-host if configured, validate, run `main(config)`; a RigError anywhere ends in one
    line and exit status 2."""
    from rig_jax.cli import run_cli

    return run_cli(_configured_main, main, sys.argv[1:] if argv is None else list(argv), parser)
