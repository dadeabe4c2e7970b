"""One model over many devices (crit.data_parallel): the same loss, HVPs, Lanczos ends and SLQ
fractions on 1, 2 and 4 forced host devices with N not divisible by the count; the apps on the
data axis (2 forced devices, and 2 processes under jax.distributed); the automatic axis."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crit.data_parallel import choose_shard_axis, data_layout
from tests.app_runner import ENV, ROOT, read_rows, run_app, run_processes
from tests.test_parallel import free_port

TWO_DEVICES = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
N = 27  # 27 rows in batches of 4: not divisible by 2 or 4, and a short last batch


@pytest.mark.parametrize("n,devices,batch,whole", [(27, 4, 4, False), (27, 2, 0, False),
                                                   (5, 4, 2, False), (27, 4, 4, True),
                                                   (27, 2, 0, True), (8, 4, 2, True)])
def test_layout_deals_every_row_once_with_weight_one_over_n(n, devices, batch, whole):
    lay = data_layout(n, devices, batch, whole_batches=whole)
    real = lay.weights > 0
    counted = np.concatenate([lay.rows[real], lay.tail])
    np.testing.assert_array_equal(np.sort(counted), np.arange(n))
    np.testing.assert_allclose(lay.weights[real], 1.0 / n)
    assert lay.rows.size == devices * lay.local_batches * lay.batch_rows
    if whole:  # BatchNorm batch mode: the one-device problem's batches, whole and in order
        b = batch if 0 < batch < n else n
        batches = lay.rows.reshape(-1, b)[lay.weights.reshape(-1, b)[:, 0] > 0]
        np.testing.assert_array_equal(batches.ravel(), np.arange(n // b * b))
        assert lay.tail.size == n % b


def test_the_automatic_axis_is_data_for_one_large_model_and_inits_for_many_small_ones():
    assert choose_shard_axis("auto", 8, 1, 10**6, 50000)[0] == "data"        # spectrum app
    assert choose_shard_axis("auto", 8, 4, 1000, 256)[0] == "data"          # fewer inits
    assert choose_shard_axis("auto", 8, 100, 10**5, 10**4)[0] == "data"     # P·N = 1e9
    assert choose_shard_axis("auto", 8, 1000, 321, 256)[0] == "inits"       # the homework
    assert choose_shard_axis("auto", 1, 1, 10**6, 10**5)[0] == "inits"      # one device
    assert choose_shard_axis("data", 8, 1000, 321, 256)[0] == "data"
    with pytest.raises(ValueError, match="shard axis"):
        choose_shard_axis("batch", 8, 1, 1, 1)


def agreement() -> None:
    """Run under 4 forced host devices: print, per problem and device count, the largest
    relative difference from the unsharded problem of each analysed quantity."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from crit.data import digits_dataset
    from crit.data_parallel import data_mesh, shard_data
    from crit.hessian import hvp_operator
    from crit.krylov import krylov_spectrum
    from crit.problems import make_problem, mlp_problem
    from crit.train import cast_params

    class NormNet(nn.Module):  # BatchNorm in batch mode: each batch its own statistics
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(4, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))
            x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
            return nn.Dense(10, param_dtype=jnp.float64)(jnp.tanh(x))

    problems = {
        "mlp_l2": mlp_problem("sinc", widths=(6,), n_points=N, eval_batch_size=4, l2=1e-3),
        "batchnorm_batch": make_problem(NormNet(), digits_dataset(n_points=N), "xent",
                                        batchnorm="batch", eval_batch_size=4),
    }
    out = {}
    for name, problem in problems.items():
        params = cast_params(problem.init_fn(jax.random.PRNGKey(1)), jnp.float64)
        state = (cast_params(problem.init_state_fn(jax.random.PRNGKey(1)), jnp.float64)
                 if problem.has_state else None)
        theta, unravel = ravel_pytree(params)
        v = jax.random.normal(jax.random.PRNGKey(2), theta.shape)

        def analyse(pr):
            @jax.jit
            def run(theta, v):
                grad, matvec = hvp_operator(pr.bind_state(state), unravel(theta))
                spec = krylov_spectrum(matvec, jax.random.PRNGKey(3), theta.size, num_steps=10,
                                       num_probes=2, k=2, tol=1e-3)
                return dict(loss=pr.loss_fn(unravel(theta), state), grad=grad, hvp=matvec(v),
                            lanczos_min=spec.smallest, lanczos_max=spec.largest,
                            min_ratio=spec.min_ratio, index=spec.index,
                            null_fraction=spec.null_fraction)
            return jax.tree.map(np.asarray, run(theta, v))

        ref = analyse(problem)
        for d in (1, 2, 4):
            got = analyse(shard_data(problem, data_mesh(jax.devices()[:d])))
            out[f"{name}/{d}"] = {k: float(np.max(np.abs(got[k] - ref[k]))
                                             / max(np.max(np.abs(ref[k])), 1e-300))
                                  for k in ref}
    print(json.dumps(out))


