"""Weights: local safetensors folders (diffusers / Hugging Face layouts) <-> Flax params."""
