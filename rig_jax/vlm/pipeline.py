"""A Qwen2.5-VL folder as one bundle: model, config, tokenizer, image processor, stop tokens.

Like `SDPipeline` for Stable Diffusion, `VLMPipeline` is everything but the weights; the
Judge, the Checker and the Actor load the same folder through `load_vlm_pipeline`, which
places the params on the run's mesh (leaf by leaf, with the shardings the logical axis
rules give) so a 7B model never lands whole on one device.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from rig_jax.errors import WeightsError
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig
from rig_jax.parallel.rules import LogicalRules
from rig_jax.vlm.processor import ImageProcessorConfig
from rig_jax.weights.io import check_tokenizer_fits, check_tokenizer_vocabulary
from rig_jax.weights.qwen2_5_vl import CONFIG_NAME, load_qwen_vl, read_qwen_vl_config

END_OF_TURN = "<|im_end|>"


@dataclasses.dataclass(frozen=True, eq=False)
class VLMPipeline:
    """The Flax module and its parsed config, the tokenizer, the image processor settings, the
    ids that end an answer and the pad id. Compared by identity (it keys jit caches)."""
    model: Qwen25VL
    config: Qwen25VLConfig
    tokenizer: Any
    image_config: ImageProcessorConfig
    stop_token_ids: tuple[int, ...]
    pad_id: int
    source: str = ""


def load_tokenizer(folder: str) -> Any:
    """transformers' tokenizer of a local folder; any failure names the folder. The folder must
    hold a vocabulary (tokenizer.json, or vocab.json and merges.txt) and the tokenizer more
    than its special tokens: without one, every prompt would encode alike."""
    from transformers import AutoTokenizer

    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise WeightsError(f"{folder}: no tokenizer vocabulary (neither tokenizer.json nor vocab.json "
                           "and merges.txt)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    check_tokenizer_vocabulary(tokenizer, folder)
    return tokenizer


def stop_tokens(config: Qwen25VLConfig, tokenizer: Any) -> tuple[int, ...]:
    """The config's end-of-sequence ids plus the tokenizer's EOS and end-of-turn tokens."""
    stops = set(config.eos_token_ids)
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)):
        if token_id is not None and token_id != tokenizer.unk_token_id:
            stops.add(int(token_id))
    return tuple(sorted(stops))


def load_vlm_pipeline(folder: str, dtype: Any = None, param_dtype: Any = None, *, mesh: Mesh | None = None,
                      rules: LogicalRules | None = None) -> tuple[VLMPipeline, dict[str, Any]]:
    """Reads a local HF Qwen2.5-VL folder (weights, config.json, tokenizer files,
    preprocessor_config.json): `(pipeline, params)`.

    dtype: compute dtype (default bfloat16); param_dtype: stored weights (default: dtype, for
    inference). Without `mesh` the params are host arrays; with it, global arrays sharded by
    `rules` (None: the active `nn.logical_axis_rules`, else the defaults).
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    tokenizer = load_tokenizer(folder)
    image_config = ImageProcessorConfig.from_folder(folder)
    # checked before any weights are read: ids beyond the embedding table are gathered silently
    check_tokenizer_fits(tokenizer, read_qwen_vl_config(folder)[1].text.vocab_size, folder,
                         os.path.join(folder, CONFIG_NAME))
    dtype = jnp.bfloat16 if dtype is None else dtype
    config, model, params = load_qwen_vl(folder, dtype=dtype, param_dtype=dtype if param_dtype is None
                                         else param_dtype, mesh=mesh, rules=rules)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    pad_id = int(pad) if pad is not None else 0
    pipe = VLMPipeline(model=model, config=config, tokenizer=tokenizer, image_config=image_config,
                       stop_token_ids=stop_tokens(config, tokenizer), pad_id=pad_id, source=folder)
    return pipe, params