def test_one_two_and_four_devices_give_the_same_hvps_lanczos_ends_and_slq_fractions():
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_data_parallel import "
                           "agreement; agreement()"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(errors) == [f"{n}/{d}" for n in ("batchnorm_batch", "mlp_l2") for d in (1, 2, 4)]
    for case, errs in errors.items():
        for quantity, err in errs.items():
            assert err <= 1e-12, (case, quantity, err)


def test_spectrum_on_two_devices_shards_the_data(tmp_path):
    """One init on two devices: the automatic axis is data, and the loss and λ_max at
    initialization are those of the unsharded problem computed here."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from crit.hessian import dense_hessian
    from crit.problems import mlp_problem
    from crit.protocol import init_key
    from crit.train import cast_params

    out = tmp_path / "spectrum"
    proc = run_app("spectrum", "--widths=4", f"--n_points={N}", "--eval_batch_size=4",
                   "--train_steps=10", "--lanczos_steps=12", "--slq_probes=2", "--num_eigs=2",
                   "--snapshots=0,end", "--eig_tol=1e-2", "--compare_dense=false",
                   f"--out_dir={out}", env=TWO_DEVICES)
    assert ("shard axis: data (1 init(s) < 2 devices) over 2 device(s), 4 local batch(es) of "
            "4 rows per device") in proc.stdout
    row = read_rows(out / "spectrum.csv")[0]
    problem = mlp_problem("digits", widths=(4,), n_points=N)
    params = cast_params(problem.init_fn(init_key(0, 0)), jnp.float64)  # crit enables x64
    loss = float(problem.loss_fn(params))
    top = float(np.linalg.eigvalsh(np.asarray(dense_hessian(problem.loss_fn, params)))[-1])
    assert float(row["loss"]) == pytest.approx(loss, rel=1e-12)
    assert float(row["lambda_max"]) == pytest.approx(top, rel=1e-8)
    assert ravel_pytree(params)[0].size == 4 * 64 + 4 + 4 * 10 + 10


MIN_RATIO = ["--widths=3", "--n_points=15", "--eval_batch_size=4", "--train_steps=60",
             "--log_every=20", "--finder_steps=4", "--progress=false", "--vmap_width=2",
             "--num_inits=2", "--hessian=lanczos", "--lanczos_steps=8", "--slq_probes=2",
             "--minres_iters=5", "--shard_axis=data"]


@pytest.fixture(scope="module")
def min_ratio_two_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "two_devices"
    proc = run_app("min_ratio", *MIN_RATIO, f"--out_dir={out}", env=TWO_DEVICES)
    return out, proc.stdout


def test_min_ratio_lanczos_on_two_devices_shards_the_data(min_ratio_two_devices):
    out, text = min_ratio_two_devices
    assert "shard axis: data (as requested) over 2 device(s)" in text
    assert "2 inits in 1 chunks of 2 over 2 device(s) (data axis)" in text
    rows = read_rows(out / "results.csv")
    assert [r["init_id"] for r in rows] == ["0", "1"]
    assert all(r["verdict"] and float(r["lambda_max"]) > 0 for r in rows)
    assert json.loads((out / "config.json").read_text())["shard_axis"] == "data"


def test_two_processes_on_the_data_axis_match_one_process_and_write_once(
        min_ratio_two_devices, tmp_path):
    """2 processes × 1 device each against 1 process × 2 devices: the same mesh size, so the
    same sums; every process runs every init and only process 0 writes."""
    one, _ = min_ratio_two_devices
    out = tmp_path / "two_processes"
    texts = [p.stdout for p in run_processes(
        "min_ratio", [*MIN_RATIO, f"--out_dir={out}", "--assemble_timeout=240",
                      "--startup_timeout=120"], port=free_port())]
    for i, text in enumerate(texts):
        assert f"process {i}/2: 2 inits in 1 chunks of 2 over 2 device(s) (data axis)" in text
    assert "leaves the chunk files to process 0" in texts[1]
    assert "leaves the chunk files" not in texts[0]
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk_0000000_000002.npz"]
    a, b = read_rows(one / "results.csv"), read_rows(out / "results.csv")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for col in x:
            try:
                assert float(y[col]) == pytest.approx(float(x[col]), rel=1e-12, abs=1e-300,
                                                      nan_ok=True), col
            except ValueError:
                assert y[col] == x[col], col
    assert os.path.exists(out / "min_ratio.png")


def test_the_memory_plan_follows_the_local_batch_and_names_the_flags_that_help():
    from crit.data_parallel import check_memory, device_memory_bytes
    from crit.problems import mlp_problem

    small = mlp_problem("sinc", widths=(8,), n_points=1000, eval_batch_size=10)
    large = mlp_problem("sinc", widths=(8,), n_points=1000, eval_batch_size=500)
    per_example = 100
    a, b = (device_memory_bytes(p, 2, 30, per_example) for p in (small, large))
    assert b - a == 4 * per_example * (500 - 10) * 8          # activations of one local batch
    assert device_memory_bytes(small, 4, 30, per_example) < a   # a smaller data share
    assert device_memory_bytes(small, 2, 60, per_example) - a == 30 * small.n_params * 8
    check_memory(a, a)
    with pytest.raises(MemoryError, match="--eval_batch_size.*--lanczos_steps.*--slq_probes"):
        check_memory(a + 1, a)


# edge_of_stability, one configuration (P = 10, 15 sinc rows in local batches of 4); 12 cold
# Lanczos steps ≥ P, so the first track's λ_max is exact
EOS = ["--widths=3", "--n_points=15", "--eval_batch_size=4", "--learning_rates=0.1",
       "--num_inits=1", "--train_steps=6", "--track_every=3", "--lanczos_steps=8",
       "--cold_lanczos_steps=12", "--grad_tol=1e-1"]


@pytest.fixture(scope="module")
def eos_two_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eos_dp") / "two_devices"
    proc = run_app("edge_of_stability", *EOS, f"--out_dir={out}", env=TWO_DEVICES)
    return out, proc.stdout


def test_edge_of_stability_on_two_devices_shards_the_data(eos_two_devices):
    """One configuration on two devices: the automatic axis is data, and the loss at every
    step, λ_max at step 0 and the end point's eigenvalues are those of gradient descent on the
    unsharded problem computed here."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from crit.problems import mlp_problem

    out, text = eos_two_devices
    assert ("shard axis: data (1 configuration(s) < 2 devices) over 2 device(s), 2 local "
            "batch(es) of 4 rows per device") in text
    assert json.loads((out / "config.json").read_text())["protocol"]["shard_axis"] == "data"
    with np.load(out / "series.npz") as data:
        series = {k: data[k] for k in data.files}
    problem = mlp_problem("sinc", widths=(3,), n_points=15)
    theta, unravel = ravel_pytree(problem.init_fn(jax.random.fold_in(jax.random.PRNGKey(0), 0)))
    loss = jax.jit(lambda t: problem.loss_fn(unravel(t)))
    grad = jax.jit(jax.grad(lambda t: problem.loss_fn(unravel(t))))
    hessian = jax.jit(jax.hessian(lambda t: problem.loss_fn(unravel(t))))
    theta = theta.astype(jnp.float64)
    top0 = np.linalg.eigvalsh(np.asarray(hessian(theta)))[-1]
    losses = []
    for _ in range(6):
        losses.append(float(loss(theta)))
        theta = theta - 0.1 * grad(theta)
    losses.append(float(loss(theta)))
    end = np.linalg.eigvalsh(np.asarray(hessian(theta)))
    np.testing.assert_allclose(series["loss"][0, 0], losses, rtol=1e-10)
    assert series["lambda_max"][0, 0, 0] == pytest.approx(top0, rel=1e-10)
    np.testing.assert_allclose(series["eigenvalues_end"][0, 0], end, rtol=0,
                               atol=1e-10 * np.abs(end).max())


