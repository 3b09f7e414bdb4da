"""Tokenizers of the ShapesSG models, built with `tokenizers` and saved in the folder layouts
transformers reads, so the models load through the same code paths as real checkpoints.

The CLIP tokenizer is a byte-level BPE whose merges spell every ShapesSG word as one token
(`vocab.json` + `merges.txt` + `tokenizer_config.json`, what `CLIPTokenizer` reads).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PUNCTUATION = (".", ";", ",", "{", "}", ":", '"')


def write_clip_tokenizer(folder: str, words: Sequence[str], max_length: int) -> None:
    """A CLIP tokenizer folder whose vocabulary is the bytes, `words` and the two specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted({ch for w in list(words) + list(PUNCTUATION) for ch in w})
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, special_tokens=[BOS, EOS],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tokenizer.train_from_iterator([" ".join(list(words) + list(PUNCTUATION))] * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    # The trainer numbers tokens of equal count in hash-map order, which differs between runs
    # (the merges do not): number them in one fixed order, the specials first.
    rest = sorted((t for t in model["vocab"] if t not in (BOS, EOS)), key=lambda t: (len(t), t))
    vocab = {token: i for i, token in enumerate([BOS, EOS, *rest])}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for merge in model["merges"]:
            f.write((" ".join(merge) if isinstance(merge, list) else merge) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)
