"""How much the edit prompt's words move the Editor: stage 1's signal, measured directly.

On training-distribution ShapesSG prompts (scenes of `(config.seed, index)`, as stage 1 draws
them; never the held-out eval seed) the committed Diffuser draws I_0; for every image the pixel Checker finds
wrong, the Editor of `configs/shapes.py:demo`'s stage 1 (or other strength / guidance / eta) edits
it once per edit-prompt form of the Actor (rig_jax.data.edit_forms.ACTOR_FORMS) and once with the
empty prompt, all from ONE inversion, as a stage-1 group does. Printed per form: images whose
relations all hold after the edit and the mean Checker score; then how many images at least one
form fixes, and in how many the forms disagree at all (a group with no spread is a GRPO group
with zero std, whatever the Actor samples). At eta > 0 each form's re-denoising draws its own
noise as well, so differences there mix the words with the noise.

    python tools/edit_forms_probe.py --prompts 64                  # stage 1's Editor (eta 0)
    python tools/edit_forms_probe.py --prompts 64 --eta 1          # stage 2's policy noise
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from rig_jax.config import split_argv

FIRST_INDEX = 5_000      # scene indices from here (any index is a training scene; this run's are fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="training-seed prompts drawn")
    parser.add_argument("--eta", type=float, default=0.0, help="the edit's DDIM eta (stage 1: 0)")
    parser.add_argument("--guidance", type=float, default=None, help="edit guidance (default: the config's)")
    parser.add_argument("--strength", type=float, default=None, help="edit strength (default: the config's)")
    parser.add_argument("--batch", type=int, default=8, help="images edited per call")
    parser.epilog = ("Config: --config=FILE.py:VARIANT (default configs/shapes.py:demo) and "
                     "--config.a.b=VALUE overrides (another Diffuser or world, say).")
    spec, overrides, rest = split_argv(sys.argv[1:])
    args = parser.parse_args(rest)

    import jax
    import numpy as np

    from rig_jax.config import apply_overrides, load_config_file
    from rig_jax.data.edit_forms import ACTOR_FORMS, edit_text, graph_triplets
    from rig_jax.parallel import mesh_context
    from rig_jax.rl.environment import build_environment
    from rig_jax.rl.rollout import generate_images, group_edit
    from rig_jax.tools.train import stage_config

    spec = spec or "configs/shapes.py:demo"
    config = load_config_file(spec)
    apply_overrides(config, overrides, spec)
    config.workdir = "/nonexistent/edit_forms_probe"    # stage_config needs one; nothing is written
    stage1 = stage_config(config, "grpo_actor", {})
    forms = [*ACTOR_FORMS, "empty"]
    with mesh_context(stage1) as (mesh, rules):
        env = build_environment(stage1, mesh, rules)
        sampler = dataclasses.replace(env.edit.sampler, eta=args.eta,
                                      guidance_scale=args.guidance or env.edit.sampler.guidance_scale)
        edit = dataclasses.replace(env.edit, sampler=sampler, strength=args.strength or env.edit.strength)
        start = time.perf_counter()
        graphs = env.prompts.graphs({"index": np.arange(args.prompts) + FIRST_INDEX})
        images = generate_images(env.pipe, env.diffuser_params, graphs, env.sampler, jax.random.PRNGKey(123),
                                 mesh, rules)
        drawn = env.checker.check(images, graphs)
        wrong = [i for i, c in enumerate(drawn) if c.score < 1]
        before = float(np.mean([drawn[i].score for i in wrong]))
        wrong_graphs = [graphs[i] for i in wrong]
        texts = [edit_text(f, graph_triplets(g), g.prompt()) if f != "empty" else ""
                 for g in wrong_graphs for f in forms]
        edited = []
        for s in range(0, len(wrong), args.batch):
            rows = wrong[s:s + args.batch]
            chunk = texts[s * len(forms):(s + len(rows)) * len(forms)]
            edited.append(group_edit(env.pipe, env.editor_params, images[rows], wrong_graphs[s:s + len(rows)],
                                     chunk, edit, len(forms), mesh, rules,
                                     rng=jax.random.PRNGKey(s) if args.eta else None)["images"])
        after = env.checker.check(np.concatenate(edited), [g for g in wrong_graphs for _ in forms])
        scores = np.array([c.score for c in after]).reshape(len(wrong), len(forms))
    print(f"{args.prompts} training-seed prompts (indices {FIRST_INDEX}-{FIRST_INDEX + args.prompts - 1}), "
          f"{len(wrong)} drawn wrong; edit strength {edit.strength}, eta {sampler.eta}, guidance "
          f"{sampler.guidance_scale}, {sampler.num_steps} steps; {time.perf_counter() - start:.0f} s; "
          f"their mean S before the edit {before:.3f}")
    print("| form | fixed | mean S after |\n| --- | ---: | ---: |")
    for j, form in enumerate(forms):
        print(f"| {form} | {int((scores[:, j] == 1).sum())} / {len(wrong)} | {scores[:, j].mean():.3f} |")
    print(f"fixed by at least one form: {int((scores.max(1) == 1).sum())} / {len(wrong)}; "
          f"images where the forms' scores differ: {int((scores.std(1) > 0).sum())} / {len(wrong)}")


if __name__ == "__main__":
    from rig_jax.errors import RigError

    try:
        main()
    except RigError as e:                # a bad flag or field: one line, as the package's tools
        sys.exit(f"error: {e}")
