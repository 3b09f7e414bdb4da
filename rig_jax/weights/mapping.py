"""Explicit key tables between Hugging Face state dicts and Flax param trees.

A table maps each Flax param path to one source key and a transform; every model's table is
written with the one `KeyTableBuilder`. Conversion is strict: every key of the table must be
in the file, every key of the file must be in the table, and every stored tensor must have
exactly the source shape its transform derives from the Flax param the config builds (rank,
sizes and axis order: a swapped or cut tensor never converts into the right shape by chance);
anything else is a WeightsError naming the key and its file.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rig_jax.errors import WeightsError

FlaxPath = tuple[str, ...]


Shape = tuple[int, ...]

# Every kind of layout change a key table may use, by name, with the source layout it reads.
# A Transform of an unregistered kind cannot be built, so tests that walk this registry cover
# every transform there is.
TRANSFORM_KINDS: dict[str, str] = {
    "identity": "any tensor, stored as the Flax param",
    "linear": "nn.Linear weight (out, in) -> nn.Dense kernel (in, out)",
    "conv2d": "nn.Conv2d weight (out, in, kh, kw) -> nn.Conv kernel (kh, kw, in, out)",
    "conv1x1_to_linear": "1x1 nn.Conv2d weight (out, in, 1, 1) -> nn.Dense kernel (in, out)",
    "conv_patch_to_linear": "nn.Conv3d weight (out, *kernel) with kernel = stride -> nn.Dense kernel "
                            "(prod(kernel), out)",
}


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a tensor changes between the PyTorch layout and the Flax layout.

    `source_shape(flax_shape)` is the exact shape the stored tensor must have for a Flax param
    of `flax_shape` (itself derived from the config): `convert_to_flax` checks it before
    `to_flax` runs, so a tensor of the wrong rank, with axes swapped, or a k x k kernel where a
    1 x 1 is expected, is a WeightsError naming the key instead of a numpy error or a silently
    reshaped (or cut) tensor that merely ends with the right shape."""
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[Shape], Shape]

    def __post_init__(self) -> None:
        if self.name not in TRANSFORM_KINDS:
            raise ValueError(f"transform kind {self.name!r} is not registered in TRANSFORM_KINDS")


def _reversed_2d(shape: Shape) -> Shape:
    if len(shape) != 2:
        raise ValueError(f"a linear layout needs a 2-D Flax param, got {shape}")
    return (shape[1], shape[0])


def _conv2d_source(shape: Shape) -> Shape:
    if len(shape) != 4:
        raise ValueError(f"a conv2d layout needs a 4-D Flax kernel, got {shape}")
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)


IDENTITY = Transform("identity", lambda x: x, lambda x: x, lambda shape: tuple(shape))
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T, _reversed_2d)
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
                   _conv2d_source)
CONV1X1_TO_LINEAR = Transform("conv1x1_to_linear", lambda x: x[:, :, 0, 0].T,
                              lambda x: x.T[:, :, None, None],
                              lambda shape: _reversed_2d(shape) + (1, 1))


def conv_patch_to_linear(kernel: Shape) -> Transform:
    """A convolution whose kernel equals its stride (a patch embedding, e.g. Qwen2.5-VL's
    Conv3d weight (E, C, T, p, p)) <-> the Dense kernel (C*T*p*p, E) on flattened patches.
    `kernel` is `(C, T, p, p)` from the config: the flattened sizes alone cannot tell a
    tensor with two axes swapped from the right one."""
    kernel = tuple(int(k) for k in kernel)

    def source(shape: Shape) -> Shape:
        if len(shape) != 2 or shape[0] != int(np.prod(kernel)):
            raise ValueError(f"a patch kernel {kernel} needs a ({int(np.prod(kernel))}, out) Flax param, "
                             f"got {shape}")
        return (shape[1], *kernel)

    return Transform("conv_patch_to_linear", lambda x: x.reshape(x.shape[0], -1).T,
                     lambda x: x.T.reshape((x.shape[1], *kernel)), source)


