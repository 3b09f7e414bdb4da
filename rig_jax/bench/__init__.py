"""rig-benchmark's harness: rig_jax against the PyTorch references on the same saved weights.

models.py (the random reference models, saved once, and the shared inputs), jax_side.py and
peers.py (each bench's two sides), workers.py (one process per side, a line protocol),
driver.py (interleaved rounds, the JSON record), flops.py (model FLOPs, device peaks),
loop.py (Generate-Reflect-Edit on the committed ShapesSG models, rig_jax only).
"""
