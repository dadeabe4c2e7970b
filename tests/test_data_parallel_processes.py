"""The data axis with data as arguments and on many processes: the training rows enter the
compiled program as sharded arguments (each device holds its share, no constant holds the
data), and the spectrum app as 2 tasks of a simulated SLURM job under jax.distributed
(--distributed_auto; lead-only writes, the numbers of the unsharded problem)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.app_runner import ENV, ROOT, read_rows, run_processes
from tests.test_parallel import free_port

TWO_DEVICES = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def arguments_not_constants() -> None:
    """Run under 2 forced host devices: print the rows each device holds, the size of the
    largest constant in the lowered program with and without jit_with_data, and the loss."""
    import re

    import jax
    import jax.numpy as jnp

    from crit.data_parallel import data_mesh, jit_with_data, shard_data
    from crit.problems import mlp_problem
    from crit.train import cast_params

    problem = mlp_problem("digits", widths=(3,), n_points=300, eval_batch_size=50)
    sharded = shard_data(problem, data_mesh())
    params = cast_params(problem.init_fn(jax.random.PRNGKey(0)), jnp.float64)
    xs = sharded.data_args[0]

    def largest_constant(text: str) -> int:  # elements of the largest dense constant
        shapes = re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]+)x?f64>", text)
        return max([int(np.prod([int(d) for d in s.split("x") if d])) for s in shapes] or [0])

    bound = jit_with_data(lambda pr: pr.loss_fn, sharded)
    closed = jax.jit(sharded.loss_fn)
    print(json.dumps({
        "global_shape": list(xs.shape),
        "shard_shapes": [list(s.data.shape) for s in xs.addressable_shards],
        "shard_devices": sorted(str(s.device) for s in xs.addressable_shards),
        "bound_constant": largest_constant(bound.lower(params).as_text()),
        "closed_constant": largest_constant(closed.lower(params).as_text()),
        "bound_loss": float(bound(params)), "closed_loss": float(closed(params)),
        "loss": float(problem.loss_fn(params))}))


def test_the_rows_enter_the_program_as_sharded_arguments_not_constants():
    proc = subprocess.run([sys.executable, "-c", "from tests.test_data_parallel_processes "
                           "import arguments_not_constants as f; f()"], cwd=ROOT,
                          env=TWO_DEVICES, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # 300 rows over 2 devices: 150 each, in 3 batches of 50; 64 pixels a row
    assert got["global_shape"] == [6, 50, 64]
    assert got["shard_shapes"] == [[3, 50, 64], [3, 50, 64]]
    assert len(set(got["shard_devices"])) == 2
    # compiled in, the rows are a constant of all 300 × 64 pixels; as arguments, nothing of
    # that size is left in the program
    assert got["closed_constant"] >= 300 * 64
    assert got["bound_constant"] < 50 * 64
    assert got["bound_loss"] == pytest.approx(got["loss"], rel=1e-13)
    assert got["closed_loss"] == pytest.approx(got["loss"], rel=1e-13)


SPECTRUM = ["--n_points=27", "--eval_batch_size=4", "--train_steps=10", "--lanczos_steps=12",
            "--slq_probes=2", "--num_eigs=2", "--snapshots=0,end", "--eig_tol=1e-2",
            "--compare_dense=false", "--startup_timeout=120"]
# A net with BatchNorm (eval mode): training with state runs on one device per process and every
# process takes process 0's snapshots; the analysis is data-parallel. (A small module of the
# user's, as a fork would write it: a ResNet compiles 2x slower for the same check.)
NORM_NET = textwrap.dedent('''
    import flax.linen as nn
    import jax.numpy as jnp

    def make(n_outputs):
        class NormNet(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool = False):
                x = nn.Dense(3, param_dtype=jnp.float64)(x)
                x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
                return nn.Dense(n_outputs, param_dtype=jnp.float64)(jnp.tanh(x))
        return NormNet()
''')


def slurm_port() -> int:
    """A free port in the range JAX's SLURM detection derives from the job id,
    61440 + SLURM_JOB_ID mod 4096 (jax/_src/clusters/slurm_cluster.py)."""
    import socket

    for port in range(61440 + os.getpid() % 4000, 65536):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def slurm_env(task: int, tasks: int, port: int) -> dict:
    """The variables ``srun`` sets for task ``task`` of a one-node job: what
    ``--distributed_auto`` (jax.distributed.initialize() without arguments) reads."""
    return {**ENV, "SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "SLURM_STEP_NUM_NODES": "1"}


def test_spectrum_on_two_slurm_tasks_matches_the_unsharded_problem_and_writes_once(tmp_path):
    """The BUILD.md SLURM recipe, its environment simulated on localhost: 2 tasks started with
    --distributed_auto find each other from the SLURM_* variables alone, analyse a net with
    BatchNorm on the data axis, and agree with the unsharded problem."""
    import jax.numpy as jnp

    from crit.hessian import dense_hessian
    from crit.problems import model_problem
    from crit.protocol import init_key
    from crit.train import cast_params

    (tmp_path / "norm_net.py").write_text(NORM_NET)
    sys.path.insert(0, str(tmp_path))
    out = tmp_path / "spectrum"
    port = slurm_port()
    texts = [p.stdout for p in run_processes(
        "spectrum", [*SPECTRUM, "--model=norm_net:make", f"--out_dir={out}", "--distributed_auto"],
        env_of=lambda i: {**slurm_env(i, 2, port), "PYTHONPATH": f"{ROOT}:{tmp_path}"})]
    for text in texts:
        assert ("shard axis: data (1 init(s) < 2 devices) over 2 device(s), 4 local batch(es) "
                "of 4 rows per device") in text
        assert "every process takes process 0's snapshots" in text
    assert "leaves the files to process 0" in texts[1]
    assert "leaves the files" not in texts[0]
    assert "minimum ratio (SLQ estimate)" in texts[0]
    # one chunk per snapshot, each written once (by process 0), and the outputs
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [
        "chunk_0000000_000001.npz", "chunk_0000001_000001.npz"]
    assert not list(out.glob("*.tmp*"))
    assert json.loads((out / "config.json").read_text())["experiment"] == "spectrum"
    rows = read_rows(out / "spectrum.csv")
    assert [r["step"] for r in rows] == ["0", "10"]
    try:
        problem = model_problem("norm_net:make", "digits", n_points=27)
    finally:
        sys.path.remove(str(tmp_path))
    assert problem.batchnorm == "eval" and problem.n_params == 64 * 3 + 3 + 6 + 3 * 10 + 10
    params = cast_params(problem.init_fn(init_key(0, 0)), jnp.float64)
    state = cast_params(problem.init_state_fn(init_key(0, 0)), jnp.float64)
    hessian = dense_hessian(problem.bind_state(state), params)
    top = float(np.linalg.eigvalsh(np.asarray(hessian))[-1])
    assert float(rows[0]["loss"]) == pytest.approx(float(problem.loss_fn(params, state)),
                                                   rel=1e-12)
    assert float(rows[0]["lambda_max"]) == pytest.approx(top, rel=1e-8)


def test_spectrum_refuses_many_processes_on_the_inits_axis(tmp_path):
    """One init cannot be split over processes by inits: refused before compute, same message
    on both processes."""
    for p in run_processes("spectrum", [*SPECTRUM, "--widths=4", "--shard_axis=inits",
                                        f"--out_dir={tmp_path / 'refused'}"],
                           port=free_port(), check=False):
        assert p.returncode != 0
        assert "use --shard_axis=data (or auto)" in p.stdout + p.stderr
    assert not (tmp_path / "refused").exists()
