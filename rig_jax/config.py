"""One command-line grammar for every tool: Python configs with dotted overrides.

    rig-<tool> --config=configs/<file>.py:<variant> --config.a.b=v [short flags]

`configs/<file>.py` defines `get_config(variant) -> ConfigDict`; `--config.a.b=v` (or
`--config.a.b v`) sets an existing field, its value parsed by the field's type (strings as
given, numbers, booleans, Python literals for tuples). Short flags (`--steps 3`) are sugar:
each sets one config field, and `--config.*` overrides are applied after them. Every way
this can fail (missing file, unknown variant, unknown field, wrong type, impossible mesh) is
a ConfigError naming the file, flag or field: one line on stderr and exit status 2.

Every field either acts or is refused (`check_config`): a field set on the command line that
the job would not read with this config (`unread_fields`: shared rules, plus the config
module's own `unread_fields(config)`) is refused with the reason, as is `--config.variant`;
a config module may also define `check_config(config)` (ValueError: one line).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    return _load_config_module(spec)[1]


def _variants_hint(module: Any, message: str) -> str:
    """` (variants: a, b)` from the module's VARIANTS when the message does not list them all."""
    variants = [str(v) for v in getattr(module, "VARIANTS", ())]
    if not variants or all(v in message for v in variants):
        return ""
    return f" (variants: {', '.join(variants)})"


def _load_config_module(spec: str) -> tuple[Any, ml_collections.ConfigDict]:
    """(the config module, its `get_config(variant)`) for `path.py[:variant]`."""
    path, _, arg = spec.partition(":")
    if not path.strip():
        raise ConfigError(f"--config={spec}: no file given (expected FILE.py[:VARIANT])")
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
        # the whole reason on one line (a KeyError's str() is only the quoted key)
        reason = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        reason = " ".join(line.strip() for line in reason.splitlines() if line.strip()) or type(e).__name__
        if isinstance(e, KeyError):
            reason = f"unknown variant {arg!r} ({type(e).__name__}: {reason})"
        raise ConfigError(f"--config={spec}: {reason}{_variants_hint(module, reason)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config returned {type(config).__name__}, not a ConfigDict")
    return module, config


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
        _check_elements(value, current, flag)
        return type(current)(value)
    return value


def _scalar_kind(value: Any) -> type | None:
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind
    return None


def _check_elements(value: Sequence[Any], current: Sequence[Any], flag: str) -> None:
    """A tuple field whose entries all have one scalar type keeps it: `mesh.shape=(2.5, 1, 1)`
    or `('a', 1, 1)` is refused, not truncated or passed on to fail deep inside a job."""
    kinds = {_scalar_kind(v) for v in current}
    if len(kinds) != 1 or None in kinds:
        return
    kind = kinds.pop()
    accepted = (int, float) if kind is float else (kind,)
    for v in value:
        if not isinstance(v, accepted) or (kind is not bool and isinstance(v, bool)):
            raise ConfigError(f"{flag}: every entry must be {'a' if kind is not int else 'an'} "
                              f"{kind.__name__} (as in {tuple(current)!r}), got {v!r}")


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

    def flag_of(self, dest: str) -> str:
        """The command-line spelling of the short flag that sets field `dest`."""
        for action in self._actions:
            if action.dest == dest:
                return action.option_strings[0] if action.option_strings else action.metavar or dest
        return f"--{dest}"

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def parse_config(argv: Sequence[str], parser: SugarParser) -> ml_collections.ConfigDict:
    """The config a tool runs with: the file and variant of `--config` (or the tool's default),
    then the short flags, then the `--config.a.b=v` overrides; the result is checked
    (`check_config`) and locked."""
    spec, overrides, rest = split_argv(argv)
    if spec is not None and not spec.strip():
        raise ConfigError(f"--{CONFIG_FLAG}: empty; give FILE.py[:VARIANT] or leave the flag out "
                          f"(default {parser.default_config})")
    spec = spec or parser.default_config
    source = resolve_config_path(spec.partition(":")[0])
    module, config = _load_config_module(spec)
    set_by: dict[str, str] = {}
    for dest, value in vars(parser.parse_args(rest)).items():
        flag = f"{parser.flag_of(dest)} (sugar flag)"
        set_field(config, dest, value, source, flag)
        set_by[dest] = flag
    set_by.update(apply_overrides(config, overrides, spec, module))
    check_config(config, module, set_by)
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]], spec: str,
                    module: Any = None) -> dict[str, str]:
    """Sets each `(field, raw value)` of `split_argv`'s `--config.*` list on `config` (loaded from
    `spec`), typed as the field it replaces; returns {field: the flag that set it}."""
    source = resolve_config_path(spec.partition(":")[0])
    set_by = {}
    for key, raw in overrides:
        flag = f"--{CONFIG_FLAG}.{key}={raw}"
        if key == "variant":
            file = spec.partition(":")[0]
            raise ConfigError(f"{flag}: the variant is chosen by --{CONFIG_FLAG}={file}:VARIANT, not "
                              f"overridden{_variants_hint(module, '') if module else ''}")
        parent, name = _field(config, key, source)
        set_field(config, key, parse_value(raw, parent[name], flag), source, flag)
        set_by[key] = flag
    return set_by


