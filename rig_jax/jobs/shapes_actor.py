"""The ShapesSG Actor: a tiny Qwen2.5-VL-layout VLM warm-started by supervised fine-tuning
(`sft_actor`, one job of the one train loop).

Each example is a ShapesSG prompt `P`, an image that does not satisfy it (the objects placed
anew until a relation differs, one or all objects dropped, or one drawn as another shape),
the Checker's feedback on that image (the ShapesSG Checker is the pixel detector; its
verdicts go through `format_checker_feedback`), the Actor's question `actor_prompt(P,
feedback)`, and the answer `render_edit_prompt(edit_text(form, bad triplets, P))` with the
form drawn per example from `actor.forms`, so the warm-started policy samples different
prompts for one input. The loss is token cross-entropy on the answer tokens only, teacher
forced through the model's forward with the image and M-RoPE positions the processor gives.

The export is a Hugging Face Qwen2.5-VL folder (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json with the chat template, preprocessor_config.json,
generation_config.json with the default temperature, shapes_config.json with the world and
seeds) that `rig_jax.vlm.pipeline.load_vlm_pipeline` reads like Qwen2.5-VL-3B.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.data import edit_forms, shapes
from rig_jax.data.scene_graph import Triplet
from rig_jax.data.shapes import WORLD_FILE
from rig_jax.errors import ConfigError, DataError
from rig_jax.jobs import actor_text
from rig_jax.jobs.shapes_diffuser import world_from_config
from rig_jax.rig.checker import checker_verdicts
from rig_jax.train.data import host_global_batches
from rig_jax.train.loop import TrainJob, TrainState
from rig_jax.vlm import prompts
from rig_jax.vlm.processor import ImageProcessorConfig, prepare_batch, smart_resize
from rig_jax.weights.io import write_json

GENERATION_FILE = "generation_config.json"
EXPORT_DIR = "actor"
CORRUPTIONS = ("violate", "drop", "reshape")
DROP_ALL_PROBABILITY = 0.2    # a "drop" corruption removes every object (an empty canvas) this often
CORPUS_EXAMPLES = 400         # examples whose texts train the tokenizer's merges
PLACEMENT_TRIES = 50


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """How SFT examples are drawn: the world, the answer forms, and how often each corruption
    makes the image (weights over CORRUPTIONS)."""
    world: shapes.ShapesConfig
    forms: tuple[str, ...]
    corruption_weights: tuple[float, float, float]

    def __post_init__(self) -> None:
        unknown = [f for f in self.forms if f not in edit_forms.ACTOR_FORMS]
        if not self.forms or unknown:
            known = ", ".join(edit_forms.ACTOR_FORMS)
            raise ConfigError(f"actor.forms: {unknown or 'empty'} (known: {known})")
        w = self.corruption_weights
        if len(w) != len(CORRUPTIONS) or min(w) < 0 or sum(w) <= 0:
            raise ConfigError(f"actor.corruption_weights: {tuple(w)} must be {len(CORRUPTIONS)} weights >= 0 "
                              f"with a positive sum ({', '.join(CORRUPTIONS)})")


@dataclasses.dataclass(frozen=True)
class ActorExample:
    """One SFT example: the image the Actor sees, its question and the answer it is taught."""
    image: np.ndarray
    prompt: str
    feedback: str
    question: str
    answer: str
    form: str
    bad_triplets: tuple[Triplet, ...]


def _replaced(scene: shapes.Scene, rng: np.random.Generator, world: shapes.ShapesConfig) -> shapes.Scene:
    """The same objects at new places where at least one prompted relation differs."""
    n = len(scene.objects)
    world_n = dataclasses.replace(world, min_objects=n, max_objects=n)
    want = [r.predicate for r in shapes.scene_graph(scene).relations]
    for _ in range(PLACEMENT_TRIES):
        placed = shapes.generate_scene(rng, world_n)
        objects = tuple(dataclasses.replace(o, box=p.box) for o, p in zip(scene.objects, placed.objects,
                                                                          strict=True))
        moved = dataclasses.replace(scene, objects=objects)
        if [r.predicate for r in shapes.scene_graph(moved).relations] != want:
            return moved
    raise DataError(f"ShapesConfig: no placement changing a relation in {PLACEMENT_TRIES} tries")


def corrupt(scene: shapes.Scene, rng: np.random.Generator, settings: ExampleSettings) -> shapes.Scene:
    """An image scene that fails the prompt of `scene` in the way the corruption drawn says."""
    weights = np.asarray(settings.corruption_weights, np.float64)
    kind = CORRUPTIONS[int(rng.choice(len(CORRUPTIONS), p=weights / weights.sum()))]
    world = settings.world
    if kind == "reshape" and (world.is_colour_only or len(world.shapes) < 2):
        kind = "violate"
    if kind == "violate":
        return _replaced(scene, rng, world)
    objects = list(scene.objects)
    if kind == "drop":
        if rng.random() < DROP_ALL_PROBABILITY:
            return dataclasses.replace(scene, objects=())
        del objects[int(rng.integers(len(objects)))]
        return dataclasses.replace(scene, objects=tuple(objects))
    k = int(rng.integers(len(objects)))
    others = [s for s in world.shapes if s != objects[k].shape]
    objects[k] = dataclasses.replace(objects[k], shape=others[int(rng.integers(len(others)))])
    return dataclasses.replace(scene, objects=tuple(objects))


def draw_example(rng: np.random.Generator, settings: ExampleSettings) -> ActorExample:
    """A prompt, an image that fails it, the Checker's feedback and one answer form."""
    scene = shapes.generate_scene(rng, settings.world)
    graph = shapes.scene_graph(scene)
    triplets = graph.triplets(with_attributes=True)
    image = shapes.render(corrupt(scene, rng, settings), settings.world)
    verdicts = checker_verdicts(image, graph, settings.world)
    bad = tuple(t for t, v in zip(triplets, verdicts.verdicts, strict=True)
                if v is not prompts.Verdict.SATISFIED)
    if not bad:
        raise DataError("actor example: the corrupted image still satisfies every triplet")
    prompt = graph.prompt()
    feedback = prompts.format_checker_feedback(triplets, verdicts)
    form = settings.forms[int(rng.integers(len(settings.forms)))]
    return ActorExample(image=image, prompt=prompt, feedback=feedback,
                        question=prompts.actor_prompt(prompt, feedback),
                        answer=prompts.render_edit_prompt(edit_forms.edit_text(form, bad, prompt)),
                        form=form, bad_triplets=bad)