def test_edge_of_stability_on_two_processes_matches_two_devices_and_writes_once(
        eos_two_devices, tmp_path):
    """2 processes × 1 device, vmapped sweep, against 1 process × 2 devices, loop: the same
    mesh, so the same sums; every process tracks the configuration and only process 0
    writes."""
    one, _ = eos_two_devices
    out = tmp_path / "two_processes"
    texts = [p.stdout for p in run_processes(
        "edge_of_stability", [*EOS, "--sweep=vmap", f"--out_dir={out}", "--startup_timeout=120"],
        port=free_port())]
    for text in texts:
        assert "shard axis: data (1 configuration(s) < 2 devices) over 2 device(s)" in text
        assert "tracked 1 runs in one program" in text
    assert "leaves the files to process 0" in texts[1]
    assert "leaves the files" not in texts[0] and "wrote " in texts[0]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.json", "edge_of_stability.pdf", "edge_of_stability.png", "series.npz",
        "summary.csv"]
    with np.load(one / "series.npz") as a, np.load(out / "series.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            x, y = a[name], b[name]
            if x.dtype.kind == "f":
                scale = np.nanmax(np.abs(x)) if np.isfinite(x).any() else 1.0
                np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12 * scale, err_msg=name)
            else:
                np.testing.assert_array_equal(y, x, err_msg=name)
    protocols = [json.loads((d / "config.json").read_text())["protocol"] for d in (one, out)]
    assert protocols[1].pop("sweep") == "vmap" and protocols[0].pop("sweep") == "loop"
    assert protocols[0] == protocols[1]


