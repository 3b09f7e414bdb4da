"""What the per-model tests share: the relative error, weight perturbation, the strict-loading
key cases (missing / surplus / mis-shaped), the tiny random Qwen2.5-VL, and the environment of
the tools the tests start as subprocesses."""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' XLA:CPU compiles LLVM at -O0: from a clean clone most of CI is compiling, and -O0
# took a cold 2-step GRPO stage from 112 to 87 CPU s and the tiny pretraining test (60 steps)
# from 186 to 162, with the same numbers (no fast-math either way). The tools keep XLA's default.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def tool_env(devices: int = 1) -> dict[str, str]:
    """The environment of a tool started as a subprocess: `devices` fake CPU devices, the
    repository importable, and the tests' persistent compilation cache (.cache/jax), so a
    program one run compiled (a resumed run's, the next test's) is read back, not compiled again."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".cache", "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


# Qwen2.5-VL special-token ids of the tiny VLM (vocabulary 512).
IMAGE, VIDEO, START, END = 500, 501, 502, 503
PATCH_DIM = 3 * 2 * 14 * 14   # channels x temporal patch x 14 x 14


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def perturb(model, scale: float):
    """Moves every parameter of a torch module (biases and norm scales included) off its
    initial value, in place, from torch's global generator: zeros and ones would hide a dropped
    bias or an ignored norm scale. Returns the module."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def left_pad(rows: list[list[int]], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of token rows, left-padded with 0 to the longest."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype)
    mask = np.zeros((len(rows), length), dtype)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


# ---- strict loading: a file key missing, one too many, one of the wrong shape -----------------

STRICT_KEY_CASES = ("missing", "surplus", "misshaped")


def write_weights_variant(source: str, folder: str, edit: Callable[[dict], None]) -> str:
    """Copies the weights folder `source` to `folder` and applies `edit` to the state dict of its
    one safetensors file."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, folder)
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    path = os.path.join(folder, files[0])
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return str(folder)


def check_strict_key_case(case: str, source: str, folder: str, load: Callable[[str], object], *,
                          missing: str, surplus: tuple[str, np.ndarray],
                          misshaped: tuple[str, np.ndarray]) -> None:
    """Loading a copy of `source` with the `case` defect raises a WeightsError naming the key
    (and, for a mis-shaped one, the shape found)."""
    from rig_jax.errors import WeightsError

    if case == "missing":
        edit, pattern = (lambda s: s.pop(missing)), f"missing key {re.escape(missing)}$"
    elif case == "surplus":
        key, value = surplus
        edit, pattern = (lambda s: s.__setitem__(key, value)), f"unexpected key {re.escape(key)}"
    elif case == "misshaped":
        key, value = misshaped
        edit = lambda s: s.__setitem__(key, value)
        pattern = f"key {re.escape(key)} has shape {re.escape(str(tuple(value.shape)))}"
    else:
        raise ValueError(case)
    variant = write_weights_variant(source, folder, edit)
    with pytest.raises(WeightsError, match=pattern):
        load(variant)


# ---- the tiny random Qwen2.5-VL --------------------------------------------------------------

def tiny_qwen_vl_config(*, depth: int = 3, tie: bool = False, vocab_size: int = 512, image: int = IMAGE,
                        video: int = VIDEO, start: int = START, end: int = END, **text):
    """A 2-layer, 64-wide Qwen2.5-VL with a `depth`-block vision tower (block 1 full attention,
    windows of 2x2 merged tokens); `text` overrides text_config fields."""
    from transformers import Qwen2_5_VLConfig

    text_config = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 3, 3]},
                       initializer_range=0.1, eos_token_id=None, bos_token_id=None)
    text_config.update(text)
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                           fullatt_block_indexes=[1], initializer_range=0.1),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=tie)


def save_tiny_qwen_vl(folder: str, config, seed: int = 0, scale: float = 0.05):
    """A seeded random `Qwen2_5_VLForConditionalGeneration` with every weight perturbed (biases
    and RMSNorm scales included), saved with `save_pretrained`; returns the torch model."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = perturb(Qwen2_5_VLForConditionalGeneration(config).eval(), scale)
    model.save_pretrained(folder)
    return model


# Qwen2.5-VL's special tokens and a chat template reduced to user turns of images and text.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_vlm_folder(folder: str, corpus: list[str], vocab_size: int, seed: int = 0, **config):
    """A tiny random Qwen2.5-VL in the Hugging Face layout: a byte-level BPE trained on `corpus`
    with Qwen's special tokens and chat template, preprocessor_config.json, weights saved from
    transformers (`config` overrides `tiny_qwen_vl_config`). Returns (model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    Qwen2VLImageProcessorPil(max_pixels=28 * 28 * 16).save_pretrained(folder)
    ids = {t: fast.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    cfg = tiny_qwen_vl_config(
        **{"depth": 2, "vocab_size": len(fast), "image": ids["<|image_pad|>"], "video": ids["<|video_pad|>"],
           "start": ids["<|vision_start|>"], "end": ids["<|vision_end|>"], "eos_token_id": ids["<|im_end|>"],
           "pad_token_id": ids["<|endoftext|>"], **config})
    return save_tiny_qwen_vl(str(folder), cfg, seed=seed), fast


def hf_rope_positions(hf, ids: np.ndarray, mask: np.ndarray, grids: np.ndarray, image_token_id: int = IMAGE):
    """transformers' own M-RoPE positions (3, B, L) for a batch: `get_rope_index` with the image
    tokens marked, so parity tests never hand rig_jax's positions to the reference."""
    import torch

    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    positions, _ = hf.model.get_rope_index(
        torch.tensor(ids).long(), torch.tensor((np.asarray(ids) == image_token_id).astype(np.int64)),
        image_grid_thw=torch.tensor(grids) if len(grids) else None, attention_mask=torch.tensor(mask).long())
    return positions


def check_config_refused(folder: str, reader: Callable[..., object], edits: dict, source: str,
                         pattern: str) -> None:
    """The folder's config.json with `edits` applied makes `reader(config, source=source)` raise a
    one-line ConfigError matching `source: pattern`."""
    import json

    from rig_jax.errors import ConfigError

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.update(edits)
    with pytest.raises(ConfigError, match=f"{re.escape(source)}: {pattern}") as info:
        reader(config, source=source)
    assert "\n" not in str(info.value)


def start_together(commands: list[list[str]], env: dict, cwd: str, timeout: float
                   ) -> tuple[list[int], list[str]]:
    """Starts every command at once (the processes of one multi-host job) and waits for all;
    fails the test naming the first that timed out; returns their exit codes and logs."""
    import subprocess

    import pytest

    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in commands]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"multi-host process timed out after {timeout} s: {' '.join(p.args[:4])} ...")
    return [p.returncode for p in procs], logs


def run_together(commands: list[list[str]], env: dict, cwd: str, timeout: float) -> list[str]:
    """`start_together`, failing the test on the first process that failed; returns the logs."""
    codes, logs = start_together(commands, env, cwd, timeout)
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log[-3000:]
    return logs
