"""Multi-host without a pod: 2 local processes x 4 CPU devices joined by jax.distributed."""
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import portpicker
import pytest

from tests.helpers import run_together
from tests.tiny_annotated import TinyAnnotatedMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multihost
def test_two_processes_match_single_process(tmp_path):
    port = portpicker.pick_unused_port()
    outs = [str(tmp_path / f"proc{i}.npz") for i in range(2)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run_together([[sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), str(i), "2", str(port),
                   outs[i]] for i in range(2)], env, ROOT, timeout=180)

    # single-process reference on one device
    model = TinyAnnotatedMLP()
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = np.random.default_rng(0).integers(0, model.vocab, 16)
    params = nn.meta.unbox(model.init(jax.random.key(0), x))["params"]
    tx = optax.adamw(1e-2)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    ref_params = optax.apply_updates(params, updates)
    ref_out = model.apply({"params": params}, x)

    for path in outs:
        got = np.load(path)
        assert got["decided"].tolist() == [True, False]   # process 0's flags, on every host
        np.testing.assert_allclose(got["out"], np.asarray(ref_out), atol=1e-6, rtol=0)
        assert abs(float(got["loss"]) - float(loss)) <= 1e-6
        for kp, v in jax.tree_util.tree_flatten_with_path(ref_params)[0]:
            np.testing.assert_allclose(got["/".join(k.key for k in kp)], np.asarray(v), atol=1e-6, rtol=0)