# Fields where a negative number has no meaning (a seed, a noise scale, DDIM's eta, a CFG
# scale), matched by the last name of the dotted field, in every config.
NON_NEGATIVE = ("seed", "*_seed", "eta", "*noise*", "*sigma*", "guidance_scale")
SEEDS = ("seed", "*_seed")          # and below 2**63: numpy's and jax's seeds are 64-bit


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def unread_fields(config: ml_collections.ConfigDict, module: Any = None) -> dict[str, str]:
    """Field (or section) -> why no job reads it with this config: the `distributed` fields other
    than `enabled` when it is off (every tool), then the config module's own
    `unread_fields(config)`."""
    unread: dict[str, str] = {}
    dist = config.get("distributed")
    if isinstance(dist, ml_collections.ConfigDict) and not dist.get("enabled", True):
        for key in dist:
            if key != "enabled":
                unread[f"distributed.{key}"] = "distributed.enabled is False"
    hook = getattr(module, "unread_fields", None)
    if hook is not None:
        unread.update(hook(config))
    return unread


def check_config(config: ml_collections.ConfigDict, module: Any = None,
                 set_by: Mapping[str, str] | None = None) -> None:
    """Every field either acts or is refused: the fields given on the command line (`set_by`:
    field -> the flag that set it) must be ones the job reads, NON_NEGATIVE fields are >= 0,
    seeds are integers below 2**63, and the module's own `check_config(config)` (ValueError:
    one line) passes."""
    set_by = set_by or {}
    unread = unread_fields(config, module)
    for key, flag in set_by.items():
        for field, reason in unread.items():
            if key == field or key.startswith(field + "."):
                raise ConfigError(f"{flag}: {field} is not read with this config: {reason}")
    for key, value in _leaves(config):
        name = key.rsplit(".", 1)[-1]
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in NON_NEGATIVE):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{set_by.get(key, key)}: must be a finite number >= 0, got {value!r}")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in SEEDS) and (
                not isinstance(value, int) or value >= 2 ** 63):
            raise ConfigError(f"{set_by.get(key, key)}: a seed must be an integer in [0, 2**63), "
                              f"got {value!r}")
    hook = getattr(module, "check_config", None)
    if hook is not None:
        try:
            hook(config)
        except ValueError as e:
            message = " ".join(str(e).split())
            field, sep, rest = message.partition(":")
            raise ConfigError(f"{set_by[field]}:{rest}" if sep and field in set_by else message) from None


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
                     parser: SugarParser, command_line: bool = False) -> Any:
    from rig_jax.parallel.mesh import maybe_initialize_distributed
    from rig_jax.runtime import apply_cpu_hugepages, apply_cpu_inline

    config = parse_config(argv, parser)    # reads config files only: no jax backend starts here
    # rig_jax.runtime, before any backend starts; the huge-page tunable may execute the process
    # again, which only a command-line start (not a notebook or a test's call) can do
    interactive = hasattr(sys, "ps1") or "ipykernel" in sys.modules
    apply_cpu_hugepages(config.get("cpu_hugepages", "0"), restart=command_line and not interactive)
    apply_cpu_inline(config.get("cpu_inline", "0"))
    if "distributed" in config:
        maybe_initialize_distributed(config.distributed)
    validate_config(config)
    return main(config)


def run_tool(main: Callable[[ml_collections.ConfigDict], Any], argv: Sequence[str] | None,
             parser: SugarParser) -> Any:
    """A tool's entry point: parse the config (`sys.argv[1:]` when `argv` is None), apply the
    host settings (rig_jax.runtime; started from the command line, `argv` None, a tool may
    execute itself again with glibc's huge-page tunable), start multi-host if configured,
    validate, run `main(config)`; a RigError anywhere ends in one line and exit status 2."""
    from rig_jax.cli import run_cli

    return run_cli(_configured_main, main, sys.argv[1:] if argv is None else list(argv), parser,
                   command_line=argv is None)
