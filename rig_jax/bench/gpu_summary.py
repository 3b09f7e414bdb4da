"""The GPU lines of issue 12 from one tools/gpu_bench.sh run's JSON lines.

    python -m rig_jax.bench.gpu_summary OUT_FOLDER

Reads OUT/sampler.jsonl and OUT/decode.jsonl (rig-benchmark with --peer) and
OUT/peer_baseline.jsonl (the peers' script, for torch.compile, which rig-benchmark does not
run) and prints:

    sampler vs diffusers eager: N.NNx   rig-benchmark's interleaved ratio at its largest batch
    sampler vs torch.compile: N.NNx     rig_jax images/s at batch 8 over the compiled peer's at
                                        batch 8 (its U-Net loop alone: batch / s_sampling; the
                                        peer's VAE decode is left out, rig-benchmark has none)
    decode vs transformers: N.NNx       rig-benchmark's interleaved ratio (greedy, same weights)

plus the figures each comes from; a missing input prints `not measured` with the reason."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def read_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when it is missing); other lines are skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def summary(folder: str) -> list[str]:
    """The three ratio lines and their sources."""
    sampler = [r for r in read_lines(os.path.join(folder, "sampler.jsonl")) if r.get("bench") == "sampler"]
    decode = [r for r in read_lines(os.path.join(folder, "decode.jsonl")) if r.get("bench") == "decode"]
    peers = read_lines(os.path.join(folder, "peer_baseline.jsonl"))
    lines = []
    with_peer = [r for r in sampler if "ratio" in r]
    if with_peer:
        big = max(with_peer, key=lambda r: r["batch"])
        lines.append(f"sampler vs diffusers eager: {big['ratio']:.2f}x")
        lines.append(f"  (batch {big['batch']}: rig_jax {big['rig_jax']['images_per_s']} img/s "
                     f"{big['dtype']}, diffusers {big['torch']['images_per_s']} img/s, "
                     f"parity {big['parity']})")
    else:
        lines.append("sampler vs diffusers eager: not measured (no sampler line with --peer)")
    compiled = [p for p in peers if p.get("event") == "ddim" and p.get("label") == "diffusers-compile-fp16"
                and p.get("batch") == 8]
    ours = [r for r in sampler if r["batch"] == 8]
    if compiled and ours:
        peer_ips = 8 / compiled[0]["s_sampling"]
        ratio = ours[0]["rig_jax"]["images_per_s"] / peer_ips
        lines.append(f"sampler vs torch.compile: {ratio:.2f}x")
        lines.append(f"  (batch 8: rig_jax {ours[0]['rig_jax']['images_per_s']} img/s, torch.compile "
                     f"{peer_ips:.3f} img/s from peer_baseline.py's s_sampling)")
    else:
        lines.append("sampler vs torch.compile: not measured (needs peer_baseline.py's compiled batch-8 line "
                     "and a rig_jax batch-8 sampler line)")
    with_peer = [r for r in decode if "ratio" in r]
    if with_peer:
        r = with_peer[0]
        lines.append(f"decode vs transformers: {r['ratio']:.2f}x")
        lines.append(f"  (batch {r['batch']}: rig_jax {r['rig_jax']['tokens_per_s']} tok/s, transformers "
                     f"{r['torch']['tokens_per_s']} tok/s, parity {r['parity']})")
    else:
        lines.append("decode vs transformers: not measured (no decode line with --peer)")
    sampled = [p for p in peers if p.get("event") == "lm_decode"]
    if sampled:
        lines.append(f"  peer_baseline.py transformers generate (sampling): {sampled[0]['tok_per_s']} tok/s")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: python -m rig_jax.bench.gpu_summary OUT_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    print("\n".join(summary(args[0])))


if __name__ == "__main__":
    main()
