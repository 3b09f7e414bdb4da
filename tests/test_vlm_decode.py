"""Jitted decoding and scoring against transformers' `generate` and forward (float32, CPU).

The tiny random model has every weight perturbed (biases and norm scales included); the
reference log-probs are taken at the M-RoPE positions transformers computes itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rig_jax.errors import RigError
from rig_jax.parallel import DEFAULT_RULES, make_mesh, param_shardings
from rig_jax.vlm.decode import filter_logits, generate, score
from rig_jax.vlm.processor import mrope_position_ids
from rig_jax.weights.qwen2_5_vl import load_qwen_vl, qwen_vl_boxed_params
from tests.helpers import (
    END,
    IMAGE,
    PATCH_DIM,
    START,
    hf_rope_positions,
    left_pad,
    save_tiny_qwen_vl,
    tiny_qwen_vl_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("qwen_vl_decode"))
    hf = save_tiny_qwen_vl(folder, tiny_qwen_vl_config(depth=2), seed=1)
    _, module, params = load_qwen_vl(folder, dtype=jnp.float32)
    return {"hf": hf, "module": module, "params": params, "folder": folder}


def image_tokens(grid):
    return [START] + [IMAGE] * (int(np.prod(grid)) // 4) + [END]


def make_batch(rows, grids, seed=0):
    ids, mask = left_pad(rows, np.int32)
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    pos, deltas = mrope_position_ids(ids, grids if len(grids) else None, mask, IMAGE, START, 2)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "rope_deltas": deltas}
    if len(grids):
        pix = np.random.default_rng(seed).standard_normal((int(np.prod(grids, -1).sum()), PATCH_DIM))
        batch["pixel_values"] = pix.astype(np.float32)
        batch["image_grid_thw"] = grids
    return batch


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of different lengths (left padding): image + text, text only, small image."""
    g1, g2 = (1, 8, 12), (1, 4, 4)
    rows = [[5, 6] + image_tokens(g1) + [7, 8], [9, 10, 11, 12], image_tokens(g2) + [13, 14, 15, 16, 17, 18]]
    return make_batch(rows, [g1, g2])


def hf_generate(hf, batch, max_new_tokens, eos=None):
    ids = torch.tensor(batch["input_ids"]).long()
    kwargs = {}
    if "pixel_values" in batch:
        kwargs = {"pixel_values": torch.tensor(batch["pixel_values"]),
                  "image_grid_thw": torch.tensor(batch["image_grid_thw"]),
                  "mm_token_type_ids": (ids == IMAGE).long()}
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]).long(),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          **kwargs)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate(tiny, prompts):
    out = generate(tiny["module"], tiny["params"], prompts, jax.random.PRNGKey(0), 16, greedy=True)
    ref = hf_generate(tiny["hf"], prompts, 16)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref)
    assert np.asarray(out["valid"]).all()
    assert len(np.unique(ref)) > 8  # a non-degenerate continuation


def test_generate_compiles_once_per_shape(tiny, prompts):
    """New prompt values, rng and temperature of the same shapes reuse the compiled decoder."""
    from rig_jax.vlm import decode
    first = generate(tiny["module"], tiny["params"], prompts, jax.random.PRNGKey(1), 10, temperature=0.8)
    compiled = decode._generate._cache_size()
    other = dict(prompts, input_ids=np.where(prompts["input_ids"] == 7, 3, prompts["input_ids"]))
    second = generate(tiny["module"], tiny["params"], other, jax.random.PRNGKey(2), 10, temperature=1.1)
    assert decode._generate._cache_size() == compiled
    assert not np.array_equal(np.asarray(first["tokens"]), np.asarray(second["tokens"]))


