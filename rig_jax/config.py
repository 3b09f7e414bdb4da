"""Python configs (`configs/*.py`, `get_config(arg) -> ConfigDict`) with absl overrides.

`--config=configs/x.py:variant --config.a.b=v` is parsed by ml_collections'
`config_flags`; this module turns every way that can fail (unknown field, wrong type,
missing file, impossible mesh) into one line naming the field, and exit status 2.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rig_jax.errors import ConfigError

CONFIG_FLAG = "config"


def base_config() -> ml_collections.ConfigDict:
    """Fields every job shares: the mesh, its logical axis rules, multi-host start-up."""
    from rig_jax.parallel.rules import DEFAULT_RULES

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)          # (data, fsdp, tensor); one -1 fills the rest
    c.mesh.rules = DEFAULT_RULES
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False      # call jax.distributed.initialize()
    c.distributed.coordinator_address = ""   # empty: auto-detect (TPU pods)
    c.distributed.num_processes = -1
    c.distributed.process_id = -1
    c.distributed.local_device_ids = ()
    return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way config_flags does, with errors that name the file."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_rig_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{CONFIG_FLAG}="):
            return a.split("=", 1)[1]
        if a == f"--{CONFIG_FLAG}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], source: str) -> None:
    """Raises ConfigError naming the first `--config.a.b=v` whose field does not exist."""
    for a in argv:
        if not a.startswith(f"--{CONFIG_FLAG}."):
            continue
        key = a[len(CONFIG_FLAG) + 3:].split("=", 1)[0]
        node: Any = config
        walked = []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                hint = difflib.get_close_matches(part, known, n=1)
                where = ".".join(walked) or "the top level"
                raise ConfigError(
                    f"--config.{key}: unknown field {part!r} at {where} of {source}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            node = node[part]
            walked.append(part)


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


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for `app.run`: one-line errors, exit 2."""
    spec = _config_spec(argv)
    if spec and not os.path.isfile(spec.partition(":")[0]):
        _fail(f"--config: file not found: {spec.partition(':')[0]}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # config_flags raises AttributeError/KeyError for unknown fields
        if spec:
            try:
                check_overrides(load_config_file(spec), argv, spec.partition(":")[0])
            except ConfigError as ce:
                _fail(str(ce))
            except Exception as le:
                _fail(f"--config={spec}: {type(le).__name__}: {le}")
        _fail(f"{type(e).__name__}: {e}".splitlines()[0])
    return []  # unreachable: _fail exits


def define_config_flag(default: str | None = None) -> Any:
    """Defines `--config` (a Python config file) and returns its flag holder."""
    return config_flags.DEFINE_config_file(
        CONFIG_FLAG, default, "Config file, e.g. configs/shapes.py:demo", lock_config=True)


def run_with_config(main: Callable[[ml_collections.ConfigDict], Any], config_holder: Any) -> None:
    """`absl.app.run` with one-line config errors: parses flags, validates the config
    (mesh against devices, axis rules), then calls `main(config)`; a RigError raised by
    `main` also ends in one line and exit 2."""
    from rig_jax.cli import run_cli

    def absl_main(argv: Sequence[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # no backend-probing INFO lines
        if len(argv) > 1:
            _fail(f"unexpected arguments: {' '.join(argv[1:])}")
        config = config_holder.value
        if config is None:
            _fail("--config is required, e.g. --config=configs/shapes.py:demo")
        run_cli(_validated_main, main, config)

    app.run(absl_main, flags_parser=_parse_flags)


def _validated_main(main: Callable[[ml_collections.ConfigDict], Any],
                    config: ml_collections.ConfigDict) -> Any:
    from rig_jax.parallel.mesh import maybe_initialize_distributed

    if "distributed" in config:
        maybe_initialize_distributed(config.distributed)
    validate_config(config)
    return main(config)