def example_at(seed: int, index: int, settings: ExampleSettings) -> ActorExample:
    """The example of `(seed, index)`: the same on every host and after every resume."""
    return draw_example(np.random.default_rng([seed, int(index)]), settings)


def valid_answers(example: ActorExample, forms: Sequence[str]) -> set[str]:
    """Every edit text the SFT data teaches for this input (one per form)."""
    return {edit_forms.edit_text(f, example.bad_triplets, example.prompt) for f in forms}


def tokenizer_corpus(settings: ExampleSettings, seed: int) -> list[str]:
    """Texts the tokenizer's merges are trained on: questions and answers in every form, and
    every world word with and without a leading space or quote."""
    labels = list(settings.world.shapes) + [shapes.COLOUR_ONLY_LABEL]
    words = edit_forms.vocabulary(settings.world.colours, labels)
    texts = [" ".join(words), " ".join(f'"{w}' for w in words)]
    for i in range(CORPUS_EXAMPLES):
        ex = example_at(seed, i, settings)
        texts.append(ex.question)
        texts += [prompts.render_edit_prompt(t) for t in valid_answers(ex, edit_forms.ACTOR_FORMS)]
    return texts


# ----------------------------------------------------------------------------- encoding

@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """Turns examples into fixed-shape model inputs: the question left-padded to
    `max_prompt_tokens` (as `prepare_batch` pads a batch), the answer (+ end of turn)
    right-padded to `max_answer_tokens`, and M-RoPE positions for both."""
    tokenizer: Any
    image_config: ImageProcessorConfig
    max_prompt_tokens: int
    max_answer_tokens: int
    image_size: int

    @property
    def grid(self) -> np.ndarray:
        """(t, h, w) patches of every image: one grid, so the vision tower has one shape."""
        c = self.image_config
        h, w = smart_resize(self.image_size, self.image_size, c.factor, c.min_pixels, c.max_pixels)
        return np.array([1, h // c.patch_size, w // c.patch_size], np.int64)

    def encode(self, example: ActorExample) -> dict[str, np.ndarray]:
        q = prepare_batch(self.tokenizer, [example.question], [[example.image]], self.image_config)
        n = q["input_ids"].shape[1]
        lp, la = self.max_prompt_tokens, self.max_answer_tokens
        if n > lp:
            raise DataError(f"actor.max_prompt_tokens: a question takes {n} tokens, more than {lp}")
        answer = self.tokenizer(example.answer + actor_text.IM_END, add_special_tokens=False)["input_ids"]
        if len(answer) > la:
            raise DataError(f"actor.max_answer_tokens: an answer takes {len(answer)} tokens, more than {la}")
        pad = int(self.tokenizer.pad_token_id)
        ids = np.full((lp + la,), pad, np.int32)
        ids[lp - n:lp] = q["input_ids"][0]
        ids[lp:lp + len(answer)] = answer
        mask = np.zeros((lp + la,), np.int32)
        mask[lp - n:] = 1
        positions = np.zeros((3, lp + la), np.int32)
        positions[:, lp - n:lp] = q["position_ids"][:, 0]
        start = n + int(q["rope_deltas"][0])       # decoding step k sits at n + k + rope_delta
        positions[:, lp:] = start + np.arange(la)[None]
        labels = np.full((la,), pad, np.int32)
        labels[:len(answer)] = answer
        label_mask = np.zeros((la,), np.float32)
        label_mask[:len(answer)] = 1.0
        if not np.array_equal(q["image_grid_thw"][0], self.grid):
            raise DataError(f"actor image: grid {q['image_grid_thw'][0].tolist()} differs from the world's "
                            f"{self.grid.tolist()}")
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                "pixel_values": q["pixel_values"].astype(np.float32), "labels": labels,
                "label_mask": label_mask}


def sft_dataset(settings: ExampleSettings, encoder: Encoder, seed: int, batch_size: int) -> grain.IterDataset:
    """Endless host-local batches of encoded examples drawn from `(seed, index)`: indices are
    shuffled globally and cut into global batches; host h of n takes its rows of each, so a
    step's global batch is the same on one host or many, and the grain iterator's position is
    all a checkpoint needs."""
    return host_global_batches(seed, batch_size, lambda i: encoder.encode(example_at(seed, i, settings)))


# ----------------------------------------------------------------------------- loss

def sft_loss(model: Any, grid: np.ndarray, max_prompt_tokens: int, max_answer_tokens: int):
    """Mean token cross-entropy of the answer tokens (end of turn included) given the image and
    the question; logits are computed for the answer slots only."""
    from rig_jax.models.qwen2_5_vl.vision import vision_inputs

    vision_config = model.config.vision
    lp, la = max_prompt_tokens, max_answer_tokens

    def loss_fn(params: Any, frozen: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        b, patches, dim = batch["pixel_values"].shape
        grids = np.tile(grid, (b, 1))          # static: host index arrays, constants in the jit
        vision = {k: jnp.asarray(v) for k, v in vision_inputs(grids, vision_config).items()}
        logits, _ = model.apply({"params": params}, batch["input_ids"],
                                jnp.transpose(batch["position_ids"], (1, 0, 2)), batch["attention_mask"],
                                batch["pixel_values"].reshape(b * patches, dim), vision,
                                logits_slice=(lp - 1, la))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_logp = jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
        mask = batch["label_mask"]
        count = jnp.maximum(jnp.sum(mask), 1.0)
        loss = -jnp.sum(token_logp * mask) / count
        correct = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
        answer_right = jnp.all((correct > 0) | (mask == 0), axis=-1).astype(jnp.float32)
        return loss, {"token_accuracy": jnp.sum(correct * mask) / count,
                      "answer_accuracy": jnp.mean(answer_right)}
    return loss_fn


# ----------------------------------------------------------------------------- folder files

def image_side(c: Any, image_size: int) -> int:
    """The side the processor resizes renders to: a multiple of one merged patch."""
    factor = c.vision.patch_size * 2
    return max(factor, round(image_size / factor) * factor)


def preprocessor_config_dict(c: Any, image_size: int) -> dict[str, Any]:
    """Qwen2-VL `preprocessor_config.json`: every render resized to one side (min = max pixels),
    so every image has one grid and the vision tower one compiled shape."""
    from rig_jax.vlm.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pixels = image_side(c, image_size) ** 2
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "rescale_factor": 1 / 255, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "patch_size": c.vision.patch_size, "temporal_patch_size": 2,
            "merge_size": 2, "min_pixels": pixels, "max_pixels": pixels,
            "size": {"shortest_edge": pixels, "longest_edge": pixels}}


def actor_config_dict(c: Any, ids: Mapping[str, int], vocab_size: int, image_size: int) -> dict[str, Any]:
    """transformers `config.json` (nested form) of the Actor; embeddings tied, as Qwen2.5-VL-3B."""
    text = {"model_type": "qwen2_5_vl_text", "vocab_size": vocab_size, "hidden_size": c.text.hidden_size,
            "intermediate_size": c.text.intermediate_size, "num_hidden_layers": c.text.num_layers,
            "num_attention_heads": c.text.num_heads, "num_key_value_heads": c.text.num_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": c.text.max_positions, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": list(c.text.mrope_section)},
            "tie_word_embeddings": True, "use_sliding_window": False, "bos_token_id": None,
            "eos_token_id": ids[actor_text.IM_END], "pad_token_id": ids[actor_text.PAD]}
    v = c.vision
    vision = {"model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
              "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
              "out_hidden_size": c.text.hidden_size, "in_channels": 3, "patch_size": v.patch_size,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": image_side(c, image_size),
              "fullatt_block_indexes": [v.depth - 1], "tokens_per_second": 4, "hidden_act": "silu"}
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
            "image_token_id": ids[actor_text.IMAGE_PAD], "video_token_id": ids[actor_text.VIDEO_PAD],
            "vision_start_token_id": ids[actor_text.VISION_START],
            "vision_end_token_id": ids[actor_text.VISION_END]}