def test_stop_token_masks_and_pads(tiny, prompts):
    greedy = np.asarray(generate(tiny["module"], tiny["params"], prompts, jax.random.PRNGKey(0), 16,
                                 greedy=True)["tokens"])
    stop = int(greedy[0, 4])
    out = generate(tiny["module"], tiny["params"], prompts, jax.random.PRNGKey(0), 16, greedy=True,
                   stop_token_ids=(stop,), pad_id=0)
    tokens, valid = np.asarray(out["tokens"]), np.asarray(out["valid"])
    ref = hf_generate(tiny["hf"], prompts, 16, eos=stop)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)  # HF stops early when all rows are done
    for row in range(3):
        hits = np.flatnonzero(greedy[row] == stop)
        end = hits[0] + 1 if len(hits) else 16
        assert valid[row, :end].all() and not valid[row, end:].any()
        assert (tokens[row, end:] == 0).all()
        assert (np.asarray(out["logprobs"])[row, end:] == 0).all()


def hf_reference_logprobs(hf, batch, completions):
    """log-softmax of transformers' logits over prompt + completion, at the completion tokens, with
    the positions transformers' `get_rope_index` gives the whole sequence."""
    prompt_len = batch["input_ids"].shape[1]
    ids = np.concatenate([batch["input_ids"], completions], axis=1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(completions)], axis=1)
    pos = hf_rope_positions(hf, ids, mask, batch.get("image_grid_thw", np.zeros((0, 3))))
    kwargs = {}
    if "pixel_values" in batch:
        kwargs = {"pixel_values": torch.tensor(batch["pixel_values"]),
                  "image_grid_thw": torch.tensor(batch["image_grid_thw"])}
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                    position_ids=pos, **kwargs).logits.double()
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1], dim=-1).numpy()
    return np.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]


def test_score_matches_reference_log_softmax(tiny, prompts):
    completions = np.random.default_rng(3).integers(0, 500, (3, 7)).astype(np.int32)
    ref = hf_reference_logprobs(tiny["hf"], prompts, completions)
    ours = np.asarray(score(tiny["module"], tiny["params"], prompts, completions))
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    mask = np.ones_like(completions, bool)
    mask[1, 4:] = False
    masked = np.asarray(score(tiny["module"], tiny["params"], prompts, completions, completion_mask=mask))
    assert (masked[1, 4:] == 0).all() and np.allclose(masked[1, :4], ours[1, :4])
    # a completion token equal to the image token id is text, not an image slot
    odd = completions.copy()
    odd[:, 2] = IMAGE
    np.testing.assert_allclose(np.asarray(score(tiny["module"], tiny["params"], prompts, odd))[:, :2],
                               ours[:, :2], atol=1e-6)


def test_sampled_logprobs_are_consistent_with_score(tiny, prompts):
    module, params = tiny["module"], tiny["params"]
    out = generate(module, params, prompts, jax.random.PRNGKey(7), 10, temperature=0.7)
    tokens = np.asarray(out["tokens"])
    np.testing.assert_allclose(np.asarray(out["logprobs"]),
                               np.asarray(score(module, params, prompts, tokens)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["policy_logprobs"]),
                               np.asarray(score(module, params, prompts, tokens, temperature=0.7)), atol=2e-5)
    again = generate(module, params, prompts, jax.random.PRNGKey(7), 10, temperature=0.7)
    np.testing.assert_array_equal(np.asarray(again["tokens"]), tokens)  # a pure function of the rng
    other = generate(module, params, prompts, jax.random.PRNGKey(8), 10, temperature=0.7)
    assert not np.array_equal(np.asarray(other["tokens"]), tokens)
    greedy = np.asarray(generate(module, params, prompts, jax.random.PRNGKey(0), 10, greedy=True)["tokens"])
    top1 = generate(module, params, prompts, jax.random.PRNGKey(9), 10, temperature=1.3, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1["tokens"]), greedy)
    nucleus = generate(module, params, prompts, jax.random.PRNGKey(9), 10, temperature=1.3, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(nucleus["tokens"]), greedy)
    with pytest.raises(RigError, match="temperature"):
        generate(module, params, prompts, jax.random.PRNGKey(0), 4, temperature=0.0)


