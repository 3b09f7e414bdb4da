"""Model FLOPs of the accelerator shapes, counted by XLA on any machine (no weights, no device).

    python tools/model_flops.py          # the figures docs/benchmarks.md's v5e-256 plan uses

SD-1.5's U-Net (one guided DDIM step of one image: the CFG pair at 64x64 latents, 77 tokens;
and its forward + backward) and Qwen2.5-VL-7B's text model (a teacher-forced pass over a
512-token prompt and a 128-token completion, logits at the completion, as the Actor's update
scores it; and its gradient), each lowered with abstract weights and read with XLA's HLO cost
analysis on the generic graph (rig_jax/bench/flops.py), as the benches count MFU.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import jax
    import jax.numpy as jnp

    from configs import common
    from rig_jax.bench.flops import call_flops
    from rig_jax.models.qwen2_5_vl.lm import TextConfig
    from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs
    from rig_jax.models.unet import UNet2DConditionModel, UNetConfig
    from rig_jax.vlm.decode import score

    spec = jax.ShapeDtypeStruct
    shapes = common.shapes()
    unet = UNet2DConditionModel(UNetConfig(**shapes.unet.sd15.unet.to_dict()), dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 64, 64, 4)),
                                              jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 768))))["params"]
    x, t, ctx = spec((2, 64, 64, 4), jnp.bfloat16), spec((2,), jnp.int32), spec((2, 77, 768), jnp.bfloat16)
    forward = lambda p, x, t, c: unet.apply({"params": p}, x, t, c)
    loss = lambda p, x, t, c: jnp.mean(forward(p, x, t, c).astype(jnp.float32))
    print(json.dumps({"model": "sd15 unet", "params": sum(v.size for v in jax.tree.leaves(params)),
                      "guided_step_flops": call_flops(forward, params, x, t, ctx),
                      "guided_step_fwd_bwd_flops": call_flops(jax.grad(loss), params, x, t, ctx)}),
          flush=True)

    fields = dict(shapes.decoder.qwen2_5_vl_7b)
    tied = fields.pop("tie_word_embeddings")
    fields.pop("name")
    config = Qwen25VLConfig(text=TextConfig(**fields), vision=None, tie_word_embeddings=tied)
    model = Qwen25VL(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    qparams = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config)))["params"]
    prompt, completion = 512, 128
    batch = {"input_ids": spec((1, prompt), jnp.int32), "attention_mask": spec((1, prompt), jnp.int32),
             "position_ids": spec((3, 1, prompt), jnp.int32), "rope_deltas": spec((1,), jnp.int32)}
    comps = spec((1, completion), jnp.int32)
    logp = lambda p, b, c: score(model, p, b, c)
    print(json.dumps({"model": "qwen2.5-vl-7b text", "params": sum(v.size for v in jax.tree.leaves(qparams)),
                      "prompt": prompt, "completion": completion,
                      "sequence_flops": call_flops(logp, qparams, batch, comps),
                      "sequence_grad_flops": call_flops(jax.grad(lambda p, b, c: jnp.sum(logp(p, b, c))),
                                                        qparams, batch, comps)}), flush=True)


if __name__ == "__main__":
    main()