@dataclasses.dataclass(frozen=True)
class Entry:
    source_key: str
    transform: Transform = IDENTITY


KeyTable = Mapping[FlaxPath, Entry]


class KeyTableBuilder:
    """Writes a KeyTable one layer at a time, each side in its own spelling: Flax paths joined
    by `/` (`down_blocks_0/resnets_1/conv1`), source keys by `.` (`down_blocks.0.resnets.1.conv1`).
    The layer methods add the params the rig_jax layer of that kind creates."""

    def __init__(self) -> None:
        self._table: dict[FlaxPath, Entry] = {}

    def add(self, flax_path: str, source_key: str, transform: Transform = IDENTITY) -> None:
        path = tuple(flax_path.split("/"))
        if path in self._table:
            raise ValueError(f"key table: Flax param {flax_path} named twice")
        self._table[path] = Entry(source_key, transform)

    def dense(self, flax: str, source: str, bias: bool = True, transform: Transform = LINEAR) -> None:
        """`nn.Dense` (`kernel`, `bias`) <- `weight`, `bias`."""
        self.add(f"{flax}/kernel", f"{source}.weight", transform)
        if bias:
            self.add(f"{flax}/bias", f"{source}.bias")

    def conv(self, flax: str, source: str) -> None:
        """`nn.Conv` (`kernel`, `bias`) <- an `nn.Conv2d`."""
        self.add(f"{flax}/kernel", f"{source}.weight", CONV2D)
        self.add(f"{flax}/bias", f"{source}.bias")

    def norm(self, flax: str, source: str, bias: bool = True) -> None:
        """A norm's `scale` (and `bias`) <- `weight` (and `bias`); RMSNorm has no bias."""
        self.add(f"{flax}/scale", f"{source}.weight")
        if bias:
            self.add(f"{flax}/bias", f"{source}.bias")

    def embedding(self, flax: str, source: str) -> None:
        """`nn.Embed` (`embedding`) <- an `nn.Embedding`."""
        self.add(f"{flax}/embedding", f"{source}.weight")

    def resnet2d(self, flax: str, source: str, shortcut: bool, time_embedding: bool) -> None:
        """`models.layers.ResnetBlock2D` <- diffusers' ResnetBlock2D (U-Net and VAE)."""
        self.norm(f"{flax}/norm1", f"{source}.norm1")
        self.conv(f"{flax}/conv1", f"{source}.conv1")
        if time_embedding:
            self.dense(f"{flax}/time_emb_proj", f"{source}.time_emb_proj")
        self.norm(f"{flax}/norm2", f"{source}.norm2")
        self.conv(f"{flax}/conv2", f"{source}.conv2")
        if shortcut:
            self.conv(f"{flax}/conv_shortcut", f"{source}.conv_shortcut")

    def build(self) -> KeyTable:
        return dict(self._table)


def flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    out: dict[FlaxPath, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def convert_to_flax(state: Mapping[str, np.ndarray], table: KeyTable, expected: Any,
                    source: str, ignore: Callable[[str], bool] = lambda k: False,
                    place: Callable[[FlaxPath, np.ndarray], Any] | None = None) -> dict[str, Any]:
    """Builds a Flax param tree from a state dict through `table`.

    `expected` is the (abstract) Flax param tree, e.g. `jax.eval_shape(model.init, ...)`
    unboxed; `source` names the folder or file in error messages; `ignore(key)` marks
    source keys that are known and deliberately unused (buffers such as position ids).
    `place(path, array)` puts each converted leaf where it belongs (e.g. sharded on a mesh) as
    soon as it is converted; without it the leaves are host numpy arrays. The whole table is
    checked against `expected` and the file's keys before anything is placed. Each source tensor
    must have exactly the shape its transform's `source_shape` derives from the expected param;
    the error names the key and the file it came from (`state.files`, where `state` is the
    `io.StateDict` a folder load returns).
    """
    expected_flat = flatten(expected)
    files: Mapping[str, str] = getattr(state, "files", {})
    missing_paths = sorted(set(expected_flat) - set(table))
    if missing_paths:
        raise WeightsError(f"{source}: no key table entry for Flax param "
                           f"{'/'.join(missing_paths[0])} ({len(missing_paths)} in all)")
    converted = {}
    for path, entry in table.items():
        if path not in expected_flat:
            raise WeightsError(f"{source}: key table names Flax param {'/'.join(path)}, "
                               "which the model does not have")
        if entry.source_key not in state:
            raise WeightsError(f"{source}: missing key {entry.source_key}")
        tensor = np.asarray(state[entry.source_key])
        want = tuple(expected_flat[path].shape)
        where = files.get(entry.source_key, source)
        need = entry.transform.source_shape(want)
        if tuple(tensor.shape) != need:
            raise WeightsError(
                f"{where}: key {entry.source_key} has shape {tuple(tensor.shape)}; the config needs "
                f"{need} for {'/'.join(path)} {want} ({entry.transform.name} layout)")
        value = entry.transform.to_flax(tensor)
        if tuple(value.shape) != want:   # a transform that disagrees with its own source_shape
            raise WeightsError(
                f"{where}: key {entry.source_key} has shape {tuple(tensor.shape)}, "
                f"which gives {tuple(value.shape)} for {'/'.join(path)}; expected {want}")
        converted[path] = value  # a view of the file's tensor: cast (and placed) below
    used = {entry.source_key for entry in table.values()}
    surplus = sorted(k for k in state if k not in used and not ignore(k))
    if surplus:
        raise WeightsError(f"{source}: unexpected key {surplus[0]} ({len(surplus)} in all)")
    flat = {}
    for path in list(converted):
        value = converted.pop(path).astype(expected_flat[path].dtype)
        flat[path] = value if place is None else place(path, value)
    return unflatten(flat)


def to_host(x: Any) -> np.ndarray:
    """A whole array on this host: arrays sharded across hosts are all-gathered first (every
    process must call this together), others are simply fetched."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def check_param_tree(given: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
    """`given` must have exactly the paths and shapes of `expected` (e.g. the abstract params a
    config needs); a WeightsError names the first misfit."""
    if not isinstance(given, Mapping):
        raise WeightsError(f"{source}: params are not a tree of named arrays")
    got, want = flatten(given), flatten(expected)
    for path in sorted(set(got) | set(want)):
        name = "/".join(path)
        if path not in got:
            raise WeightsError(f"{source}: params lack {name}, which the config needs")
        if path not in want:
            raise WeightsError(f"{source}: params have {name}, which the config does not")
        if tuple(got[path].shape) != tuple(want[path].shape):
            raise WeightsError(f"{source}: param {name} has shape {tuple(got[path].shape)}; the config "
                               f"needs {tuple(want[path].shape)}")


def check_params_cover_table(params: Mapping[str, Any], table: KeyTable, source: str) -> None:
    """The param tree must hold exactly the table's paths: a WeightsError names the first
    missing or surplus param (before an export writes anything)."""
    have = set(flatten(params))
    missing = sorted(set(table) - have)
    if missing:
        raise WeightsError(f"{source}: params lack {'/'.join(missing[0])} ({len(missing)} in all)")
    surplus = sorted(have - set(table))
    if surplus:
        raise WeightsError(f"{source}: params hold {'/'.join(surplus[0])}, which the key table does not "
                           f"name ({len(surplus)} in all)")


def convert_to_torch(params: Mapping[str, Any], table: KeyTable, source: str = "params"
                     ) -> dict[str, np.ndarray]:
    """The inverse of `convert_to_flax`: a state dict in the PyTorch layout (float32
    numpy arrays, contiguous). The params must match the table exactly."""
    check_params_cover_table(params, table, source)
    flat = flatten(params)
    out = {}
    for path, entry in table.items():
        value = np.asarray(to_host(flat[path]), dtype=np.float32)
        out[entry.source_key] = np.ascontiguousarray(entry.transform.to_torch(value))
    return out