def generation_config_dict(c: Any, ids: Mapping[str, int]) -> dict[str, Any]:
    """The Actor's default sampling (what the 95% / 3-distinct evaluation used)."""
    return {"do_sample": True, "temperature": c.temperature, "top_p": 1.0, "top_k": 0,
            "max_new_tokens": c.max_answer_tokens, "bos_token_id": None,
            "eos_token_id": [ids[actor_text.IM_END], ids[actor_text.PAD]],
            "pad_token_id": ids[actor_text.PAD]}


def tokenizer_folder(workdir: str, settings: ExampleSettings, seed: int, max_length: int) -> str:
    """`<workdir>/tokenizer`, built once (by process 0) from the training examples' texts."""
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and jax.process_index() == 0:
        actor_text.write_actor_tokenizer(folder, tokenizer_corpus(settings, seed), max_length)
    return folder


# ----------------------------------------------------------------------------- evaluation

def decode_answers(tokenizer: Any, tokens: np.ndarray, valid: np.ndarray, stops: Sequence[int]
                   ) -> tuple[list[str], list[bool]]:
    """Each row's generated text up to (not including) its stop token, special tokens kept (an
    image token inside an answer makes it malformed, not silently dropped); and whether it stopped."""
    texts, stopped = [], []
    for row, keep in zip(tokens, valid, strict=True):
        ids = [int(t) for t in row[keep]]
        ended = bool(ids) and ids[-1] in stops
        texts.append(tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False))
        stopped.append(ended)
    return texts, stopped


