"""experiments.analyze on a tiny NNX network trained by a plain optax loop and saved with Orbax,
as a researcher's own script would: every promised file and column, resume, a changed fork
refused, bad flags refused before compute."""

import json
import shutil

import numpy as np
import pytest

from tests.app_runner import ENV, ROOT, read_rows, run_app

FORK = '''
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, hidden: int = 4, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(1, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))
'''

TRAIN = '''
import sys
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from userfork_app.net import Net

x = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
y = np.sin(3 * x)
np.savez(sys.argv[2], x_train=x, y_train=y)
model = Net(hidden=4, rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

@nnx.jit
def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
    opt.update(model, grads)
    return loss

for _ in range(300):
    step(model, opt)
ckpt = ocp.StandardCheckpointer()
ckpt.save(sys.argv[1], nnx.state(model))
ckpt.wait_until_finished()
'''


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork")
    pkg = root / "userfork_app"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text(FORK)
    env = {**ENV, "PYTHONPATH": f"{ROOT}:{root}"}
    import subprocess
    import sys

    script = root / "train.py"
    script.write_text(TRAIN)
    subprocess.run([sys.executable, str(script), str(root / "ckpt"), str(root / "data.npz")],
                   check=True, env=env, capture_output=True, timeout=300)
    return root, env


def _args(root, out, *extra):
    return ("--model=userfork_app.net:Net", "--model_arg=hidden=4", f"--checkpoint={root / 'ckpt'}",
            f"--data_file={root / 'data.npz'}", f"--out_dir={out}", *extra)


def test_app_writes_every_file_and_column_and_resumes(fork, tmp_path):
    root, env = fork
    out = tmp_path / "run"
    toolbox = ("--curvature=ggn,residual", "--per_layer")
    proc = run_app("analyze", *_args(root, out, "--refine", *toolbox), env=env)
    assert "proven" in proc.stdout or "verdict" in proc.stdout
    assert "cast from float32" in proc.stdout
    from crit.analysis import REPORT_COLUMNS as CSV_COLUMNS, REPORT_OUTPUTS as OUTPUTS

    for name in (*OUTPUTS, "config.json", "density.png", "density.pdf", "sign_fractions.png",
                 "curvature.csv", "layers.csv", "curvature_density.png"):
        assert (out / name).is_file(), name
    # H = G + R at both points: traces and escape shares add up; the GGN is PSD
    from crit.decomposition import SUMMARY_COLUMNS

    curv = read_rows(out / "curvature.csv")
    assert set(SUMMARY_COLUMNS) <= set(curv[0])
    assert [(r["point"], r["curvature"]) for r in curv] == [
        (p, k) for p in ("given", "refined") for k in ("hessian", "ggn", "residual")]
    for point in ("given", "refined"):
        by = {r["curvature"]: r for r in curv if r["point"] == point}
        assert float(by["hessian"]["trace"]) == pytest.approx(
            float(by["ggn"]["trace"]) + float(by["residual"]["trace"]), abs=1e-10)
        assert by["ggn"]["negative_proven"] == "False"
    layers = read_rows(out / "layers.csv")
    hess_rows = [r for r in layers if r["point"] == "given" and r["curvature"] == "hessian"]
    assert sum(int(r["n_params"]) for r in hess_rows) == 13
    assert sum(float(r["trace"]) for r in hess_rows) == pytest.approx(
        float(curv[0]["trace"]), abs=1e-10)
    rows = read_rows(out / "analysis.csv")
    assert [r["point"] for r in rows] == ["given", "refined"]
    assert set(CSV_COLUMNS) <= set(rows[0])
    assert float(rows[1]["distance_moved"]) > 0
    assert float(rows[1]["grad_norm"]) <= float(rows[0]["grad_norm"])
    config = json.loads((out / "config.json").read_text())
    proto = config["protocol"]
    assert len(proto["checkpoint_sha256"]) == 64 and len(proto["model_source_sha256"]) == 64
    assert proto["model_kind"] == "nnx" and proto["cast_from"] == ["float32"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["points"]) == 2 and report["refinement"]["distance"] > 0
    assert report["points"][0]["n_params"] == 4 + 4 + 4 + 1
    with np.load(out / "spectrum.npz", allow_pickle=False) as z:
        assert z["given_eigenvalues"].shape == (13,)
        assert z["refined_escape_direction"].shape == (13,)
        assert z["given_grid_min_ratio"].shape[1] == 3
    # same configuration: the finished report is found, nothing recomputed
    again = run_app("analyze", *_args(root, out, "--refine", *toolbox), env=env)
    assert "finished run" in again.stdout

    # the fork's module edited: another run, refused in the same directory
    changed = root / "changed"
    shutil.copytree(root / "userfork_app", changed / "userfork_app")
    (changed / "userfork_app" / "net.py").write_text(FORK + "\n# edited\n")
    env2 = {**env, "PYTHONPATH": f"{ROOT}:{changed}"}
    shutil.copytree(root / "ckpt", changed / "ckpt")
    shutil.copy(root / "data.npz", changed / "data.npz")
    args = list(_args(root, out, "--refine", *toolbox))
    bad = run_app("analyze", *args, env=env2, check=False)
    assert bad.returncode != 0 and "model_source_sha256" in bad.stderr


def test_app_refuses_bad_input_before_compute(fork, tmp_path):
    root, env = fork
    out = tmp_path / "bad"
    proc = run_app("analyze", "--model=userfork_app.net:Net", f"--out_dir={out}", env=env,
                   check=False)
    assert proc.returncode != 0 and "--checkpoint is required" in proc.stderr
    # a checkpoint of another shape: one message naming the path and both shapes
    proc = run_app("analyze", *_args(root, out, "--model_arg=hidden=5")[1:], "--model="
                   "userfork_app.net:Net", env=env, check=False)
    assert proc.returncode != 0
    assert "hidden/kernel" in proc.stderr and "(1, 4)" in proc.stderr and "(1, 5)" in proc.stderr
    proc = run_app("analyze", *_args(root, out, "--method=dense", "--lanczos_steps=10"),
                   env=env, check=False)
    assert proc.returncode != 0 and "--lanczos_steps" in proc.stderr
    # a low-precision search means nothing for a dense Hessian (P = 13 under auto)
    proc = run_app("analyze", *_args(root, out, "--hvp_dtype=float32"), env=env, check=False)
    assert proc.returncode != 0 and "--hvp_dtype" in proc.stderr
    proc = run_app("analyze", *_args(root, out, "--matmul_precision=default"), env=env,
                   check=False)
    assert proc.returncode != 0 and "--matmul_precision" in proc.stderr
    assert not (out / "report.json").exists()
