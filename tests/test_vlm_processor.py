"""The numpy Qwen2.5-VL processor against transformers: pixels, grids, prompt tokens, M-RoPE positions.

The image reference is transformers' PIL-backend `Qwen2VLImageProcessor` (what
`Qwen2VLImageProcessor` resolves to without torchvision, as here); the token reference is
`Qwen2_5_VLProcessor` over a tiny tokenizer trained in memory; the position reference is
`Qwen2_5_VLModel.get_rope_index` of a tiny random model.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from rig_jax.errors import ConfigError, DataError, WeightsError
from rig_jax.vlm import processor as P

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's template, reduced to what the processor exercises (system default, images, text).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_SIZES = [(56, 56), (100, 77), (300, 200)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with Qwen's special tokens, saved and reloaded from a folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red cube left of a blue ball", "You are a helpful assistant.",
                             "Describe the image.", "Is the cat on the mat?"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_processor(tokenizer):
    class _NoVideoProcessor(Qwen2_5_VLProcessor):
        # The video processor needs torchvision; images never touch it.
        def check_argument_for_proper_class(self, name, arg):
            return type(arg)
    return _NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                             video_processor=None, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           [("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("start", "<|vision_start|>"),
            ("end", "<|vision_end|>")]}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                          "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           spatial_merge_size=2, patch_size=14, temporal_patch_size=2,
                           fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"])
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _random_image(rng, size):
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- pixels

@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_pixels_and_grid_match_transformers(size):
    rng = np.random.default_rng(sum(size))
    image = _random_image(rng, size)
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    patches, grid = P.preprocess_image(image, P.ImageProcessorConfig())
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
    # Same PIL resize, same float64 scale then float32 normalise: bit-identical.
    np.testing.assert_array_equal(patches, ref["pixel_values"])


def test_small_max_pixels_and_batch_concatenation():
    rng = np.random.default_rng(1)
    images = [_random_image(rng, s) for s in IMAGE_SIZES]
    kwargs = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20}
    ref = Qwen2VLImageProcessorPil(**kwargs)(images=images, return_tensors="np")
    cfg = P.ImageProcessorConfig.from_dict(kwargs)
    pixel_values, grids = P.preprocess_images(images, cfg)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    np.testing.assert_array_equal(pixel_values, ref["pixel_values"])


def test_smart_resize_matches_reference_rule():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rng = np.random.default_rng(2)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 3000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        assert P.smart_resize(h, w, 28, 3136, 1003520) == smart_resize(h, w, 28, 3136, 1003520)
    with pytest.raises(DataError, match="aspect ratio"):
        P.smart_resize(1, 500)


def test_float_gray_and_rgba_inputs():
    rng = np.random.default_rng(3)
    as_float = rng.random((60, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(P.to_uint8_rgb(as_float), np.round(as_float.astype(np.float64) * 255))
    gray = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    assert P.to_uint8_rgb(gray).shape == (30, 20, 3)
    rgba = rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[rgba], return_tensors="np")
    np.testing.assert_array_equal(P.preprocess_image(rgba, P.ImageProcessorConfig())[0], ref["pixel_values"])
    with pytest.raises(DataError, match="shape"):
        P.to_uint8_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        P.to_uint8_rgb(np.full((4, 4, 3), 2.0))


def test_config_from_folder(tmp_path):
    Qwen2VLImageProcessorPil(min_pixels=1000, max_pixels=50000, merge_size=2).save_pretrained(tmp_path)
    cfg = P.ImageProcessorConfig.from_folder(str(tmp_path))
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.merge_size) == (1000, 50000, 14, 2)
    with pytest.raises(WeightsError, match=r"preprocessor_config\.json"):
        P.ImageProcessorConfig.from_folder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="do_normalize"):
        P.ImageProcessorConfig.from_dict({"do_normalize": False})


# ---------------------------------------------------------------- prompt tokens

def test_prompt_tokens_match_hf_processor(tokenizer, hf_processor):
    rng = np.random.default_rng(4)
    images = [[_random_image(rng, (56, 56)), _random_image(rng, (100, 77))],
              [_random_image(rng, (300, 200))], []]
    texts = ["Describe the image.", "Is the cat on the mat?", "a red cube left of a blue ball"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[1]}]}]
    assert P.build_prompt(tokenizer, texts[1], 1) == hf_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)

    prompts = [P.build_prompt(tokenizer, t, len(row)) for t, row in zip(texts, images, strict=True)]
    flat = [im for row in images for im in row]
    ref = hf_processor(text=prompts, images=flat, return_tensors="np", padding=True, padding_side="left")
    batch = P.prepare_batch(tokenizer, texts, images, P.ImageProcessorConfig())
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(batch["image_grid_thw"], ref["image_grid_thw"])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_id).sum() == 4 + 12 + 77


def test_prompt_errors(tokenizer):
    with pytest.raises(DataError, match="2 images"):
        P.expand_image_tokens("<|image_pad|>", np.array([[1, 2, 2], [1, 2, 2]]), 2)
    padded = P.tokenize_left_padded(tokenizer, ["a", "a red cube"], pad_to_multiple_of=8)
    assert padded[0].shape == (2, 8) and padded[1].sum() == len(tokenizer("a")["input_ids"]) + len(
        tokenizer("a red cube")["input_ids"])


# ---------------------------------------------------------------- M-RoPE positions

def _compare_rope(hf_model, hf_processor, tokenizer, texts, images):
    prompts = [P.build_prompt(tokenizer, t, len(row)) for t, row in zip(texts, images, strict=True)]
    flat = [im for row in images for im in row]
    ref = hf_processor(text=prompts, images=flat or None, return_tensors="pt", padding=True,
                       padding_side="left")
    special = P.SpecialTokens.from_tokenizer(tokenizer)
    grids = ref["image_grid_thw"].numpy() if flat else None
    ours, deltas = P.mrope_position_ids(ref["input_ids"].numpy(), grids, ref["attention_mask"].numpy(),
                                        special.image, special.vision_start, 2)
    with torch.no_grad():
        ref_pos, ref_deltas = hf_model.model.get_rope_index(
            ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
            image_grid_thw=ref["image_grid_thw"] if flat else None, attention_mask=ref["attention_mask"])
    assert ours.dtype == np.int32 and ours.shape == tuple(ref_pos.shape)
    np.testing.assert_array_equal(ours, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))
    return ours


def test_rope_text_only(hf_model, hf_processor, tokenizer):
    _compare_rope(hf_model, hf_processor, tokenizer, ["Describe the image.", "a red cube"], [[], []])


def test_rope_one_image(hf_model, hf_processor, tokenizer):
    rng = np.random.default_rng(5)
    pos = _compare_rope(hf_model, hf_processor, tokenizer, ["Describe the image."],
                        [[_random_image(rng, (300, 200))]])
    assert not np.array_equal(pos[1], pos[2])  # image rows and columns get their own axes


def test_rope_two_images_of_different_sizes(hf_model, hf_processor, tokenizer):
    rng = np.random.default_rng(6)
    _compare_rope(hf_model, hf_processor, tokenizer, ["Is the cat on the mat?"],
                  [[_random_image(rng, (100, 77)), _random_image(rng, (56, 56))]])


def test_rope_left_padded_batch(hf_model, hf_processor, tokenizer):
    rng = np.random.default_rng(7)
    images = [[_random_image(rng, (56, 56))], [_random_image(rng, (300, 200)), _random_image(rng, (100, 77))],
              [_random_image(rng, (100, 77))]]
    _compare_rope(hf_model, hf_processor, tokenizer,
                  ["a red cube left of a blue ball and a long tail of words to pad the others", "Describe.",
                   "Is the cat on the mat?"], images)


def test_rope_rejects_inconsistent_inputs(tokenizer):
    special = P.SpecialTokens.from_tokenizer(tokenizer)
    ids = np.array([[1, special.vision_start] + [special.image] * 4 + [2]])
    P.mrope_position_ids(ids, np.array([[1, 4, 4]]), None, special.image, special.vision_start, 2)
    with pytest.raises(DataError, match="consecutive"):
        P.mrope_position_ids(ids, np.array([[1, 4, 6]]), None, special.image, special.vision_start, 2)
    with pytest.raises(DataError, match="image_grid_thw holds 2"):
        P.mrope_position_ids(ids, np.array([[1, 4, 4]] * 2), None, special.image, special.vision_start, 2)
    with pytest.raises(DataError, match="vision-start"):
        P.mrope_position_ids(ids[:, 2:], np.array([[1, 4, 4]]), None, special.image, special.vision_start, 2)