def test_filter_logits_against_numpy():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    for top_k, top_p in ((5, 1.0), (0, 0.6), (10, 0.3)):
        out = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
        for row, kept in zip(logits, out > np.finfo(np.float32).min, strict=True):
            # top-k first, then the nucleus of the renormalised survivors (transformers' order)
            order = np.argsort(-row)[:top_k or None]
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            keep = np.zeros(50, bool)
            keep[order[(np.cumsum(probs) - probs) < top_p]] = True
            np.testing.assert_array_equal(kept, keep)


def test_sharded_decoding_equals_single_device(tiny, devices):
    """Params sharded by DEFAULT_RULES and a batch of 4 sharded over data x fsdp on a (2, 2, 2) mesh."""
    g = (1, 4, 4)
    rows = [[5, 6, 7], image_tokens(g) + [8, 9], [10, 11, 12, 13, 14, 15, 16], [17] + image_tokens(g)]
    batch = make_batch(rows, [g, g], seed=4)
    module, params = tiny["module"], tiny["params"]
    single = generate(module, params, batch, jax.random.PRNGKey(3), 12, temperature=0.9)

    class MeshConfig:
        shape = (2, 2, 2)
    mesh = make_mesh(MeshConfig())
    shardings = param_shardings(qwen_vl_boxed_params(module), mesh, DEFAULT_RULES)
    sharded_params = jax.tree.map(jax.device_put, params, shardings)
    q_spec = shardings["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    assert tuple(q_spec) == ("fsdp", "tensor")
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    placed = dict(batch)
    for key in ("input_ids", "attention_mask", "rope_deltas"):
        placed[key] = jax.device_put(batch[key], batch_sharding)
    positions_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    placed["position_ids"] = jax.device_put(batch["position_ids"], positions_sharding)
    sharded = generate(module, sharded_params, placed, jax.random.PRNGKey(3), 12, temperature=0.9)
    assert len(sharded["tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded["tokens"]), np.asarray(single["tokens"]))
    np.testing.assert_allclose(np.asarray(sharded["logprobs"]), np.asarray(single["logprobs"]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded["valid"]), np.asarray(single["valid"]))


def test_bfloat16_decoding_and_score_gradients(tiny, prompts):
    """The default bf16 compute path: decode log-probs agree with bf16 scoring and stay near
    float32 ones; `score` is differentiable down to the vision tower (GRPO needs the grads)."""
    _, module16, _ = load_qwen_vl(tiny["folder"])
    assert module16.dtype == jnp.bfloat16
    out = generate(module16, tiny["params"], prompts, jax.random.PRNGKey(5), 6)
    tokens = out["tokens"]
    np.testing.assert_allclose(np.asarray(out["logprobs"]),
                               np.asarray(score(module16, tiny["params"], prompts, tokens)), atol=2e-2)
    np.testing.assert_allclose(np.asarray(out["logprobs"]),
                               np.asarray(score(tiny["module"], tiny["params"], prompts, tokens)), atol=5e-2)
    grads = jax.grad(lambda p: score(tiny["module"], p, prompts, tokens).sum())(tiny["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["visual"]["patch_embed"]["kernel"]).max()) > 0


def test_taken_log_probs_value_and_gradient_match_log_softmax():
    """`taken_log_probs`' hand-written VJP against autodiff of log_softmax + take_along_axis."""
    from rig_jax.vlm.decode import taken_log_probs
    r = np.random.default_rng(1)
    z = jnp.asarray(3 * r.standard_normal((3, 5, 50)), jnp.float32)
    tokens = jnp.asarray(r.integers(0, 50, (3, 5)), jnp.int32)
    weights = jnp.asarray(r.standard_normal((3, 5)), jnp.float32)
    plain = lambda a: jnp.take_along_axis(jax.nn.log_softmax(a, -1), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(taken_log_probs(z, tokens), plain(z), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda a: jnp.sum(weights * taken_log_probs(a, tokens)))(z)
    want = jax.grad(lambda a: jnp.sum(weights * plain(a)))(z)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
