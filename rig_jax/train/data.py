"""Endless host-local batches from examples drawn by index, the same global batch on any
number of hosts.

Indices are shuffled globally (grain, by seed) and cut into global batches of `batch_size`;
host h of n takes rows [h * batch_size / n, (h + 1) * batch_size / n) of each, the rows its
devices hold in the global array (`shard_batch`). An example depends only on its index, so
the grain iterator's position is all a checkpoint needs to resume exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import grain
import jax
import numpy as np

from rig_jax.errors import ConfigError


def host_global_batches(seed: int, batch_size: int,
                        example: Callable[[int], dict[str, np.ndarray]]) -> grain.IterDataset:
    hosts, host = jax.process_count(), jax.process_index()
    per_host = batch_size // hosts
    if per_host * hosts != batch_size:
        raise ConfigError(f"train.batch_size: {batch_size} is not divisible by {hosts} hosts")

    def host_rows(indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [example(int(i)) for i in indices[host * per_host:(host + 1) * per_host]]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    dataset = grain.MapDataset.range(2 ** 31 - 1).shuffle(seed=seed).batch(batch_size, drop_remainder=True)
    return dataset.map(host_rows).to_iter_dataset()
