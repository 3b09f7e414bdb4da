"""Shared behaviour of the command-line tools: one-line errors, exit status 2."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rig_jax.errors import RigError


def run_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs `main`; a RigError (bad path, key, field) prints `error: <message>` on one
    line to stderr and exits with status 2, instead of a traceback."""
    try:
        return main(*args, **kwargs)
    except RigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
