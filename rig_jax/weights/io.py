"""Reading and writing safetensors from local folders in the Hugging Face layouts."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rig_jax.errors import WeightsError

# File names the diffusers and transformers layouts use, most specific first.
SINGLE_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILE_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class StateDict(dict):
    """A folder's tensors by key, plus `files`: the file each key was read from, so a misfit
    tensor's error names its shard, not only the folder."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, str] = {}

    def add_file(self, path: str, tensors: Mapping[str, np.ndarray]) -> None:
        for key, value in tensors.items():
            self[key] = value
            self.files[key] = path


def read_json(path: str) -> dict:
    """Reads a JSON file; a missing or malformed file is a WeightsError naming it."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def _read_file(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except Exception as e:
        # bf16 tensors cannot be read by the numpy backend: go through torch if present.
        if "bfloat16" in str(e) or "bf16" in str(e).lower():
            return _read_file_via_torch(path)
        raise WeightsError(f"{path}: cannot read safetensors ({e})") from None


def _read_file_via_torch(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if str(t.dtype) == "torch.bfloat16":
                out[k] = t.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = t.numpy()
    return out


def _weight_files(folder: str) -> tuple[list[str], list[str]]:
    """(plain, variant) weight files of a folder, indexes before single files: the plain names
    of INDEX_FILE_NAMES / SINGLE_FILE_NAMES, and diffusers' variants of them
    (`model.safetensors.index.fp16.json`, `diffusion_pytorch_model.fp16.safetensors`)."""
    names = os.listdir(folder)
    plain = [n for n in INDEX_FILE_NAMES + SINGLE_FILE_NAMES if n in names]
    variants = sorted(n for n in names for base in INDEX_FILE_NAMES if n != base
                      and n.startswith(base[:-len("json")]) and n.endswith(".json"))
    variants += sorted(n for n in names for base in SINGLE_FILE_NAMES if n != base
                       and n.startswith(base[:-len("safetensors")]) and n.endswith(".safetensors"))
    return plain, variants


def load_safetensors_folder(folder: str) -> StateDict:
    """All tensors of a model folder: one safetensors file, or shards named by an index.

    Plain names win (an index before a single file); a variant (`*.fp16.safetensors`,
    `*.safetensors.index.fp16.json`) is read when it is the only weight file. Tensors keep
    their stored dtype (the key tables cast).
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    plain, variants = _weight_files(folder)
    if not plain and len(variants) > 1:
        raise WeightsError(f"{folder}: several weight variants ({', '.join(variants)}); keep one")
    chosen = (plain or variants or [None])[0]
    if chosen is not None and chosen.endswith(".json"):
        index_path = os.path.join(folder, chosen)
        index = read_json(index_path)
        if "weight_map" not in index:
            raise WeightsError(f"{index_path}: no 'weight_map'")
        tensors = StateDict()
        for shard in sorted(set(index["weight_map"].values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise WeightsError(f"{shard_path}: shard named in {chosen} not found")
            tensors.add_file(shard_path, _read_file(shard_path))
        return tensors
    if chosen is not None:
        tensors = StateDict()
        path = os.path.join(folder, chosen)
        tensors.add_file(path, _read_file(path))
        return tensors
    pickles = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".ckpt", ".pt")))
    if pickles:
        raise WeightsError(f"{folder}: only PyTorch pickle weights ({pickles[0]}); rig_jax reads safetensors "
                           "(re-save with save_pretrained(..., safe_serialization=True))")
    raise WeightsError(
        f"{folder}: no safetensors weights (expected one of {SINGLE_FILE_NAMES + INDEX_FILE_NAMES})")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes one safetensors file atomically (temporary file, then rename). A shard index of
    the same name beside it is removed: loaders prefer an index, so a stale one would win."""
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stale_index = path + ".index.json"
    if os.path.basename(path) in SINGLE_FILE_NAMES and os.path.isfile(stale_index):
        os.remove(stale_index)
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata=dict(metadata or {"format": "pt"}))
    os.replace(tmp, path)


def tokenizer_ids(tokenizer: Any) -> tuple[int, int]:
    """(number of non-special vocabulary entries, largest id the tokenizer can emit)."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    ids = list(vocab.values()) + [int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None]
    return sum(1 for token in vocab if token not in special), max(ids, default=-1)


def check_tokenizer_vocabulary(tokenizer: Any, folder: str) -> None:
    """A tokenizer whose vocabulary is its special tokens alone (a folder missing its vocabulary
    files, which transformers loads without a word) encodes every prompt alike: refused."""
    words, _ = tokenizer_ids(tokenizer)
    if words == 0:
        raise WeightsError(f"{folder}: the tokenizer has no vocabulary beyond its special tokens "
                           "(vocabulary file missing or empty)")


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, tokenizer_source: str, model_source: str) -> None:
    """Every id the tokenizer can emit must index the text model's embedding table: an id
    `>= vocab_size` is gathered out of range, which XLA clamps or fills silently."""
    _, largest = tokenizer_ids(tokenizer)
    if largest >= vocab_size:
        raise WeightsError(f"{tokenizer_source}: tokenizer ids reach {largest}, beyond the vocab_size "
                           f"{vocab_size} of {model_source} (the tokenizer belongs to another model)")


def write_json(obj: Mapping, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def to_half_variant(folder: str) -> str:
    """Rewrites a model folder's single float32 weights file as diffusers' `fp16` variant
    (`model.fp16.safetensors`, `diffusion_pytorch_model.fp16.safetensors`) and removes the
    float32 file; the loaders read a lone variant. Halves what a small committed model weighs.
    Returns the new file's path."""
    plain, variants = _weight_files(folder)
    singles = [n for n in plain if n in SINGLE_FILE_NAMES]
    if len(singles) != 1 or len(plain) != 1:
        raise WeightsError(f"{folder}: expected exactly one single-file float32 weights file")
    source = os.path.join(folder, singles[0])
    target = source[:-len("safetensors")] + "fp16.safetensors"
    others = [v for v in variants if v != os.path.basename(target)]
    if others:   # the same variant from an earlier export is simply replaced
        raise WeightsError(f"{folder}: other weight variants beside the export ({', '.join(others)})")
    tensors = _read_file(source)
    half = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
    save_safetensors(half, target)
    os.remove(source)
    return target
