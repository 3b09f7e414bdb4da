"""LoRA as a separate param tree, for any rig_jax model (the U-Net, the VLM, CLIP).

    settings = LoRASettings(rank=8, alpha=16, targets=(r".*attn[12]/to_[qkv]/kernel",))
    lora = init_lora(base_params, settings, rng)          # or the boxed abstract tree
    def loss_fn(lora, base, batch, rng):                   # the train loop's (params, frozen, ...)
        params = apply_lora(base, lora, settings)
        ...model.apply({"params": params}, ...)
    export = merge_lora(base_params, lora, settings)       # a plain tree for save_unet / save_qwen_vl

The LoRA tree mirrors the base tree down to each targeted kernel, whose leaf becomes
`{"a": (in, rank), "b": (rank, out)}`; nothing else is in it, so the optimizer state and
the checkpoints hold only LoRA weights. `a` is PEFT's default init (kaiming-uniform with
a = sqrt(5), i.e. U(+-1/sqrt(in))) and `b` is zero, so a fresh LoRA leaves the model's
outputs exactly unchanged. The adapted kernel is `W + (alpha / rank) * a @ b`.

Why a param-tree function and not an interception (`nn.map_variables`, a LoRA Dense): it
works on every model unchanged (no module knows about LoRA, the key tables and loaders stay
as they are), and the base stays in the loss's `frozen` argument, so gradients and
optimizer moments exist for the LoRA leaves only. "Without copying the base": untargeted
leaves pass through by reference (inside jit they are the frozen inputs themselves; eagerly,
the same array objects), and no second base tree is ever materialised, on the host or on
device. Only the targeted kernels get a sum `W + s a @ b`, a temporary of XLA's inside the
jitted loss (at most the targeted kernels' size in all, and XLA may keep them live into the
backward pass). The factored form `x @ W + s (x @ a) @ b` would avoid even that, but needs
every `dense` to know about LoRA.

Targets are regular expressions, matched whole (`re.fullmatch`) against the '/'-joined path
of each leaf of the tree given (so `params/...` when that tree is the variables dict). A
target leaf must be a 2-D float param (a Dense kernel (in, out); also `lm_head` or an
embedding table) or a kernel whose leading dims are all 1 (a 1x1 convolution,
(1, 1, in, out), adapted as the Dense it is); a pattern that matches nothing,
or matches any other leaf (a bias, a 3x3 convolution), is a ConfigError naming the pattern.

Sharding: given a base tree boxed with logical axis names (`jax.eval_shape(model.init, ...)`
or `model.init`), `init_lora` returns boxes too, `a` named `(kernel's input name, None)` and
`b` `(None, kernel's output name)`, so `init_sharded(partial(init_lora, abstract, settings),
mesh, rules, rng)` creates the LoRA tree already sharded like its kernels.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """rank r, scale alpha (the update is (alpha / r) a @ b), and the target patterns."""
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        # a list from a config would make the settings unhashable (they are static under jit)
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: must be positive, got {self.alpha!r}")
        if not self.targets:
            raise ConfigError("lora.targets: no target patterns given")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"lora.targets: pattern {pattern!r} is not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keys: tuple[Any, ...]) -> str:
    return "/".join(_key_name(k) for k in keys)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _leaves(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """(key path, leaf) pairs, a boxed leaf counted as one leaf."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]


def _adaptable(shape: tuple[int, ...], dtype: Any) -> bool:
    return len(shape) >= 2 and all(d == 1 for d in shape[:-2]) and jnp.issubdtype(dtype, jnp.floating)


def target_paths(base: Any, settings: LoRASettings) -> list[str]:
    """The '/'-joined paths of the leaves of `base` (plain, boxed or abstract) that the
    targets select, in tree order. Every pattern must select at least one leaf, and every
    selected leaf must be a Dense or 1x1-convolution kernel."""
    found: dict[str, list[str]] = {p: [] for p in settings.targets}
    selected = []
    paths = []
    for keys, leaf in _leaves(base):
        path = _path(keys)
        paths.append(path)
        value = leaf.value if _is_box(leaf) else leaf
        hits = [p for p in settings.targets if re.fullmatch(p, path)]
        for p in hits:
            found[p].append(path)
            if not _adaptable(tuple(value.shape), value.dtype):
                raise ConfigError(
                    f"lora.targets: pattern {p!r} matches {path} of shape {tuple(value.shape)}; LoRA adapts "
                    f"Dense kernels (in, out) and 1x1 convolution kernels only (end the pattern in /kernel)")
        if hits:
            selected.append(path)
    for pattern, hits in found.items():
        if not hits:
            example = next((p for p in paths if p.endswith("kernel")), paths[0] if paths else "(empty tree)")
            raise ConfigError(f"lora.targets: pattern {pattern!r} matches no param "
                              f"(paths are '/'-joined, e.g. {example!r})")
    return selected