def evaluate_actor(pipe: Any, params: Any, examples: Sequence[ActorExample], forms: Sequence[str],
                   samples: int, temperature: float, max_new_tokens: int, rng: jax.Array,
                   batch_inputs: int) -> dict[str, float]:
    """Samples `samples` answers per input at `temperature`: the fraction well formed (the
    parser's `well_formed`), stopped, and teaching one of the forms' texts for that input;
    the fraction of inputs with >= 3 distinct edit prompts, and the mean distinct count."""
    from rig_jax.vlm.decode import generate

    well, stopped, valid, distinct = [], [], [], []
    for start in range(0, len(examples), batch_inputs):
        chunk = list(examples[start:start + batch_inputs])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_inputs - real)        # one compiled shape for every chunk
        batch = prepare_batch(pipe.tokenizer, [ex.question for ex in chunk for _ in range(samples)],
                              [[ex.image] for ex in chunk for _ in range(samples)], pipe.image_config,
                              pad_to_multiple_of=16)
        out = generate(pipe.model, params, batch, jax.random.fold_in(rng, start), max_new_tokens,
                       temperature=temperature, stop_token_ids=pipe.stop_token_ids, pad_id=pipe.pad_id)
        texts, ended = decode_answers(pipe.tokenizer, np.asarray(out["tokens"]), np.asarray(out["valid"]),
                                      pipe.stop_token_ids)
        for i, ex in enumerate(chunk[:real]):
            rows = range(i * samples, (i + 1) * samples)
            parsed = [prompts.parse_edit_prompt(texts[r]) for r in rows]
            teach = valid_answers(ex, forms)
            well += [p.well_formed and ended[r] for p, r in zip(parsed, rows, strict=True)]
            stopped += [ended[r] for r in rows]
            valid += [p.text in teach for p in parsed]
            distinct.append(len({p.text for p in parsed if p.text}))
    return {"well_formed": float(np.mean(well)), "stopped": float(np.mean(stopped)),
            "valid_edit": float(np.mean(valid)), "distinct_ge3": float(np.mean(np.asarray(distinct) >= 3)),
            "mean_distinct": float(np.mean(distinct))}


