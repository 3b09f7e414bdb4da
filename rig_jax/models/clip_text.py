"""The CLIP text encoder (transformers `CLIPTextModel`) in Flax Linen.

Pre-norm transformer with a causal mask, learned absolute positions and a final layer
norm. Param names mirror transformers (`encoder/layers_3/self_attn/q_proj/kernel` <->
`[text_model.]encoder.layers.3.self_attn.q_proj.weight`) so that
rig_jax/weights/clip_text.py maps checkpoints by a flat table.

Which layer conditions the U-Net: diffusers' StableDiffusionPipeline uses
`last_hidden_state` (final layer norm applied) by default, and with `clip_skip=k` takes
`hidden_states[-(k + 1)]` and passes it through the final layer norm. `encode(layer=
"penultimate")` is `clip_skip=1`. SD 2.x checkpoints in the diffusers layout already
drop OpenCLIP's last layer (23 layers in config.json), so they want `layer="last"`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError
from rig_jax.models.attention import dot_product_attention
from rig_jax.models.layers import activation, dense, layer_norm

ACTIVATIONS = ("quick_gelu", "gelu")
INIT = nn.initializers.normal(0.02)   # transformers' CLIP initializer_range (random inits only)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture of a CLIP text encoder (read from a transformers `config.json` by
    `rig_jax.weights.clip_text.clip_text_config_from_hf`)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    # diffusers passes the tokenizer's attention mask only when the config says so.
    use_attention_mask: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------- layers

class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        split = lambda t: t.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": INIT}
        q, k, v = (split(dense(cfg.hidden_size, ("embed", "heads"), name, **kw)(x))
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask).reshape(batch, length, cfg.hidden_size)
        return dense(cfg.hidden_size, ("heads", "embed"), "out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": INIT}
        h = dense(cfg.intermediate_size, ("embed", "mlp"), "fc1", **kw)(x)
        h = activation(cfg.hidden_act)(h)
        return dense(cfg.hidden_size, ("mlp", "embed"), "fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", dt, pdt)(x)
        x = x + CLIPAttention(cfg, dt, pdt, name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", dt, pdt)(x)
        x = x + CLIPMLP(cfg, dt, pdt, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="token_embedding")
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                        (None, "embed")),
                            name="position_embedding")
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return token(input_ids) + position(positions)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layers = [CLIPEncoderLayer(self.config, self.dtype, self.param_dtype)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array, num_layers: int) -> tuple[jax.Array, ...]:
        """Runs the first `num_layers` layers; returns the input and every layer output."""
        states = [x]
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1], mask))
        return tuple(states)


class CLIPTextModel(nn.Module):
    """`__call__(input_ids, attention_mask=None)` -> dict with `last_hidden_state` (final
    layer norm applied), `hidden_states` (embeddings and every layer output, before the
    final norm) and `pooled_output` (last_hidden_state at the EOS token, found as
    transformers does). Outputs are in the compute dtype.
    """
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embeddings = CLIPEmbeddings(self.config, self.dtype, self.param_dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype, self.param_dtype)
        self.final_layer_norm = layer_norm(self.config.layer_norm_eps, None, self.dtype, self.param_dtype)

    def _hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                       num_layers: int) -> tuple[jax.Array, ...]:
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ConfigError(f"input_ids: length {length} exceeds max_position_embeddings "
                              f"{self.config.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(jnp.bool_)[:, None, None, :]
        x = nn.with_logical_constraint(self.embeddings(input_ids), ("batch", "length", "embed"))
        return self.encoder(x, mask, num_layers)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, Any]:
        states = self._hidden_states(input_ids, attention_mask, self.config.num_hidden_layers)
        last = self.final_layer_norm(states[-1])
        return {"last_hidden_state": last, "hidden_states": states,
                "pooled_output": pool_at_eos(last, input_ids, self.config.eos_token_id)}

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               layer: str = "last") -> jax.Array:
        """Text conditioning for a U-Net: `layer="last"` is `last_hidden_state`;
        `"penultimate"` is the second-to-last layer output through the final layer norm
        (diffusers' `clip_skip=1`), and skips computing the last layer."""
        if layer == "last":
            num_layers = self.config.num_hidden_layers
        elif layer == "penultimate":
            if self.config.num_hidden_layers < 2:
                raise ConfigError("layer: 'penultimate' needs at least 2 hidden layers")
            num_layers = self.config.num_hidden_layers - 1
        else:
            raise ConfigError(f"layer: expected 'last' or 'penultimate', got {layer!r}")
        states = self._hidden_states(input_ids, attention_mask, num_layers)
        return self.final_layer_norm(states[-1])


def pool_at_eos(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at the first EOS token of each row. With `eos_token_id == 2` (configs
    written before transformers PR #24773) the EOS is the largest id in the row, as transformers does."""
    if eos_token_id == 2:
        index = jnp.argmax(input_ids, axis=-1)
    else:
        index = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


def init_params(module: CLIPTextModel, rng: jax.Array, length: int = 0) -> Any:
    """Random (boxed, logically partitioned) variables from `module.init` on dummy ids."""
    length = length or module.config.max_position_embeddings
    return module.init(rng, jnp.zeros((1, length), jnp.int32))
