"""The per-init protocol: vmap == loop, chunk-size invariance, determinism, float32 training."""

import jax
import numpy as np
import pytest

import crit  # noqa: F401
from crit.problems import mlp_problem
from crit.protocol import ProtocolConfig, analyze_init, make_chunk_fn, run_chunk

PROBLEM = mlp_problem("sinc", widths=(3,), n_points=16)
CFG = ProtocolConfig(train_steps=60, log_every=20, finder_steps=4)
FIELDS = ("status", "loss", "grad_norm", "min_ratio", "n_pos", "n_neg", "eigenvalues",
          "curve_loss", "finder_history")


@pytest.fixture(scope="module")
def chunk3():
    return run_chunk(make_chunk_fn(PROBLEM, CFG), np.arange(3), 3)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-9, atol=1e-13,
                               equal_nan=True)


def test_vmap_equals_python_loop(chunk3):
    one = jax.jit(lambda i: analyze_init(PROBLEM, CFG, i))
    for i in range(3):
        rec = one(i)
        for f in FIELDS:
            _close(chunk3[f][i], getattr(rec, f))


def test_chunk_size_and_padding_do_not_change_results(chunk3):
    fn2 = make_chunk_fn(PROBLEM, CFG)
    a = run_chunk(fn2, np.arange(2), 2)
    b = run_chunk(fn2, np.arange(2, 3), 2)  # padded to 2; padding dropped
    assert len(b["init_id"]) == 1 and int(b["init_id"][0]) == 2
    for f in FIELDS:
        _close(np.concatenate([a[f], b[f]]), chunk3[f])


def test_same_seed_same_result_other_seed_other_result(chunk3):
    again = run_chunk(make_chunk_fn(PROBLEM, CFG), np.arange(3), 3)
    for f in FIELDS:
        np.testing.assert_array_equal(again[f], chunk3[f])
    other = run_chunk(make_chunk_fn(PROBLEM, CFG._replace(seed=1)), np.arange(3), 3)
    assert not np.allclose(other["loss"], chunk3["loss"])


def test_record_shapes_and_float32_training(chunk3):
    assert chunk3["eigenvalues"].shape == (3, PROBLEM.n_params)
    assert np.all(np.diff(chunk3["eigenvalues"], axis=1) >= 0)  # ascending
    assert chunk3["curve_loss"].shape == (3, 60 // 20 + 1)
    n = chunk3["n_pos"] + chunk3["n_neg"] + chunk3["n_null"]
    np.testing.assert_array_equal(n, PROBLEM.n_params)
    rec = run_chunk(make_chunk_fn(PROBLEM, CFG._replace(train_dtype="float32")), np.arange(2), 2)
    assert rec["eigenvalues"].dtype == np.float64 and np.all(np.isfinite(rec["eigenvalues"]))


def test_chunk_bounds_are_checked():
    with pytest.raises(ValueError, match="chunk holds"):
        run_chunk(None, np.arange(4), 3)


def test_balanced_chunk_size():
    from crit.protocol import balanced_chunk_size

    assert balanced_chunk_size(100, 46) == 34          # 3 chunks of 34, not 46 + 46 + 8
    assert balanced_chunk_size(100, 500) == 100
    assert balanced_chunk_size(100, 16, 4) == 16       # 7 chunks, rounded up to the devices
    assert balanced_chunk_size(3, 8, 4) == 4           # never below one per device
    for n in range(1, 60):
        for c in range(1, 20):
            b = balanced_chunk_size(n, c)
            assert b <= c and -(-n // b) == -(-n // min(c, n))  # same number of chunks
    with pytest.raises(ValueError):
        balanced_chunk_size(0, 4)


def test_fixed_vmap_width_makes_chunks_bit_identical():
    """Groups of vmap_width inits: chunk 2 and chunk 4 give the same bits for every init."""
    cfg = CFG._replace(vmap_width=2)
    fn = make_chunk_fn(PROBLEM, cfg)
    four = run_chunk(fn, np.arange(4), 4)
    two = {k: np.concatenate([a, b]) for (k, a), b in
           zip(run_chunk(fn, np.arange(2), 2).items(),
               run_chunk(fn, np.arange(2, 4), 2).values())}
    for f in FIELDS:
        np.testing.assert_array_equal(four[f], two[f], err_msg=f)


def test_float32_spectrum_path_is_honest():
    """--spectrum_dtype=float32 (the TPU path): τ = P·ε₃₂·max|λ|, eigenvalues agree with the
    float64 path to float32 accuracy, counts agree wherever |λ| is resolvable in float32, and
    the certificate is a float64 gradient norm at the float32 point."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from crit.protocol import train_init

    cfg64 = CFG._replace(vmap_width=2, finder="gradnorm", finder_steps=20)
    cfg32 = cfg64._replace(spectrum_dtype="float32")
    r64 = run_chunk(make_chunk_fn(PROBLEM, cfg64), np.arange(2), 2)
    r32 = run_chunk(make_chunk_fn(PROBLEM, cfg32), np.arange(2), 2)
    p = PROBLEM.n_params
    for i in range(2):
        scale = np.abs(r32["eigenvalues"][i]).max()
        np.testing.assert_allclose(r32["tolerance"][i],
                                   p * np.finfo(np.float32).eps * scale, rtol=1e-6)
        assert r32["tolerance"][i] > 1e6 * r64["tolerance"][i]
        np.testing.assert_allclose(r32["eigenvalues"][i], r64["eigenvalues"][i],
                                   atol=1e-4 * scale)
        resolvable = np.abs(r64["eigenvalues"][i]) > 10 * r32["tolerance"][i]
        assert resolvable.sum() >= p // 2
        assert ((r32["eigenvalues"][i] > 0) == (r64["eigenvalues"][i] > 0))[resolvable].all()
        assert r32["n_pos"][i] + r32["n_neg"][i] + r32["n_null"][i] == p
    # the stored gradient norm is the float64 norm at the point the float32 finder reached
    params, _ = train_init(PROBLEM, cfg32, 0)
    from crit.critical import find_critical_point
    from crit.train import cast_params

    found = find_critical_point(PROBLEM.loss_fn, cast_params(params, jnp.float32), "gradnorm",
                                cfg32.grad_tol, num_steps=20, learning_rate=cfg32.finder_lr)
    g = jax.grad(PROBLEM.loss_fn)(cast_params(found.params, jnp.float64))
    np.testing.assert_allclose(r32["grad_norm"][0], np.linalg.norm(ravel_pytree(g)[0]),
                               rtol=1e-6)
