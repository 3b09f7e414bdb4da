"""Host-side input preparation for the Qwen2.5-VL model: pixels, prompt tokens, M-RoPE positions.

Everything here is numpy (plus PIL for the bicubic resize, the same call transformers'
PIL-backend `Qwen2VLImageProcessor` makes), so the Checker, Actor and judge can build
model inputs without torch. Outputs match the Hugging Face processor and
`Qwen2_5_VLModel.get_rope_index` exactly (tests/test_vlm_processor.py).

Images only: video inputs (temporal grids > 1, `second_per_grid_ts`) are not supported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from rig_jax.errors import ConfigError, DataError, RigError, WeightsError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of a Qwen2-VL `preprocessor_config.json` that change the pixels."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this: one merged patch."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessor config") -> ImageProcessorConfig:
        """Reads the HF fields; `min_pixels`/`max_pixels` override `size`, as in transformers."""
        size = d.get("size") or {}
        min_pixels = size.get("shortest_edge", cls.min_pixels)
        max_pixels = size.get("longest_edge", cls.max_pixels)
        if d.get("min_pixels") is not None:
            min_pixels = d["min_pixels"]
        if d.get("max_pixels") is not None:
            max_pixels = d["max_pixels"]
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is False:
                raise ConfigError(f"{source}: field {key}=false is not supported")
        try:
            cfg = cls(
                patch_size=int(d.get("patch_size", cls.patch_size)),
                temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
                merge_size=int(d.get("merge_size", cls.merge_size)),
                min_pixels=int(min_pixels),
                max_pixels=int(max_pixels),
                image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
                image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
                rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: a numeric field is malformed ({e})") from None
        if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
            raise ConfigError(f"{source}: image_mean and image_std need 3 values")
        sizes = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)
        if min(sizes) < 1 or cfg.min_pixels > cfg.max_pixels:
            raise ConfigError(f"{source}: patch sizes must be >= 1 and min_pixels <= max_pixels")
        return cfg

    @classmethod
    def from_folder(cls, folder: str) -> ImageProcessorConfig:
        """Reads `preprocessor_config.json` from a local HF model folder."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: file not found")
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The target (height, width): multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as those allow (Qwen2-VL's rule, same rounding)."""
    if min(height, width) < 1:
        raise DataError(f"image of size {height}x{width}: both sides must be >= 1")
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"image of size {height}x{width}: aspect ratio must be at most 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 RGB copy of an image given as HW / HWC (1, 3 or 4 channels), uint8 or float in [0, 1].

    Floats are scaled by 255 and rounded (diffusers' `numpy_to_pil` rule), so a Diffuser output
    and its saved PNG give the same pixels. RGBA is composited onto white as transformers does.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise DataError(f"image of shape {image.shape}: expected HW or HWC with 1, 3 or 4 channels")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            if not np.all(np.isfinite(image)) or image.min() < 0.0 or image.max() > 1.0:
                raise DataError(f"float image of shape {image.shape}: values must lie in [0, 1]")
            image = np.round(image.astype(np.float64) * 255.0).astype(np.uint8)
        else:
            raise DataError(f"image of dtype {image.dtype}: expected uint8 or float in [0, 1]")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of an HWC uint8 image (the reference's resampling, bit for bit)."""
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def normalize(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 HWC -> float32 HWC: scale in float64, then subtract mean and divide by std in float32
    (transformers' order and precisions, so the result is identical to its output)."""
    scaled = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return (scaled - mean) / std


def patchify(image_chw: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """(C, H, W) -> (grid_h * grid_w, C * temporal_patch * patch * patch) in the vision tower's order.

    Patches are grouped merge x merge (the merger's 2x2 blocks are consecutive rows), and a
    still image is repeated along time to fill one temporal patch.
    """
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    channels, height, width = image_chw.shape
    grid_h, grid_w = height // p, width // p
    x = image_chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return x.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w


def preprocess_image(image: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches float32 (N, C*T*p*p), grid_thw int64 (3,))."""
    rgb = to_uint8_rgb(image)
    height, width = smart_resize(rgb.shape[0], rgb.shape[1], config.factor,
                                 config.min_pixels, config.max_pixels)
    resized = resize_bicubic(rgb, height, width)
    normed = normalize(resized, config)
    patches, grid_h, grid_w = patchify(normed.transpose(2, 0, 1), config)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)


def preprocess_images(images: Sequence[np.ndarray],
                      config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values (sum N_i, C*T*p*p) float32, image_grid_thw (num_images, 3) int64),
    the concatenated layout the vision tower and the HF processor use."""
    if not images:
        width = 3 * config.temporal_patch_size * config.patch_size ** 2
        return np.zeros((0, width), np.float32), np.zeros((0, 3), np.int64)
    outs = [preprocess_image(im, config) for im in images]
    return np.concatenate([o[0] for o in outs], axis=0), np.stack([o[1] for o in outs])


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int) -> int:
    """Placeholder tokens one image takes in the prompt: its merged patches."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size ** 2)


# ---------------------------------------------------------------- text side

def build_prompt(tokenizer: Any, text: str, num_images: int = 1, system: str | None = None) -> str:
    """The chat-formatted prompt string (images first, then the text, then the assistant header),
    rendered by the tokenizer's own chat template so it matches the checkpoint's format."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("tokenizer: no chat_template (tokenizer_config.json or chat_template.jinja)")
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def expand_image_tokens(prompt: str, image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int,
                        image_token: str = IMAGE_TOKEN) -> str:
    """Repeats the i-th `<|image_pad|>` once per merged patch of image i, as the HF processor does."""
    pieces = prompt.split(image_token)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    if len(pieces) - 1 != len(grids):
        raise DataError(f"prompt holds {len(pieces) - 1} {image_token} tokens but "
                        f"{len(grids)} images were given")
    out = [pieces[0]]
    for grid, piece in zip(grids, pieces[1:], strict=True):
        out.append(image_token * num_image_tokens(grid, merge_size))
        out.append(piece)
    return "".join(out)


def tokenize_left_padded(tokenizer: Any, prompts: Sequence[str],
                         pad_to_multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes fully rendered prompts and left-pads them into one batch.

    Left padding puts every prompt's last token in the last column, so decoding appends in
    step for the whole batch. Returns (input_ids, attention_mask), both int32 (B, L); L is
    rounded up to `pad_to_multiple_of` to bound the number of distinct jit shapes.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ConfigError("tokenizer: no pad_token set (needed to left-pad a batch)")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max((len(r) for r in rows), default=0)
    length = -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, length - len(row):] = row
            attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------- M-RoPE positions

def mrope_position_ids(input_ids: np.ndarray, image_grid_thw: np.ndarray | None,
                       attention_mask: np.ndarray | None, image_token_id: int, vision_start_token_id: int,
                       spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's 3-axis rotary positions (temporal, height, width) for text and images.

    Text tokens count up on all three axes together; the tokens of an image (a run of
    `image_token_id` right after `vision_start_token_id`) take (t, row, column) offsets from
    the position where the image starts, and text resumes at that start plus the larger of
    the merged grid sides. Padding (attention_mask == 0) gets position 0, as in transformers.
    Images are consumed in order across the batch rows, like `get_rope_index`. Every image
    token run must follow `vision_start_token_id` (Qwen's chat template always puts it there);
    an input where it does not raises DataError instead of guessing.

    Returns (position_ids (3, B, L) int32, rope_deltas (B,) int32), where
    rope_deltas = max position + 1 - number of real tokens: decoding step k (0-based) after a
    prompt of n real tokens uses position n + k + rope_delta on all three axes.
    Video inputs are not supported (a still image's temporal index is always 0).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise DataError(f"input_ids of shape {input_ids.shape}: expected (batch, length)")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != input_ids.shape:
        raise DataError(f"attention_mask of shape {mask.shape} does not match input_ids {input_ids.shape}")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    grids = grids.reshape(-1, 3)
    m = spatial_merge_size
    position_ids = np.zeros((3, batch, length), dtype=np.int32)
    rope_deltas = np.zeros((batch,), dtype=np.int32)
    next_image = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        image_positions = np.flatnonzero(ids == image_token_id)
        pieces: list[np.ndarray] = []
        pos = 0     # next free rotary position
        cursor = 0  # first token not yet placed
        k = 0
        while k < len(image_positions):
            i = int(image_positions[k])
            pieces.append(np.broadcast_to(np.arange(pos, pos + i - cursor), (3, i - cursor)))
            pos += i - cursor
            if i == 0 or ids[i - 1] != vision_start_token_id:
                raise DataError(f"input_ids row {b}: image token at {i} does not follow a vision-start token")
            if next_image >= len(grids):
                raise DataError(f"input_ids hold more images than image_grid_thw ({len(grids)})")
            t, h, w = (int(v) for v in grids[next_image])
            next_image += 1
            gh, gw = h // m, w // m
            n = t * gh * gw
            if i + n > len(ids) or not np.all(ids[i:i + n] == image_token_id):
                raise DataError(f"input_ids row {b}: image {next_image - 1} needs {n} consecutive "
                                "image tokens")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
            pos += max(gh, gw)
            cursor = i + n
            k += n
        pieces.append(np.broadcast_to(np.arange(pos, pos + len(ids) - cursor), (3, len(ids) - cursor)))
        row = np.concatenate(pieces, axis=1)
        if row.shape[1]:
            position_ids[:, b, mask[b]] = row
            rope_deltas[b] = row.max() + 1 - len(ids)
    if next_image != len(grids):
        raise DataError(f"image_grid_thw holds {len(grids)} images but input_ids hold {next_image}")
    return position_ids, rope_deltas


# ---------------------------------------------------------------- whole batch

@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids the processor needs, read from the tokenizer (never hard-coded)."""
    image: int
    vision_start: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        ids = {}
        for name, tok in (("image", IMAGE_TOKEN), ("vision_start", VISION_START_TOKEN)):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ConfigError(f"tokenizer: special token {tok} is not in the vocabulary")
            ids[name] = int(tid)
        if tokenizer.pad_token_id is None:
            raise ConfigError("tokenizer: no pad_token set (needed to left-pad a batch)")
        return cls(image=ids["image"], vision_start=ids["vision_start"], pad=int(tokenizer.pad_token_id))


def prepare_batch(tokenizer: Any, texts: Sequence[str], images: Sequence[Sequence[np.ndarray]],
                  config: ImageProcessorConfig, system: str | None = None,
                  pad_to_multiple_of: int = 1) -> dict[str, np.ndarray]:
    """Everything a Qwen2.5-VL prefill needs for a batch of (images, text) user turns.

    images[b] are the images of row b (any number, in prompt order). Returns numpy arrays:
    input_ids, attention_mask (B, L) int32; pixel_values (P, C*T*p*p) float32;
    image_grid_thw (num_images, 3) int64; position_ids (3, B, L) int32; rope_deltas (B,) int32.
    """
    if len(texts) != len(images):
        raise RigError(f"prepare_batch: {len(texts)} texts but {len(images)} image lists")
    special = SpecialTokens.from_tokenizer(tokenizer)
    flat_images = [im for row in images for im in row]
    pixel_values, grid_thw = preprocess_images(flat_images, config)
    prompts = []
    start = 0
    for text, row in zip(texts, images, strict=True):
        prompt = build_prompt(tokenizer, text, num_images=len(row), system=system)
        prompts.append(expand_image_tokens(prompt, grid_thw[start:start + len(row)], config.merge_size))
        start += len(row)
    input_ids, attention_mask = tokenize_left_padded(tokenizer, prompts, pad_to_multiple_of)
    position_ids, rope_deltas = mrope_position_ids(input_ids, grid_thw, attention_mask, special.image,
                                                   special.vision_start, config.merge_size)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_grid_thw": grid_thw, "position_ids": position_ids, "rope_deltas": rope_deltas}
