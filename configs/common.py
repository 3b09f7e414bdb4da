"""Config sections every tool shares; each default is written here and nowhere else.

Tool configs (`configs/<tool>.py`) build their tree from these functions:
    from configs import common
    c = common.base()                 # seed, mesh, distributed
    c.sampler = common.sampler()
Library code reads a section through its settings object (`SamplerSettings.from_config(
config.sampler)`, `EditSettings.from_config(config.editor)`), so a function signature never
repeats a default. Named model shapes (`sd15`, `qwen2.5-vl-7b`, `tiny`) live in `shapes()`.
"""
from __future__ import annotations

import ml_collections

from rig_jax.parallel.rules import DEFAULT_RULES


def mesh() -> ml_collections.ConfigDict:
    """The one device mesh `(data, fsdp, tensor)` and the logical axis rules onto it."""
    c = ml_collections.ConfigDict()
    c.shape = (1, -1, 1)          # one -1 fills the rest: by default all devices on fsdp
    c.rules = DEFAULT_RULES       # (logical name, mesh axes) pairs, see rig_jax/parallel/rules.py
    return c


def distributed() -> ml_collections.ConfigDict:
    """Multi-host start-up (`jax.distributed.initialize`); all empty on a TPU pod."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.coordinator_address = ""    # empty: auto-detect (TPU pods)
    c.num_processes = -1
    c.process_id = -1
    c.local_device_ids = ()
    return c


def base() -> ml_collections.ConfigDict:
    """Fields every job has: the seed, the CPU host settings, the mesh and multi-host start-up."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # XLA:CPU host setting (rig_jax.runtime): 0 | 1 | auto (on when jax can only use the CPU);
    # RIG_CPU_INLINE overrides it. Off here: the rollout-heavy jobs ran 1-3 % slower with it.
    c.cpu_inline = "0"
    # glibc's transparent-huge-page tunable (rig_jax.runtime): 0 | 1 | auto (on where jax can only
    # use the CPU and the kernel's THP mode is madvise); RIG_CPU_HUGEPAGES overrides it. A tool
    # started from the command line executes itself again with GLIBC_TUNABLES set. Off: it sped
    # the GRPO stages' updates 20-30 % on one VM and slowed their rollouts 75 % on another
    # (docs/benchmarks.md), so it is an opt-in.
    c.cpu_hugepages = "0"
    c.mesh = mesh()
    c.distributed = distributed()
    return c


def sampler() -> ml_collections.ConfigDict:
    """Guided DDIM sampling (`rig_jax.diffusion.SamplerSettings`)."""
    c = ml_collections.ConfigDict()
    c.num_steps = 50
    c.guidance_scale = 7.5        # exactly 1: the conditional half only
    c.eta = 0.0                   # > 0: stochastic DDIM (the stage-2 policy)
    c.guidance_rescale = 0.0      # diffusers' rescale of the guided output (Lin et al. 2023)
    return c


def inversion() -> ml_collections.ConfigDict:
    """DDIM inversion inside the editor (`rig_jax.diffusion.InversionSettings`)."""
    c = ml_collections.ConfigDict()
    c.guidance_scale = 1.0        # w_inv of docs/method.md
    c.fixed_point_iterations = 0  # 0: plain DDIM inversion, as method.md says
    return c


def null_text() -> ml_collections.ConfigDict:
    """Null-text optimisation of the unconditional embedding (`NullTextSettings`)."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.inner_steps = 10            # Adam iterations per step at most (prompt-to-prompt)
    c.learning_rate = 1e-2        # decayed as lr * (1 - i / (2 S))
    c.early_stop_epsilon = 1e-5   # stop step i once the loss < epsilon + i * slope
    c.early_stop_slope = 2e-5
    return c


def editor() -> ml_collections.ConfigDict:
    """The Inverse Diffuser E (`rig_jax.diffusion.EditSettings`): invert to t_s = strength * T,
    then denoise with `editor.sampler` under `P + ". " + e_k`."""
    c = ml_collections.ConfigDict()
    c.strength = 0.6              # [choice]: 1 regenerates from the inverted noise, 0 keeps I_k
    c.sampler = sampler()
    c.inversion = inversion()
    c.null_text = null_text()
    return c


def vlm() -> ml_collections.ConfigDict:
    """The VLM (Judge, Checker, Actor): a local Hugging Face Qwen2.5-VL folder."""
    c = ml_collections.ConfigDict()
    c.path = ""                   # folder with weights, config.json, tokenizer, preprocessor_config.json
    c.max_new_tokens = 384        # longest answer in tokens
    c.dtype = "bf16"              # compute dtype: bf16 | fp32
    c.pad_to_multiple_of = 64     # prompt lengths padded so similar batches share one compiled program
    return c


def _unet_shape(latent_size: int, context_length: int, **unet: object) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.latent_size = latent_size
    c.context_length = context_length
    c.unet = ml_collections.ConfigDict(unet)   # UNetConfig fields; absent ones take UNetConfig's
    return c


def shapes() -> ml_collections.ConfigDict:
    """Named model shapes (random weights: benchmarks, smoke runs). Keys are config-safe: the
    name `qwen2.5-vl-7b` is the key `qwen2_5_vl_7b` (dots and dashes become underscores)."""
    c = ml_collections.ConfigDict()
    c.unet = ml_collections.ConfigDict()
    c.unet.sd15 = _unet_shape(64, 77)            # UNetConfig's defaults are SD-1.5's
    c.unet.tiny = _unet_shape(
        8, 8, sample_size=8, block_out_channels=(32, 64), layers_per_block=(1, 1),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=(1, 1),
        attention_heads=(4, 4), norm_num_groups=8, cross_attention_dim=32)
    c.decoder = ml_collections.ConfigDict()      # Qwen2 decoders: name, TextConfig fields, tied embeddings
    c.decoder.tiny = dict(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3), tie_word_embeddings=False)
    c.decoder.qwen2_1_5b = dict(
        name="qwen2-1.5b", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    c.decoder.qwen2_5_vl_3b = dict(
        name="qwen2.5-vl-3b", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
    c.decoder.qwen2_5_vl_7b = dict(
        name="qwen2.5-vl-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    return c

