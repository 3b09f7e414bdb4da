"""A small Linen model with logical axis names, for the sharding tests (and the
multi-host worker, which imports it from a subprocess)."""
import flax.linen as nn
import jax.numpy as jnp


class TinyAnnotatedMLP(nn.Module):
    """embed 16 -> mlp 32 -> embed 16 -> vocab 24, every weight annotated."""
    embed: int = 16
    mlp: int = 32
    vocab: int = 24

    @nn.compact
    def __call__(self, x):
        def dense(features, names, name):
            return nn.Dense(features, name=name,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                            bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), names[-1:]))
        h = dense(self.embed, ("channels", "embed"), "embed_in")(x)
        h = nn.with_logical_constraint(h, ("batch", "embed"))
        h = nn.gelu(dense(self.mlp, ("embed", "mlp"), "up")(h))
        h = dense(self.embed, ("mlp", "embed"), "down")(h)
        scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (self.embed,))
        h = h * scale / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return dense(self.vocab, ("embed", "vocab"), "head")(h)


EXPECTED_SPECS = {
    # mesh shape -> {param path: PartitionSpec entries}
    (8, 1, 1): {"embed_in/kernel": (None, None), "up/kernel": (None, None), "head/kernel": (None, None)},
    (2, 2, 2): {"embed_in/kernel": (None, "fsdp"), "up/kernel": ("fsdp", "tensor"),
                "down/kernel": ("tensor", "fsdp"), "head/kernel": ("fsdp", "tensor"),
                "up/bias": ("tensor",), "norm_scale": (None,)},
    (1, 1, 8): {"embed_in/kernel": (None, None), "up/kernel": (None, "tensor"),
                "down/kernel": ("tensor", None), "head/kernel": (None, "tensor"),
                "embed_in/bias": (None,)},
}
