"""min_ratio and spectrum with the registry's CNN, ResNet (BatchNorm) and Transformer, a fork's
own module through --model=module:factory, and --data_file: tiny CLI runs that check the files
they write; bad model/data flags are refused before any compute."""

import json
import textwrap

import numpy as np
import pytest

from tests.app_runner import ENV, read_rows, run_app

MODELS = {
    "cnn": ["--model_arg=channels=(2,)", "--model_arg=hidden=()", "--model_arg=kernel=3"],
    "resnet": ["--model_arg=depth=8", "--model_arg=width=1"],
    "transformer": ["--model_arg=dim=4", "--model_arg=depth=1", "--model_arg=heads=2",
                    "--model_arg=mlp_dim=4"],
}
DATA = ["--dataset=digits_images", "--n_points=10", "--train_steps=3", "--log_every=1",
        "--batch_size=4", "--eval_batch_size=4"]
KRYLOV = ["--lanczos_steps=6", "--slq_probes=1"]


def n_params(model):
    from crit.problems import model_problem
    from experiments.model_flags import parse_model_args

    from crit.data import DATASETS

    data = DATASETS["digits_images"](n_points=10)
    return model_problem(model, data, **parse_model_args([a.split("=", 1)[1]
                                                          for a in MODELS[model]])).n_params


@pytest.mark.parametrize("model", sorted(MODELS))
def test_min_ratio_lanczos_with_each_model(model, tmp_path):
    out = tmp_path / model
    proc = run_app("min_ratio", f"--model={model}", *MODELS[model], *DATA, *KRYLOV,
                   "--hessian=lanczos", "--num_inits=2", "--finder=gradnorm",
                   "--finder_steps=2", "--progress=false", f"--out_dir={out}")
    p = n_params(model)
    assert f"P = {p} parameters" in proc.stdout
    rows = read_rows(out / "results.csv")
    assert len(rows) == 2 and {int(r["n_params"]) for r in rows} == {p}
    for r in rows:
        assert float(r["min_ratio_lo"]) <= float(r["min_ratio_est"]) <= float(r["min_ratio_hi"])
        assert np.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0
    config = json.loads((out / "config.json").read_text())["protocol"]
    assert config["model"] == model and config["eval_batch_size"] == 4
    assert config["batch_size"] == 4
    assert config["batchnorm"] == ("eval" if model == "resnet" else "none")
    with np.load(out / "curves.npz", allow_pickle=False) as c:
        assert c["train_loss"].shape == (2, 4)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_spectrum_with_each_model(model, tmp_path):
    out = tmp_path / model
    proc = run_app("spectrum", f"--model={model}", *MODELS[model], *DATA, *KRYLOV,
                   "--num_eigs=2", "--snapshots=0,end", "--compare_dense=false",
                   f"--out_dir={out}")
    assert f"P = {n_params(model)} parameters" in proc.stdout
    if model == "resnet":
        assert "BatchNorm eval mode" in proc.stdout
    rows = read_rows(out / "spectrum.csv")
    assert [int(r["step"]) for r in rows] == [0, 3]
    assert all(float(r["min_ratio_lo"]) <= float(r["min_ratio_est"]) <= float(r["min_ratio_hi"])
               for r in rows)
    config = json.loads((out / "config.json").read_text())["protocol"]
    assert config["model"] == model and config["batchnorm"] == (
        "eval" if model == "resnet" else "none")


def test_a_forks_module_end_to_end(tmp_path):
    (tmp_path / "fork_net.py").write_text(textwrap.dedent('''
        import flax.linen as nn
        import jax.numpy as jnp

        def make(n_outputs, hidden=3):
            class Net(nn.Module):
                @nn.compact
                def __call__(self, x):
                    h = jnp.tanh(nn.Dense(hidden, param_dtype=jnp.float64)(x))
                    return nn.Dense(n_outputs, param_dtype=jnp.float64)(h)
            return Net()
    '''))
    env = dict(ENV, PYTHONPATH=f"{ENV['PYTHONPATH']}:{tmp_path}")
    out = tmp_path / "run"
    proc = run_app("min_ratio", "--model=fork_net:make", "--model_arg=hidden=2",
                   "--dataset=iris", "--n_points=20", "--train_steps=20", "--finder_steps=3",
                   "--num_inits=2", "--progress=false", f"--out_dir={out}", env=env)
    assert "P = 19 parameters" in proc.stdout  # 4·2 + 2 + 2·3 + 3
    with np.load(out / "spectra.npz", allow_pickle=False) as s:
        assert s["eigenvalues"].shape == (2, 19)


