"""crit.saddles: Newton from many starts finds known critical points of every index; starts are
reproducible; duplicates are merged up to the permutation / sign-flip symmetry of tanh nets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401
from crit import saddles, toy
from crit.critical import CRITICAL, STATUSES
from crit.problems import ACTIVATIONS, mlp_problem
from crit.spectrum import exact_spectrum
from crit.train import make_optimizer, train


# ----------------------------------------------------------------------------- toys

def test_toy_saddle_and_valley_recovered_with_their_index():
    """L = (1 − w1w2)²: starts near the origin land on the saddle (one λ < 0, one λ > 0);
    starts near the valley land on a minimum w1w2 = 1 with one null and one positive λ."""
    near_origin = [[0.1, -0.05], [-0.2, 0.15], [0.05, 0.3]]
    near_valley = [[1.2, 0.9], [0.5, 1.7], [-1.1, -0.8]]
    starts = jnp.asarray(near_origin + near_valley)
    found = saddles.find_critical_points(toy.toy_loss, starts, chunk_size=4, eig_rtol=1e-6)
    assert np.all(found.status == CRITICAL)
    np.testing.assert_allclose(found.params[:3], 0.0, atol=1e-10)
    assert list(found.n_neg[:3]) == [1, 1, 1] and list(found.n_pos[:3]) == [1, 1, 1]
    np.testing.assert_allclose(found.index[:3], 0.5)
    np.testing.assert_allclose(found.eigenvalues[:3], [[-2.0, 2.0]] * 3, atol=1e-9)
    w = found.params[3:]
    np.testing.assert_allclose(w[:, 0] * w[:, 1], 1.0, atol=1e-9)
    np.testing.assert_allclose(found.loss[3:], 0.0, atol=1e-18)
    assert list(found.n_neg[3:]) == [0, 0, 0] and list(found.n_null[3:]) == [1, 1, 1]
    np.testing.assert_allclose(found.eigenvalues[3:, 1], 2 * (w ** 2).sum(1), rtol=1e-8)
    assert saddles.status_counts(found.status) == {"critical": 6, "not_converged": 0,
                                                   "gradient_flat": 0, "diverged": 0}


def test_quadratic_saddle_found_from_every_start():
    """f = 5x² − y²: Newton lands on the saddle at the origin, H = diag(10, −2), index ½."""
    starts = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)) * 3)
    found = saddles.find_critical_points(toy.quadratic_saddle, starts, chunk_size=2)
    assert np.all(found.status == CRITICAL)
    np.testing.assert_allclose(found.params, 0.0, atol=1e-12)
    np.testing.assert_allclose(found.eigenvalues, [[-2.0, 10.0]] * 5, rtol=1e-12)
    assert np.all(found.n_neg == 1) and np.all(found.n_pos == 1) and np.all(found.n_null == 0)
    np.testing.assert_allclose(found.start_loss, 5 * starts[:, 0] ** 2 - starts[:, 1] ** 2)


def test_gradient_norm_prestage_then_newton():
    """With a ½‖g‖² stage first, Newton still certifies the quadratic saddle."""
    starts = jnp.asarray([[0.5, -1.0], [2.0, 1.0]])
    found = saddles.find_critical_points(toy.quadratic_saddle, starts, prefind_steps=10,
                                         prefind_lr=1e-2)
    assert np.all(found.status == CRITICAL) and np.all(found.n_neg == 1)
    np.testing.assert_allclose(found.params, 0.0, atol=1e-12)


def test_chunk_size_never_changes_results():
    starts = jnp.asarray([[0.1, -0.05], [1.2, 0.9], [0.5, 1.7], [-0.2, 0.15], [3.0, -1.0]])
    a = saddles.find_critical_points(toy.toy_loss, starts, chunk_size=2)
    b = saddles.find_critical_points(toy.toy_loss, starts, chunk_size=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_chunk_size_never_changes_mlp_results_bit_for_bit():
    """Starts are refined in vmapped groups of vmap_width whatever the chunk size, so every
    field is identical bit for bit for chunks of 1, 4 and 7 (with the vmap width following the
    chunk, params differed by up to 2e-13 and eigenvalues by 1e-13 here; with lax.map over a
    chunk, a one-group chunk differed in the last bit of start_grad_norm)."""
    pr = mlp_problem("gaussian", widths=(3,), n_points=16, dim_in=2, l2=1e-3)
    st = saddles.make_starts(pr.loss_fn, pr.init_fn, 0, 2, make_optimizer("adam", 1e-2), 20, 10,
                             (0.0, 0.05))
    calls = []
    runs = [saddles.find_critical_points(pr.loss_fn, st.params, chunk_size=c, vmap_width=3,
                                         progress=calls.append, max_iters=6)
            for c in (1, 4, 7)]
    assert calls == [3, 3, 3, 3] + [6, 6] + [9, 3]  # chunks rounded up to multiples of 3
    for other in runs[1:]:
        for name, x, y in zip(runs[0]._fields, runs[0], other):
            for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
                np.testing.assert_array_equal(a, b, err_msg=name)
    assert len(runs[0].status) == 12
    with pytest.raises(ValueError, match="vmap_width"):
        saddles.find_critical_points(pr.loss_fn, st.params, vmap_width=0)


def test_every_start_keeps_a_status():
    """A start that cannot converge in 1 iteration is labelled, not dropped."""
    starts = jnp.asarray([[1.5, 0.2], [0.0, 0.0]])
    found = saddles.find_critical_points(toy.toy_loss, starts, max_iters=1)
    assert found.status.shape == (2,) and found.status[1] == CRITICAL
    assert found.status[0] != CRITICAL
    counts = saddles.status_counts(found.status)
    assert set(counts) == set(STATUSES) and sum(counts.values()) == 2


# ----------------------------------------------------------------------------- starts

SEED, OPT_LR = 5, 1e-2


@pytest.fixture(scope="module")
def small_starts():
    pr = mlp_problem("gaussian", widths=(3,), n_points=24, dim_in=3, l2=1e-3)
    starts = saddles.make_starts(pr.loss_fn, pr.init_fn, SEED, 2, make_optimizer("adam", OPT_LR),
                                 20, 10, (0.0, 0.1))
    return pr, starts


def test_starts_are_snapshots_of_crit_train_plus_keyed_noise(small_starts):
    """Order init → snapshot → scale; step 0 is init_fn(fold_in(key, i)); the last snapshot is
    crit.train's result; the noise uses its documented key, so a start does not depend on how
    many inits there are."""
    pr, st = small_starts
    assert len(st.init_id) == 2 * 3 * 2
    assert list(st.init_id[:6]) == [0] * 6 and list(st.step[:6]) == [0, 0, 10, 10, 20, 20]
    assert list(st.noise_scale[:2]) == [0.0, 0.1]
    theta = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(st.params))
    key1 = jax.random.fold_in(jax.random.PRNGKey(SEED), 1)
    p1 = pr.init_fn(key1)
    np.testing.assert_array_equal(theta[6], ravel_pytree(p1)[0])  # init 1, step 0, scale 0
    noisy = saddles.noisy_copies(jax.random.fold_in(jax.random.fold_in(key1, 1), 7), p1,
                                 (0.0, 0.1))
    np.testing.assert_allclose(theta[7], ravel_pytree(jax.tree.map(lambda x: x[1], noisy))[0],
                               rtol=1e-12)
    assert 0.03 < np.std(theta[7] - theta[6]) < 0.3
    end, _ = jax.jit(lambda p: train(pr.loss_fn, make_optimizer("adam", OPT_LR), p, 20, 10))(p1)
    np.testing.assert_allclose(theta[10], ravel_pytree(end)[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st.start_loss[10], pr.loss_fn(end), rtol=1e-10)


def test_snapshot_every_must_divide_the_steps(small_starts):
    pr, _ = small_starts
    p0 = pr.init_fn(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="multiple"):
        saddles.training_snapshots(pr.loss_fn, make_optimizer("adam", 1e-2), p0, 30, 20)
    with pytest.raises(ValueError, match="noise_scales"):
        saddles.make_starts(pr.loss_fn, pr.init_fn, 0, 1, make_optimizer("adam", 1e-2), 10, 10,
                            (-1.0,))


MASKABLE = [a for a in sorted(ACTIVATIONS) if a not in ("sigmoid", "softplus")]


@pytest.mark.parametrize("activation", MASKABLE)
def test_masked_units_stay_exactly_zero_under_training(activation):
    """A zero hidden unit (incoming, bias, outgoing) stays exactly zero under 50 Adam steps for
    every activation mask_hidden_units accepts (σ(0) = 0), in both hidden layers."""
    assert saddles.zero_preserving(activation)
    pr = mlp_problem("gaussian", widths=(3, 2), n_points=24, dim_in=3, l2=1e-3,
                     activation=activation)
    mask = jnp.asarray([1.0, 0.0, 1.0, 0.0, 1.0])
    p = saddles.mask_hidden_units(pr.init_fn(jax.random.PRNGKey(1)), mask, activation)
    snaps, _ = saddles.training_snapshots(pr.loss_fn, make_optimizer("adam", 1e-2), p, 50, 50)
    layers = saddles.mlp_layers(jax.tree.map(lambda x: x[-1], snaps))
    (k0, b0), (k1, b1), (k2, _) = layers
    assert np.all(k0[:, 1] == 0) and b0[1] == 0 and np.all(k1[1] == 0)
    assert np.all(k1[:, 0] == 0) and b1[0] == 0 and np.all(k2[0] == 0)
    assert np.all(k0[:, [0, 2]] != 0) and np.all(k1[[0, 2]][:, 1] != 0)
    np.testing.assert_array_equal(saddles.reduced_net_masks(2, 4),
                                  [[0, 0], [1, 0], [1, 1], [0, 0]])


@pytest.mark.parametrize("activation", ["sigmoid", "softplus"])
def test_masking_refused_where_sigma_of_zero_is_not_zero(activation):
    """σ(0) ≠ 0: a zeroed unit outputs a constant, its outgoing weights get a gradient and it
    leaves zero (0.24 / 0.47 after 50 Adam steps), so masking is refused with one clear error,
    also inside a trace (the check runs under jit(vmap) in make_starts)."""
    assert not saddles.zero_preserving(activation)
    pr = mlp_problem("gaussian", widths=(3,), n_points=24, dim_in=3, l2=1e-3,
                     activation=activation)
    p = pr.init_fn(jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match=r"σ\(0\) = 0.*" + activation):
        saddles.mask_hidden_units(p, jnp.asarray([1.0, 0.0, 1.0]), activation)
    masks = jnp.asarray(saddles.reduced_net_masks(3, 2))
    with pytest.raises(ValueError, match="use one of"):
        saddles.make_starts(pr.loss_fn, pr.init_fn, 0, 2, make_optimizer("adam", 1e-2), 10, 10,
                            init_transform=lambda i, q: saddles.mask_hidden_units(
                                q, masks[i], activation))


# ----------------------------------------------------------------------------- symmetries

def _random_mlp(widths, seed, activation="tanh", dim_in=3):
    pr = mlp_problem("gaussian", widths=widths, n_points=20, dim_in=dim_in, dim_out=2,
                     activation=activation)
    return pr, pr.init_fn(jax.random.PRNGKey(seed))


def _permute_flip(params, rng, flip=True):
    """A symmetric copy: every hidden layer's units permuted and (optionally) sign-flipped."""
    layers = saddles.mlp_layers(params)
    for l in range(len(layers) - 1):
        width = layers[l][0].shape[1]
        perm = rng.permutation(width)
        signs = np.where(rng.random(width) < 0.5, -1.0, 1.0) if flip else np.ones(width)
        saddles._apply_units(layers, l, perm, signs)
    return saddles._rebuild(params, layers)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _loss_and_spectrum(pr, points):
    fn = jax.jit(jax.vmap(lambda q: (pr.loss_fn(q), exact_spectrum(pr.loss_fn, q)[0])))
    losses, spectra = fn(_stack(points))
    return np.asarray(losses), np.asarray(spectra)


