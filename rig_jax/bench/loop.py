"""The `loop` bench: Generate-Reflect-Edit images/s on the committed ShapesSG models.

The Diffuser (= the Editor's weights), the VLM Actor and the pixel Checker of
pretrained/shapes_sg run `rig.loop.generate_reflect_edit` on prompts drawn from the ShapesSG
world, one compiled batch. rig_jax only: no PyTorch implementation of the loop exists, so
there is no peer to time beside it (the JSON line says so)."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.bench.jax_side import JaxTask

NO_PEER = "no PyTorch implementation of Generate-Reflect-Edit exists; rig_jax side only"


def _repo_path(path: str) -> str:
    import rig_jax
    root = os.path.dirname(os.path.dirname(rig_jax.__file__))
    return path if os.path.isabs(path) else os.path.join(root, path)


def _read(folder: str, name: str) -> dict[str, Any]:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def loop(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """`spec["batch"]` prompts through K = `max_rounds` rounds at `steps` DDIM steps (the
    Editor re-denoises from strength 0.5, plain DDIM inversion)."""
    from rig_jax.data import shapes
    from rig_jax.diffusion.settings import EditSettings, InversionSettings, NullTextSettings, SamplerSettings
    from rig_jax.rig.actor import ActorSettings, VLMActor
    from rig_jax.rig.checker import ShapesChecker
    from rig_jax.rig.loop import Models, RoundSettings, generate_reflect_edit
    from rig_jax.vlm.pipeline import load_vlm_pipeline
    from rig_jax.weights.diffusers_pipeline import load_pipeline

    diffuser, actor_dir = _repo_path(spec["diffuser"]), _repo_path(spec["actor"])
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[spec["dtype"]]
    described = _read(diffuser, shapes.WORLD_FILE)
    world = shapes.ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in described["world"].items()})
    sampler = SamplerSettings(**{**described["sampler"], "num_steps": spec["steps"]})
    edit = EditSettings(0.5, sampler, InversionSettings(1.0, 0), NullTextSettings(False, 0, 0.0, 0.0, 0.0))
    pipe, params = load_pipeline(diffuser, dtype=dtype)
    vlm, vlm_params = load_vlm_pipeline(actor_dir, dtype=dtype)
    actor = VLMActor(vlm, ActorSettings(temperature=_read(actor_dir, "generation_config.json")["temperature"],
                                        max_new_tokens=32))
    models = Models(pipe, params, params, sampler, edit, ShapesChecker(world), actor, vlm_params)
    graphs = [shapes.scene_graph(s) for s in shapes.generate_scenes(spec["seed"], spec["batch"], world)]
    settings = RoundSettings(max_rounds=spec["max_rounds"], batch_size=spec["batch"])

    def call() -> Any:
        return generate_reflect_edit(models, graphs, jax.random.PRNGKey(spec["seed"]), settings)

    def outputs(records: Any) -> dict[str, np.ndarray]:
        return {"edits": np.asarray([r.rounds_used for r in records], np.int32)}

    return JaxTask(None, (), outputs, lambda: 0.0, {"no_peer": NO_PEER, "prompts": len(graphs)}, call=call)