def test_data_file_end_to_end_and_refused_before_compute(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3))
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=np.sin(x).sum(1))
    out = tmp_path / "run"
    proc = run_app("min_ratio", f"--data_file={tmp_path / 'mine.npz'}", "--widths=3",
                   "--train_steps=10", "--finder_steps=2", "--num_inits=1", "--progress=false",
                   f"--out_dir={out}")
    assert "P = 16 parameters, n = 12 points" in proc.stdout
    config = json.loads((out / "config.json").read_text())["protocol"]
    assert config["data_file"].endswith("mine.npz") and len(config["data_sha256"]) == 64
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.arange(11))
    bad = tmp_path / "never"
    proc = run_app("min_ratio", f"--data_file={tmp_path / 'bad.npz'}", f"--out_dir={bad}",
                   check=False)
    assert proc.returncode != 0 and "key 'x_train' has 12 rows but 'y_train' has 11" in proc.stderr
    assert not bad.exists()


@pytest.mark.parametrize("args, needle", [
    (["--model=lenet"], "known: cnn, mlp, resnet, transformer"),
    (["--model=resnet", "--dataset=digits"], "resnet needs images"),
    (["--model=resnet", "--dataset=digits_images", "--widths=4"], "--widths shape(s) --model=mlp"),
    (["--model=resnet", "--dataset=digits_images", "--model_arg=depht=8"], "does not take"),
    (["--model=cnn", "--dataset=digits_images", "--model_arg=oops"], "expected key=value"),
    (["--eval_batch_size=-1"], "--eval_batch_size"),
])
def test_bad_model_flags_are_refused_before_compute(args, needle, tmp_path):
    out = tmp_path / "never"
    proc = run_app("min_ratio", *args, f"--out_dir={out}", check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_apps_that_build_their_own_mlps_refuse_model_flags(tmp_path):
    proc = run_app("index_vs_error", "--model=cnn", f"--out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode != 0 and "model" in proc.stderr
    assert not (tmp_path / "x").exists()


CNN = ["--model=cnn", "--dataset=digits_images", "--model_arg=channels=(2,)",
       "--model_arg=hidden=()", "--model_arg=kernel=3"]
LANDSCAPE = {
    "training_curves": (["--n_points=16", "--num_runs=2", "--train_steps=5", "--log_every=1",
                         "--finder_steps=2"], "runs.csv"),
    "surface_2d": (["--n_points=16", "--train_steps=5", "--record_every=5", "--finder_steps=2",
                    "--grid=3"], "surface.npz"),
    "sharpness": (["--n_points=64", "--batch_sizes=32,8", "--epochs=1", "--num_runs=1",
                   "--sharpness_samples=2", "--ascent_steps=2"], "sharpness.csv"),
    "interpolation": (["--n_points=200", "--epochs=1", "--small_batch=16", "--large_batch=64",
                       "--num_runs=2", "--num_alphas=5", "--zoom_points=3",
                       "--record_every=4"], "lines.csv"),
}


@pytest.mark.parametrize("app", sorted(LANDSCAPE))
def test_landscape_apps_take_a_cnn(app, tmp_path):
    args, data_file = LANDSCAPE[app]
    out = tmp_path / app
    run_app(app, *CNN, *args, f"--out_dir={out}")
    assert (out / data_file).stat().st_size > 0
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["model"] == "cnn"
    assert protocol["model_arg"] == [a.split("=", 1)[1] for a in CNN[2:]]


def test_surface_2d_trains_batchnorm_state(tmp_path):
    out = tmp_path / "s2d"
    run_app("surface_2d", "--model=resnet", "--dataset=digits_images", "--model_arg=depth=8",
            "--model_arg=width=1", "--n_points=10", "--train_steps=4", "--record_every=2",
            "--finder_steps=2", "--grid=3", f"--out_dir={out}")
    with np.load(out / "surface.npz", allow_pickle=False) as s:
        assert all(np.all(np.isfinite(s[k])) for k in s.files if s[k].dtype.kind == "f")
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["model"] == "resnet" and protocol["batchnorm"] == "eval"


def test_training_curves_trains_batchnorm_state(tmp_path):
    out = tmp_path / "tc"
    proc = run_app("training_curves", "--model=resnet", "--dataset=digits_images",
                   "--model_arg=depth=8", "--model_arg=width=1", "--n_points=10",
                   "--num_runs=2", "--train_steps=3", "--log_every=1", "--finder_steps=2",
                   f"--out_dir={out}")
    rows = read_rows(out / "runs.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["final_loss"])) for r in rows)
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["model"] == "resnet" and protocol["batchnorm"] == "eval"
    with np.load(out / "curves.npz", allow_pickle=False) as c:
        # the logged full-data loss moves with training (state and weights both change)
        assert c["train_loss"].shape[1] == 4 and np.all(np.isfinite(c["train_loss"]))
    del proc


def test_sharpness_trains_batchnorm_state(tmp_path):
    out = tmp_path / "sharp"
    run_app("sharpness", "--model=resnet", "--dataset=digits_images", "--model_arg=depth=8",
            "--model_arg=width=1", "--n_points=8", "--batch_sizes=4,8", "--epochs=2",
            "--num_runs=2", "--sharpness_samples=1", "--ascent_steps=1", f"--out_dir={out}")
    rows = read_rows(out / "sharpness.csv")
    assert [int(r["batch_size"]) for r in rows] == [4, 4, 8, 8]
    for key in ("train_loss", "test_loss", "sharpness", "sensitivity", "lambda_max"):
        assert all(np.isfinite(float(r[key])) for r in rows), key
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["model"] == "resnet" and protocol["batchnorm"] == "eval"
    with np.load(out / "sharpness.npz", allow_pickle=False) as z:
        # dense (P = 399 <= --dense_max_params): λ_max is the top of the stored spectrum
        np.testing.assert_array_equal(z["lambda_max"], z["eigenvalues"][:, -1])


def test_interpolation_moves_batchnorm_state_along_the_lines(tmp_path):
    out = tmp_path / "interp"
    run_app("interpolation", "--model=resnet", "--dataset=digits_images", "--model_arg=depth=8",
            "--model_arg=width=1", "--n_points=16", "--epochs=1", "--small_batch=4",
            "--large_batch=8", "--num_runs=2", "--alpha_range=0,1", "--num_alphas=3",
            "--zoom_points=2", "--record_every=3", f"--out_dir={out}")
    with np.load(out / "lines.npz", allow_pickle=False) as d:
        loss, kind = d["train_loss"], list(d["kind"])
    with np.load(out / "projection.npz", allow_pickle=False) as p:
        np.testing.assert_array_equal(p["step"], [0, 3, 4])  # 4 steps, logged every 3 + the end
        snap_loss = p["train_loss"]
    models = read_rows(out / "models.csv")
    for j in range(2):  # init j -> solution j: α = 0 is (θ0, s0), α = 1 the trained (θ*, s*)
        assert kind[j] == "init_to_solution"
        np.testing.assert_allclose(loss[j, 0], snap_loss[j, 0], rtol=1e-12)
        np.testing.assert_allclose(loss[j, -1], snap_loss[j, -1], rtol=1e-12)
        np.testing.assert_allclose(loss[j, -1], float(models[j]["train_loss"]), rtol=1e-12)
    assert json.loads((out / "config.json").read_text())["protocol"]["batchnorm"] == "eval"


def test_apps_that_do_not_train_batchnorm_state_refuse_such_models(tmp_path):
    out = tmp_path / "never"
    proc = run_app("edge_of_stability", "--model=resnet", "--dataset=digits_images",
                   "--model_arg=depth=8", f"--out_dir={out}", check=False)
    assert proc.returncode != 0 and "does not train them yet" in proc.stderr
    assert not out.exists()
