"""The Actor A of docs/method.md: `(I_k, P, Checker feedback) -> edit prompt e_k`, a VLM sampled
at temperature tau.

`VLMActor.propose` asks `actor_prompt(P, feedback)` about each image, `num_samples` (G) times,
in one `prepare_batch` + `decode.generate` call, and returns what stage-1 GRPO needs: the
decoded and parsed answers, the questions as a batch-major fixed-shape dict, the sampled
tokens, their validity mask and `pi_old` (log-probs at tau). `token_logprobs` recomputes those
log-probs for other params inside a jitted, differentiated loss (`pi_theta`, `pi_ref`).

Shapes: rows are padded to the next power of two (copies of the last row, dropped from the
result), so a caller with a fixed number of rows, or a loop whose active set shrinks inside
one bucket, compiles the decoder once; the question length is padded to a multiple of
`pad_to_multiple_of`. Every image of one call must give one patch grid (same size).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError, RigError
from rig_jax.models.qwen2_5_vl.vision import vision_inputs
from rig_jax.vlm import decode, prompts
from rig_jax.vlm.pipeline import VLMPipeline
from rig_jax.vlm.processor import prepare_batch

GRID_KEY = "image_grid_thw"


@dataclasses.dataclass(frozen=True)
class ActorSettings:
    """Sampling of edit prompts: temperature tau (callers pass the folder's default), the answer
    budget, the word limit asked for and checked, nucleus / top-k truncation (off by default, as
    GRPO's pi_old is the untruncated policy) and the question-length bucket."""

    temperature: float
    max_new_tokens: int
    max_words: int = 40
    top_p: float = 1.0
    top_k: int = 0
    pad_to_multiple_of: int = 16

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"temperature: must be a finite number > 0, got {t!r}")
        counts = (("max_new_tokens", 1), ("max_words", 1), ("top_k", 0), ("pad_to_multiple_of", 1))
        for name, minimum in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p: must be a number in (0, 1], got {p!r}")


@dataclasses.dataclass(frozen=True)
class EditSamples:
    """N = B * G sampled answers; row i * G + g is sample g of input i.

    batch: the questions, batch-major: input_ids, attention_mask (N, L) int32, position_ids
    (N, 3, L) int32, rope_deltas (N,) int32, pixel_values (N, P, D) float32, and
    `image_grid_thw` (N, 3) int64, which is host data (it fixes the vision tower's index
    arrays): keep it out of a jitted function's traced arguments (bind it, e.g. with
    `functools.partial`) and pass the rest as arrays.
    edits: parsed answers; `well_formed` also requires that the answer stopped.
    """

    texts: list[str]
    edits: list[prompts.EditPrompt]
    batch: dict[str, np.ndarray]
    tokens: np.ndarray
    valid: np.ndarray
    policy_logprobs: np.ndarray


# ----------------------------------------------------------------------------- shared VLM helpers

def row_bucket(rows: int) -> int:
    """The padded row count of a decoder call: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def check_images(images: Any, count: int, name: str = "images") -> np.ndarray:
    """`images` as a float array (count, H, W, 3) in [0, 1], or a RigError naming it."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] != count:
        raise RigError(f"{name}: expected shape ({count}, height, width, 3), got {arr.shape}")
    return arr


def question_batch(pipe: VLMPipeline, questions: Sequence[str], images: np.ndarray, repeats: int,
                   rows: int, pad_to_multiple_of: int) -> dict[str, np.ndarray]:
    """`prepare_batch` of one image + question per input, each input repeated `repeats` times
    (rows i * repeats + g) and then padded with copies of the last row to `rows` rows; the
    decoder's flat layout (pixel_values (rows * P, D), position_ids (3, rows, L))."""
    batch = prepare_batch(pipe.tokenizer, list(questions), [[im] for im in images], pipe.image_config,
                          pad_to_multiple_of=pad_to_multiple_of)
    grids = batch[GRID_KEY]
    if np.any(grids != grids[:1]):
        raise RigError("images: every image of one call must give one patch grid, got "
                       f"{np.unique(grids, axis=0).tolist()}")
    n = len(questions)
    order = np.repeat(np.arange(n), repeats)
    order = np.concatenate([order, np.full(rows - len(order), order[-1])])
    pixels = batch["pixel_values"].reshape(n, -1, batch["pixel_values"].shape[-1])[order]
    return {"input_ids": batch["input_ids"][order], "attention_mask": batch["attention_mask"][order],
            "position_ids": batch["position_ids"][:, order], "rope_deltas": batch["rope_deltas"][order],
            "pixel_values": pixels.reshape(-1, pixels.shape[-1]), GRID_KEY: grids[order]}


def decode_texts(pipe: VLMPipeline, tokens: np.ndarray, valid: np.ndarray) -> tuple[list[str], list[bool]]:
    """Each row's answer up to (not including) its stop token, special tokens kept (an image
    token in an answer is a malformed answer, not silently dropped); and whether it stopped."""
    texts, stopped = [], []
    for row, keep in zip(tokens, valid, strict=True):
        ids = [int(t) for t in row[keep]]
        ended = bool(ids) and ids[-1] in pipe.stop_token_ids
        texts.append(pipe.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False))
        stopped.append(ended)
    return texts, stopped


# ----------------------------------------------------------------------------- the Actor

