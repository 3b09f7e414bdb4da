"""The runtime install (`pip install -e .`, what `make demo` does) must be enough to run the
package: the test extras pull in more (torch brought jinja2, which transformers'
`apply_chat_template` needs, and `make demo` on a fresh machine failed without it while CI
passed). So a subprocess blocks every module whose distribution is not reachable from
rig_jax's declared runtime dependencies, then imports every rig_jax module and renders the
committed Actor's chat prompt."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.helpers import ROOT, tool_env

ACTOR = os.path.join(ROOT, "pretrained", "shapes_sg", "actor")

# Runs in the child: the blocked top-level modules are set to None in sys.modules, so importing
# one fails and `importlib.util.find_spec` (transformers' availability checks) answers None, as
# if it were not installed; then every module of the package is imported and a prompt rendered.
CHILD = r"""
import importlib, json, pkgutil, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
import rig_jax
for info in pkgutil.walk_packages(rig_jax.__path__, "rig_jax."):
    importlib.import_module(info.name)   # (rig-benchmark's torch peers import torch inside functions)
from rig_jax.vlm.pipeline import load_tokenizer
from rig_jax.vlm.processor import build_prompt
prompt = build_prompt(load_tokenizer(sys.argv[2]), "is the red circle left of the blue square?")
print("PROMPT", json.dumps(prompt))
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _runtime_closure() -> set[str]:
    """Normalised names of the runtime dependencies pyproject.toml declares and everything they
    require, following the extras each requirement names (markers evaluated for this
    interpreter). pyproject.toml, not the installed metadata, which an editable install leaves
    stale until it is reinstalled."""
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    applies = lambda req, extra: req.marker is None or req.marker.evaluate({"extra": extra})
    todo = [req for req in map(Requirement, declared) if applies(req, "")]
    done: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        for extra in {""} | req.extras:
            if (_norm(req.name), extra) in done:
                continue
            done.add((_norm(req.name), extra))
            try:
                needs = md.requires(req.name) or []
            except md.PackageNotFoundError:   # declared, not installed: importing it fails anyway
                continue
            todo.extend(r for r in map(Requirement, needs) if applies(r, extra))
    return {name for name, _ in done}


def _blocked_modules(closure: set[str]) -> list[str]:
    """Installed top-level modules none of whose distributions is in the closure."""
    return sorted(module for module, dists in md.packages_distributions().items()
                  if not module.startswith("_") and module not in sys.stdlib_module_names
                  and not any(_norm(d) in closure or _norm(d) == "rig-jax" for d in dists))


def test_the_runtime_dependencies_alone_import_the_package_and_render_a_chat_prompt():
    closure = _runtime_closure()
    assert {"jax", "flax", "transformers"} <= closure
    blocked = _blocked_modules(closure)
    assert {"torch", "diffusers", "pytest"} <= set(blocked)   # the test extras are refused
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(blocked), ACTOR], env=tool_env(),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = json.loads(result.stdout.split("PROMPT ", 1)[1])
    assert "is the red circle left of the blue square?" in prompt
