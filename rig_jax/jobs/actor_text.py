"""The ShapesSG Actor's tokenizer and chat template, in the Qwen2.5-VL folder layout.

A byte-level BPE with Qwen2's pre-tokenizer (the same split regex, NFC, byte-level
alphabet and decoder that transformers' `Qwen2Tokenizer` builds), trained on the texts the
Actor reads and writes until every word is one token, plus the Qwen special tokens the
processor and the chat template use. Byte-level, so any text encodes and decodes exactly:
a sampled answer decodes to the very string `parse_edit_prompt` reads. The chat template is
Qwen2-VL's without the default system turn (fewer prompt tokens for a model that never
saw one). Saved as `tokenizer.json` + `tokenizer_config.json` (with the template), which
`AutoTokenizer` and `rig_jax.vlm.pipeline.load_tokenizer` read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROLES = ("system", "user", "assistant")


def build_tokenizer(corpus: Iterable[str]) -> object:
    """A `tokenizers.Tokenizer` whose merges spell every pre-token of `corpus` as one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(corpus) + [f"{IM_START}{role}\n" for role in ROLES]
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_actor_tokenizer(folder: str, corpus: Iterable[str], max_length: int) -> None:
    """`tokenizer.json` and `tokenizer_config.json` (chat template included) in `folder`."""
    tokenizer = build_tokenizer(corpus)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": max_length, "bos_token": None,
              "eos_token": IM_END, "pad_token": PAD, "unk_token": None, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
              "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def special_token_ids(tokenizer: object) -> dict[str, int]:
    """The id of every special token in a loaded tokenizer (what config.json records)."""
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