def test_edge_of_stability_on_two_processes_refuses_the_inits_axis(tmp_path):
    """Many processes share one configuration's work only over the data axis: --shard_axis=inits
    stops every process with one message before the results directory or any compute."""
    out = tmp_path / "never"
    for p in run_processes("edge_of_stability", [*EOS, "--shard_axis=inits", f"--out_dir={out}"],
                           port=free_port(), check=False):
        assert p.returncode != 0
        assert ("2 processes share the work only over the data axis: --shard_axis=inits "
                "resolved to inits (as requested); use --shard_axis=data") in p.stderr, p.stderr
    assert not out.exists()


def test_min_ratio_on_the_data_axis_names_the_local_batch_when_an_init_does_not_fit(tmp_path):
    """--hvp_batch_size is refused on the data axis, so the memory plan's hint names
    --eval_batch_size instead; refused before any compute."""
    out = tmp_path / "never"
    proc = run_app("min_ratio", "--widths=3", "--n_points=15", "--eval_batch_size=4",
                   "--num_inits=2", "--hessian=lanczos", "--shard_axis=data",
                   "--memory_gb=0.000001", f"--out_dir={out}", env=TWO_DEVICES, check=False)
    assert proc.returncode != 0
    assert "lower --eval_batch_size (the local batch of the data axis)" in proc.stderr
    assert "--hvp_batch_size" not in proc.stderr.splitlines()[-1]
    assert not out.exists()


def test_a_data_axis_run_is_not_resumed_on_another_device_count(min_ratio_two_devices):
    """Another device count sums in another order: refused, naming data_devices, not mixed."""
    out, _ = min_ratio_two_devices
    before = (out / "results.csv").read_text()
    config = json.loads((out / "config.json").read_text())["protocol"]
    assert (config["shard_axis"], config["data_devices"]) == ("data", 2)
    proc = run_app("min_ratio", *MIN_RATIO, f"--out_dir={out}", check=False)  # one device
    assert proc.returncode != 0
    assert "data_devices" in proc.stderr
    assert (out / "results.csv").read_text() == before