class VLMActor:
    """The Actor over a Qwen2.5-VL folder (`load_vlm_pipeline`); params are passed per call, so
    the stage-1 trainer samples from the params it is updating."""

    def __init__(self, pipe: VLMPipeline, settings: ActorSettings):
        if not isinstance(settings, ActorSettings):
            raise ConfigError(f"actor settings: expected ActorSettings, got {type(settings).__name__}")
        self.pipe = pipe
        self.settings = settings

    def propose(self, params: Any, images: np.ndarray, graphs: Sequence[SceneGraph], feedbacks: Sequence[str],
                rng: jax.Array, num_samples: int = 1, greedy: bool = False) -> EditSamples:
        """`num_samples` edit prompts per (image, prompt graph, Checker feedback); greedy decoding
        takes the most likely answer (its log-probs are still at the settings' temperature)."""
        s = self.settings
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise RigError(f"num_samples: must be an integer >= 1, got {num_samples!r}")
        if len(graphs) != len(feedbacks) or not graphs:
            raise RigError(f"feedbacks: {len(feedbacks)} feedbacks for {len(graphs)} graphs "
                           "(need one each, at least one)")
        images = check_images(images, len(graphs))
        questions = [prompts.actor_prompt(g.prompt(), f, s.max_words)
                     for g, f in zip(graphs, feedbacks, strict=True)]
        n = len(graphs) * num_samples
        flat = question_batch(self.pipe, questions, images, num_samples, row_bucket(n), s.pad_to_multiple_of)
        out = decode.generate(self.pipe.model, params, flat, rng, s.max_new_tokens, temperature=s.temperature,
                              top_p=s.top_p, top_k=s.top_k, greedy=greedy,
                              stop_token_ids=self.pipe.stop_token_ids, pad_id=self.pipe.pad_id)
        tokens = np.asarray(out["tokens"])[:n]
        valid = np.asarray(out["valid"])[:n]
        texts, stopped = decode_texts(self.pipe, tokens, valid)
        edits = []
        for text, ended in zip(texts, stopped, strict=True):
            parsed = prompts.parse_edit_prompt(text, s.max_words)
            edits.append(dataclasses.replace(parsed, well_formed=parsed.well_formed and ended))
        return EditSamples(texts=texts, edits=edits, batch=batch_major(flat, n), tokens=tokens, valid=valid,
                           policy_logprobs=np.asarray(out["policy_logprobs"])[:n])


def batch_major(flat: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a decoder batch with every array's leading axis the row."""
    patches = flat["pixel_values"].reshape(len(flat["input_ids"]), -1, flat["pixel_values"].shape[-1])
    return {"input_ids": flat["input_ids"][:rows], "attention_mask": flat["attention_mask"][:rows],
            "position_ids": np.ascontiguousarray(np.transpose(flat["position_ids"], (1, 0, 2))[:rows]),
            "rope_deltas": flat["rope_deltas"][:rows], "pixel_values": patches[:rows].astype(np.float32),
            GRID_KEY: flat[GRID_KEY][:rows]}


# ----------------------------------------------------------------------------- log-probs

def static_grid(batch: Mapping[str, Any]) -> np.ndarray:
    """The one (t, h, w) patch grid of a batch-major batch, read on the host."""
    grid = batch.get(GRID_KEY)
    if grid is None:
        raise RigError(f"batch: no {GRID_KEY} (EditSamples.batch carries it)")
    if isinstance(grid, jax.core.Tracer):
        raise RigError(f"batch.{GRID_KEY}: is traced; it must stay host data (bind it outside the jit)")
    grid = np.asarray(grid).reshape(-1, 3)
    if len(grid) == 0 or np.any(grid != grid[:1]):
        raise RigError(f"batch.{GRID_KEY}: all images of one batch must share one patch grid, "
                       f"got {np.unique(grid, axis=0).tolist()}")
    return grid[0]


def token_logprobs(pipe: VLMPipeline, params: Any, batch: Mapping[str, jax.Array], tokens: jax.Array,
                   valid: jax.Array, temperature: float) -> jax.Array:
    """(N, T) log-probs of `tokens` after the batch-major questions under softmax(logits /
    temperature), 0 where not `valid`: pi_theta / pi_ref of the GRPO loss, equal to
    `EditSamples.policy_logprobs` for the sampling params. Traceable and differentiable in
    `params`; the vision tower's index arrays come from the batch's host grid."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise RigError(f"temperature: must be > 0, got {temperature!r}")
    grid = static_grid(batch)
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    tokens = jnp.asarray(tokens, jnp.int32)
    (n, length), steps = ids.shape, tokens.shape[1]
    pixels = jnp.asarray(batch["pixel_values"])
    vision = {k: jnp.asarray(v) for k, v in vision_inputs(np.tile(grid, (n, 1)), pipe.config.vision).items()}
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    start = jnp.sum(mask, axis=-1) + jnp.asarray(batch["rope_deltas"], jnp.int32).reshape(-1)
    after = start[:, None] + jnp.arange(steps)[None, :]
    positions = jnp.concatenate([jnp.transpose(jnp.asarray(batch["position_ids"], jnp.int32), (1, 0, 2)),
                                 jnp.broadcast_to(after[None], (3, n, steps))], axis=2)
    # a sampled token equal to the image token id is text, not an image slot
    image_mask = jnp.concatenate([ids == pipe.config.image_token_id, jnp.zeros((n, steps), bool)], axis=1)
    logits, _ = pipe.model.apply({"params": params}, jnp.concatenate([ids, tokens], axis=1), positions,
                                 jnp.concatenate([mask, jnp.ones((n, steps), jnp.int32)], axis=1),
                                 pixels.reshape(n * pixels.shape[1], pixels.shape[2]), vision,
                                 logits_slice=(length - 1, steps), image_mask=image_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.asarray(valid, bool), picked, 0.0)