def init_lora(base: Any, settings: LoRASettings, rng: jax.Array) -> Any:
    """The LoRA tree for `base` (only its shapes, dtypes and logical names are read, so an
    abstract tree from `jax.eval_shape(model.init, ...)` serves). Boxed base leaves give
    boxed LoRA leaves; the dtype of `a` and `b` is the kernel's param dtype."""
    targets = set(target_paths(base, settings))
    leaves = [(keys, leaf) for keys, leaf in _leaves(base) if _path(keys) in targets]
    rngs = jax.random.split(rng, len(leaves))
    # U(+-1/sqrt(in)): PEFT's kaiming_uniform(a=sqrt(5)) on its (rank, in) lora_A
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    lora: dict[str, Any] = {}
    for (keys, leaf), key in zip(leaves, rngs, strict=True):
        value = leaf.value if _is_box(leaf) else leaf
        d_in, d_out = value.shape[-2:]
        a = a_init(key, (d_in, settings.rank), value.dtype)
        b = jnp.zeros((settings.rank, d_out), value.dtype)
        if _is_box(leaf):
            names = tuple(leaf.names) + (None,) * (len(value.shape) - len(leaf.names))
            a = leaf.replace_boxed(a).replace(names=(names[-2], None))
            b = leaf.replace_boxed(b).replace(names=(None, names[-1]))
        node = lora
        for k in keys[:-1]:
            node = node.setdefault(_key_name(k), {})
        node[_key_name(keys[-1])] = {"a": a, "b": b}
    return lora


def _flat_lora(lora: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (a, b)} of a (plain) LoRA tree."""
    out: dict[str, dict[str, Any]] = {}
    for keys, leaf in _leaves(lora):
        if _key_name(keys[-1]) not in ("a", "b"):
            raise ConfigError(f"LoRA tree: leaf {_path(keys)} is neither 'a' nor 'b'")
        out.setdefault(_path(keys[:-1]), {})[_key_name(keys[-1])] = leaf
    for path, pair in out.items():
        if set(pair) != {"a", "b"}:
            raise ConfigError(f"LoRA tree: {path} holds {sorted(pair)}, expected both 'a' and 'b'")
    return {path: (pair["a"], pair["b"]) for path, pair in out.items()}


def _adapted(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`W + scale * a @ b` in float32 (whatever the compute dtype of a and b), in W's dtype and shape."""
    delta = jnp.matmul(a, b, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)


Adapt = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _map_targets(base: Any, lora: Any, rank: int, adapt: Adapt) -> Any:
    """`base` with each kernel the LoRA tree names replaced by `adapt(W, a, b)`; every other
    leaf is returned as it is (the same object)."""
    pairs = _flat_lora(lora)
    used = set()

    def one(keys: tuple[Any, ...], w: Any) -> Any:
        path = _path(keys)
        if path not in pairs:
            return w
        a, b = pairs[path]
        if a.shape != (*w.shape[-2:-1], rank) or b.shape != (rank, w.shape[-1]):
            raise ConfigError(f"LoRA tree: {path} has a {tuple(a.shape)} and b {tuple(b.shape)} for kernel "
                              f"{tuple(w.shape)} at rank {rank}")
        used.add(path)
        return adapt(w, a, b)

    out = jax.tree_util.tree_map_with_path(one, base)
    missing = sorted(set(pairs) - used)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"LoRA tree: {missing[0]}{more} is not a param of the base tree")
    return out


def apply_lora(base: Any, lora: Any, settings: LoRASettings) -> Any:
    """The params the model runs with: targeted kernels `W + (alpha/rank) a @ b`, everything
    else `base`'s own leaves. Meant to run inside the jitted loss, with `base` frozen and
    `lora` the trained params (see the module docstring for why this copies nothing)."""
    scale = settings.scale
    return _map_targets(base, lora, settings.rank, lambda w, a, b: _adapted(w, a, b, scale))


_merge_kernel = jax.jit(_adapted, static_argnums=3)


def merge_lora(base: Any, lora: Any, settings: LoRASettings) -> Any:
    """A plain param tree for export: `base`'s structure and dtypes, each targeted kernel
    merged (one small jitted computation per kernel, on the device and with the sharding
    the kernel already has; untargeted leaves are `base`'s own arrays, not copies)."""
    scale = settings.scale
    return _map_targets(base, lora, settings.rank, lambda w, a, b: _merge_kernel(w, a, b, scale))
