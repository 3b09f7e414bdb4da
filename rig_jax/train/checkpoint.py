"""Train checkpoints: orbax `CheckpointManager` over `<workdir>/checkpoints`.

One checkpoint holds three items: `state` (the TrainState, sharded arrays as they are),
`data` (the grain iterator's state) and `host` (host-side statistics: counters, wall time,
anything a job keeps outside jit), so a resumed run continues exactly. Saves are async and
atomic (orbax writes to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact); the newest `keep` are kept. Every host
takes part in saving and restoring (orbax coordinates the processes).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from rig_jax.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined leaf paths -> shapes; dataclass fields, dict keys and tuple indices alike, so
    the live state and orbax's metadata tree (plain dicts) compare."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(e) for e in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


class TrainCheckpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "host": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_state: Any, host_state: Any) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            host=ocp.args.JsonSave(host_state)))

    def restore(self, step: int, like_state: Any) -> tuple[Any, Any, Any]:
        """Restores checkpoint `step` onto the shardings and shapes of `like_state` (a state of
        this job); a checkpoint of another model is a ConfigError naming its path and the
        first param path that differs."""
        self._check_compatible(step, like_state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            host=ocp.args.JsonRestore()))
        return restored.state, restored.data, restored.host

    def _check_compatible(self, step: int, like_state: Any) -> None:
        path = self.path(step)
        try:
            stored = self.manager.item_metadata(step).state
        except Exception as e:  # unreadable metadata: not a checkpoint of this kind
            raise ConfigError(f"{path}: not a readable train checkpoint ({type(e).__name__})") from None
        have, want = leaf_shapes(stored), leaf_shapes(like_state)
        for key in sorted(set(have) | set(want)):
            if key not in have:
                raise ConfigError(f"{path}: checkpoint of another model: it has no {key}")
            if key not in want:
                raise ConfigError(f"{path}: checkpoint of another model: unexpected {key}")
            if have[key] != want[key]:
                raise ConfigError(f"{path}: checkpoint of another model: {key} has shape {have[key]}, "
                                  f"this job's is {want[key]}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