# ----------------------------------------------------------------------------- the job

def build_actor_job(config: Any, workdir: str, mesh: Any, rules: Any) -> TrainJob:
    """`sft_actor`: the tiny Qwen2.5-VL Actor from scratch; exports `<workdir>/actor`."""
    import shutil

    from rig_jax.models.qwen2_5_vl.model import Qwen25VL, dummy_inputs
    from rig_jax.train.optimizer import OptimizerSettings
    from rig_jax.train.step import StepSettings
    from rig_jax.vlm.pipeline import VLMPipeline, load_tokenizer, stop_tokens
    from rig_jax.weights.mapping import to_host
    from rig_jax.weights.qwen2_5_vl import qwen_vl_config_from_hf, save_qwen_vl

    a = config.actor
    world = world_from_config(config.world)
    settings = ExampleSettings(world, tuple(a.forms), tuple(a.corruption_weights))
    tok_dir = tokenizer_folder(workdir, settings, config.seed, a.text.max_positions)
    tokenizer = load_tokenizer(tok_dir)
    ids = actor_text.special_token_ids(tokenizer)
    config_dict = actor_config_dict(a, ids, len(tokenizer), world.image_size)
    processor_dict = preprocessor_config_dict(a, world.image_size)
    image_config = ImageProcessorConfig.from_dict(processor_dict, "actor.vision")
    vlm_config = qwen_vl_config_from_hf(config_dict, source="actor config")
    dtype = jnp.dtype(config.step.compute_dtype)
    model = Qwen25VL(vlm_config, dtype=dtype, param_dtype=jnp.float32)
    pipe = VLMPipeline(model=model, config=vlm_config, tokenizer=tokenizer, image_config=image_config,
                       stop_token_ids=stop_tokens(vlm_config, tokenizer), pad_id=int(tokenizer.pad_token_id),
                       source=os.path.join(workdir, EXPORT_DIR))
    encoder = Encoder(tokenizer, image_config, a.max_prompt_tokens, a.max_answer_tokens, world.image_size)
    eval_examples = [example_at(config.eval.seed, i, settings) for i in range(config.eval.num_inputs)]

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        return evaluate_actor(pipe, state.params, eval_examples, settings.forms, config.eval.samples,
                              a.temperature, a.max_answer_tokens, jax.random.PRNGKey(config.eval.seed),
                              config.eval.batch_inputs)

    def export(state: TrainState) -> None:
        params = jax.tree.map(to_host, state.params)
        if jax.process_index() != 0:
            return
        folder = os.path.join(workdir, EXPORT_DIR)
        os.makedirs(folder, exist_ok=True)
        save_qwen_vl(folder, config_dict, params)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(folder, name))
        write_json(processor_dict, os.path.join(folder, "preprocessor_config.json"))
        write_json(generation_config_dict(a, ids), os.path.join(folder, GENERATION_FILE))
        write_json({"world": {"image_size": world.image_size, "min_objects": world.min_objects,
                              "max_objects": world.max_objects, "colours": list(world.colours),
                              "shapes": list(world.shapes), "colour_only": world.is_colour_only},
                    "forms": list(settings.forms), "corruption_weights": list(settings.corruption_weights),
                    "temperature": a.temperature, "trained_steps": int(jax.device_get(state.step)),
                    "seed": config.seed, "eval": {"seed": config.eval.seed, "samples": config.eval.samples,
                                                  "num_inputs": config.eval.num_inputs}},
                   os.path.join(folder, WORLD_FILE))

    return TrainJob(
        name="sft_actor", init_params=lambda rng: model.init(rng, **dummy_inputs(vlm_config))["params"],
        loss_fn=sft_loss(model, encoder.grid, a.max_prompt_tokens, a.max_answer_tokens),
        optimizer=OptimizerSettings.from_config(config.optimizer), step=StepSettings(**config.step),
        dataset=lambda: sft_dataset(settings, encoder, config.seed, config.train.batch_size),
        frozen={}, evaluate=evaluate, export=export)
