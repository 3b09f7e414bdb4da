"""rig_jax: RL-RIG (Generate-Reflect-Edit with Reflection-GRPO) in JAX/Flax."""

__version__ = "0.1.0"