@pytest.mark.parametrize("widths", [(4,), (3, 4)])
def test_symmetric_copies_are_the_same_function_and_canonical_form(widths):
    pr, p = _random_mlp(widths, 0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(pr.dataset.x_train)
    canon = ravel_pytree(saddles.canonicalize_mlp(p, odd_activation=True))[0]
    for _ in range(3):
        q = _permute_flip(p, rng)
        assert not np.allclose(ravel_pytree(q)[0], ravel_pytree(p)[0])
        np.testing.assert_allclose(pr.apply_fn(q, x), pr.apply_fn(p, x), atol=1e-12)
        np.testing.assert_allclose(ravel_pytree(saddles.canonicalize_mlp(q, True))[0], canon,
                                   atol=1e-12)
        assert saddles.mlp_distance(p, q, odd_activation=True) < 1e-12


def test_merge_duplicates_merges_symmetric_copies_and_keeps_distinct_points():
    pr, p = _random_mlp((3, 4), 0)
    _, other = _random_mlp((3, 4), 7)
    rng = np.random.default_rng(2)
    copies = [p] + [_permute_flip(p, rng) for _ in range(3)]
    points = copies + [other]
    losses, spectra = _loss_and_spectrum(pr, points)
    # the symmetry leaves loss and spectrum unchanged
    np.testing.assert_allclose(losses[1:4], losses[0], rtol=1e-12)
    np.testing.assert_allclose(spectra[1:4], spectra[[0, 0, 0]], atol=1e-10)
    merged = saddles.merge_duplicates(losses, spectra, _stack(points), odd_activation=True)
    assert len(merged.representative) == 2
    lab = merged.label
    assert lab[0] == lab[1] == lab[2] == lab[3] != lab[4]
    assert merged.multiplicity[lab[0]] == 4 and merged.multiplicity[lab[4]] == 1
    assert merged.multiplicity.sum() == 5 and merged.label[merged.representative].tolist() == [0, 1]
    # same loss and spectrum but different parameters: kept apart by the parameter test
    fake = saddles.merge_duplicates(np.full(2, losses[0]), spectra[[0, 0]],
                                    _stack([p, other]), odd_activation=True)
    assert list(fake.multiplicity) == [1, 1]
    # without parameters only loss and spectrum are compared
    loose = saddles.merge_duplicates(np.full(2, losses[0]), spectra[[0, 0]])
    assert list(loose.multiplicity) == [2]


def test_sign_flips_are_not_a_symmetry_without_odd_activation():
    pr, p = _random_mlp((4,), 3, activation="relu")
    q_perm = _permute_flip(p, np.random.default_rng(0), flip=False)
    q_flip = _permute_flip(p, np.random.default_rng(0), flip=True)
    pts = [p, q_perm, q_flip]
    losses, spectra = _loss_and_spectrum(pr, pts)
    assert abs(losses[2] - losses[0]) > 1e-6  # a flipped ReLU net is another function
    # pretend all three share loss and spectrum: only the permuted copy is merged
    merged = saddles.merge_duplicates(np.full(3, losses[0]), spectra[[0, 0, 0]],
                                      _stack(pts), odd_activation=False)
    assert list(merged.label) == [0, 0, 1]
