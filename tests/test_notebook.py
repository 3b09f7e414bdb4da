"""notebooks/shapes_demo.ipynb as `jupyter nbconvert --to notebook --execute` runs it, with its demo
command (RIG_DEMO_COMMAND) replaced by a one-liner that writes a small fake workdir through
`write_demo_outputs` (tests/test_demo_report.write_fake_workdir): what is tested is the cells
(find the repository, run the command, read metrics.json, show the plots and the report), in
seconds, not the training. Skipped where Jupyter is not installed."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "shapes_demo.ipynb")
JUPYTER = ("nbformat", "nbclient", "nbconvert", "ipykernel", "jupyter_core")
MISSING = [m for m in JUPYTER if importlib.util.find_spec(m) is None]


def _notebook(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_notebook_is_clean_and_runs_the_real_demo_by_default():
    nb = _notebook(NOTEBOOK)
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)   # stored without outputs
    setup = _source(code[0])
    assert 'ON_COLAB = "google.colab" in sys.modules' in setup and "    !pip install -q -e ." in setup
    assert "REPO_URL = " in setup and '"git", "clone"' in setup
    everything = "\n".join(_source(c) for c in code)
    assert 'CONFIG = "configs/shapes.py:tiny"' in everything
    assert "-m rig_jax.tools.shapes_demo --config={CONFIG} " in everything
    assert 'os.environ.get("RIG_DEMO_COMMAND", DEFAULT_COMMAND)' in everything
    from configs import shapes

    assert "tiny" in shapes.VARIANTS           # the default command's config exists


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join("".join(data.get(kind, "")) for kind in ("text/plain", "text/html"))


@pytest.mark.skipif(bool(MISSING), reason=f"jupyter nbconvert is not installed (missing: "
                    f"{', '.join(MISSING)}); needs nbformat, nbclient, nbconvert, ipykernel")
def test_notebook_executes_with_a_fake_demo(tmp_path):
    workdir = tmp_path / "work"
    script = ("import os; from tests.test_demo_report import write_fake_workdir; "
              "out = os.environ['RIG_DEMO_WORKDIR']; write_fake_workdir(out); print('fake demo wrote', out)")
    env = {**os.environ, "RIG_DEMO_COMMAND": f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}",
           "RIG_DEMO_WORKDIR": str(workdir)}
    done = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                           NOTEBOOK, "--output-dir", str(tmp_path), "--output", "executed.ipynb",
                           "--ExecutePreprocessor.timeout=600"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = _outputs(_notebook(str(tmp_path / "executed.ipynb")))
    text = "".join(_text(o) + ("" if o["output_type"] == "stream" else "\n") for o in outputs)  # chunks
    assert f"repository: {ROOT}" in text                       # found the checkout: no clone
    assert f"fake demo wrote {workdir}" in text and "finished in" in text

    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)
    for name, m in metrics["systems"].items():                  # the table: one row per system
        assert m["label"] in text and name in text
    for title in ("SG-IoU attr", "Entity-IoU attr", "Relation-IoU attr", "U-Net calls", "s / image"):
        assert title in text
    assert f"SG-IoU gain, (d) minus (a): {metrics['gain_sg_iou_d_minus_a']:+.3f}" in text

    images = [base64.b64decode("".join(o["data"]["image/png"])) for o in outputs
              if "image/png" in o.get("data", {})]
    files = sorted(os.listdir(workdir / "plots"))
    assert files == ["stage1.png", "stage2.png", "systems.png"]
    assert images == [(workdir / "plots" / name).read_bytes() for name in files]

    html = [_text(o) for o in outputs if "text/html" in o.get("data", {}) and "rig-report" in _text(o)]
    assert len(html) == 1
    report = (workdir / "report.html").read_text(encoding="utf-8")
    assert html[0].count('class="round"') == report.count('class="round"') > 0
    assert "<h2>Systems</h2>" not in html[0]                     # only the prompts part of the page
