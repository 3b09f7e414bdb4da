"""A params-only orbax store: one param tree plus a JSON sidecar for everything that is not an
array (the pipeline checkpoints of `rig-convert to-orbax`). Resumable train state lives in train/.

Orbax writes into a temporary folder and renames it on success (`commit_success.txt`), so a
crash never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from rig_jax.errors import WeightsError

PARAMS_DIR = "params"
METADATA_FILE = "rig_metadata.json"


def save_checkpoint(path: str, params: Any, metadata: dict[str, Any] | None = None,
                    overwrite: bool = False) -> None:
    """Saves `params` (any pytree of arrays) to `path/params` and `metadata` to
    `path/rig_metadata.json`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    params_path = os.path.join(path, PARAMS_DIR)
    if os.path.exists(params_path) and not overwrite:
        raise WeightsError(f"{path}: checkpoint already exists (pass overwrite to replace it)")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_path, params, force=overwrite)
    checkpointer.wait_until_finished()
    tmp = os.path.join(path, METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metadata or {}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, METADATA_FILE))


def load_metadata(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise WeightsError(f"{meta_path}: not a rig_jax checkpoint (metadata file missing)")
    with open(meta_path) as f:
        return json.load(f)


def load_checkpoint(path: str, abstract: Any = None, shardings: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores `(params, metadata)`. With `abstract` (a tree of ShapeDtypeStructs) and
    optionally `shardings`, arrays are restored with those shapes and placed sharded."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise WeightsError(f"{path}: no checkpoint (missing {PARAMS_DIR}/)")
    metadata = load_metadata(path)
    if abstract is not None and shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(params_path, abstract)
    except (ValueError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{params_path}: does not match the expected tree ({reason})") from None
    return params, metadata
