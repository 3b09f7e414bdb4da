"""A tiny random Stable Diffusion pipeline folder in the diffusers layout, built offline.

Every part is the PyTorch reference (diffusers' UNet2DConditionModel, AutoencoderKL,
DDIMScheduler; transformers' CLIPTextModel and CLIPTokenizer) at toy sizes, assembled
into a `StableDiffusionPipeline` and saved with `save_pretrained`, so our loaders read
exactly what diffusers writes. The tokenizer is written by hand: the 256 byte-level
characters (bare and with the `</w>` word end) plus the two CLIP special tokens, and no
merges, so every word becomes one token per character.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

import torch

from tests.helpers import perturb

MAX_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
LATENT_SIZE = 8          # latents 8x8; the VAE (two blocks) doubles it to 16x16 images
CROSS_DIM = 32           # CLIP hidden size = U-Net cross-attention width

UNET_KWARGS = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=8)
VAE_KWARGS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, latent_channels=4, sample_size=2 * LATENT_SIZE)
# Stable Diffusion 1.x's scheduler settings.
SCHEDULER_KWARGS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading")


def byte_level_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 upward."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(folder: str) -> int:
    """Writes vocab.json, merges.txt and tokenizer_config.json of a tiny CLIP tokenizer;
    returns the vocabulary size (ids: characters, characters + "</w>", BOS, EOS)."""
    os.makedirs(folder, exist_ok=True)
    chars = byte_level_characters()
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS_TOKEN,
              "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return len(tokens)


def build_reference_pipeline(seed: int = 0):
    """The tiny random `StableDiffusionPipeline` (float32, eval mode, CPU)."""
    import diffusers
    import transformers

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        vocab_size = write_tokenizer(tokenizer_dir)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET_KWARGS).eval()
    perturb(unet, 0.05)
    vae = diffusers.AutoencoderKL(**VAE_KWARGS).eval()
    perturb(vae, 0.02)
    text_config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    perturb(text_encoder, 0.02)
    scheduler = diffusers.DDIMScheduler(**SCHEDULER_KWARGS)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sd_folder(folder: str, seed: int = 0):
    """Saves the tiny pipeline as a diffusers folder (safetensors) and returns the
    PyTorch pipeline, the oracle for parity tests."""
    pipe = build_reference_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


_BUILT: dict[int, tuple[str, object]] = {}


def shared_tiny_sd_folder(tmp_path_factory, seed: int = 0):
    """`(folder, reference pipeline)`, built once per test session whichever module asks
    first (call it from a session-scoped fixture)."""
    if seed not in _BUILT:
        folder = str(tmp_path_factory.mktemp(f"tiny_sd_{seed}"))
        with single_threaded_torch():
            _BUILT[seed] = (folder, make_tiny_sd_folder(folder, seed))
    return _BUILT[seed]


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Runs the PyTorch oracle on one thread: on a small shared machine, torch's thread pool
    fighting XLA's for the same cores made a 10-step tiny pipeline take 30 s instead of 0.3 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
