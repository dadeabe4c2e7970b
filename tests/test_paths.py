"""Minimum energy paths (crit.paths), certified tops (crit.mountain_pass), alignment (crit.align).

Known answers: the lecture toy's saddle at the origin (loss 1, eigenvalues ±2), the Müller-Brown
saddles (Müller & Brown 1979), a convex valley with no barrier, a permuted copy of a network.
Plus algebra (unit tangents, image insertion), vmap == loop, and chunking independence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit import align, paths, toy
from crit.critical import newton_critical_point
from crit.mountain_pass import (INDEX_1_SADDLE, NO_BARRIER, certify_band_top, certify_top,
                                descent_connection, eigenvector_following,
                                has_interior_maximum, label_names)
from crit.problems import flatten, mlp_problem

PUBLISHED_SADDLES = np.array(paths.MULLER_BROWN_SADDLES)  # (−0.822, 0.624), (0.212, 0.293)


# ----------------------------------------------------------------------------- the lecture toy


@pytest.fixture(scope="module")
def toy_band():
    a, b = jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0])
    return jax.jit(lambda a, b: paths.relax_band(toy.toy_loss, paths.linear_path(a, b, 9),
                                                 num_steps=300, climb_after=20))(a, b)


def test_toy_band_finds_the_saddle_at_the_origin(toy_band):
    cert = certify_band_top(toy.toy_loss, toy_band)
    assert label_names(cert.label) == "index_1_saddle"
    assert int(cert.status) == 0 and float(cert.grad_norm) <= 1e-8
    np.testing.assert_allclose(cert.theta, [0.0, 0.0], atol=1e-8)
    assert abs(float(cert.barrier) - 1.0) <= 1e-8  # both minima have loss 0
    assert abs(float(cert.loss) - 1.0) <= 1e-8
    assert int(cert.n_neg) == 1 and int(cert.n_null) == 0
    np.testing.assert_allclose(cert.eigenvalues, toy.TOY_SADDLE_EIGENVALUES, atol=1e-8)
    assert abs(float(paths.barrier_height(toy_band.energies)) - 1.0) <= 1e-6


def test_toy_lanczos_branch_gives_the_same_index(toy_band):
    cert = certify_band_top(toy.toy_loss, toy_band, dense_max_params=1, lanczos_steps=2,
                            lanczos_k=2)
    assert not bool(cert.dense)
    assert label_names(cert.label) == "index_1_saddle" and int(cert.n_neg) == 1
    np.testing.assert_allclose(cert.theta, [0.0, 0.0], atol=1e-8)
    np.testing.assert_allclose(cert.eigenvalues, [-2.0, 2.0], atol=1e-8)


def test_band_between_pytrees_with_fire_climbs_to_the_origin():
    band = jax.jit(lambda a, b: paths.nudged_elastic_band(
        toy.toy_loss, a, b, num_images=7, num_steps=300, climb_after=20,
        optimizer=paths.fire(0.05)))(jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0]))
    assert bool(band.converged) and int(band.num_images) == 7
    np.testing.assert_allclose(band.images[band.climbing], [0.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- Müller-Brown


@pytest.fixture(scope="module")
def muller_brown():
    f = paths.muller_brown
    refine = jax.jit(jax.vmap(lambda t: newton_critical_point(f, t).params))
    minima = refine(jnp.asarray(paths.MULLER_BROWN_MINIMA))  # A, C, B
    starts, ends = minima[:2], minima[1:]  # A→C and C→B
    run = jax.jit(lambda s, e, chunk: paths.many_bands(f, s, e, num_images=11, num_steps=1500,
                                                       climb_after=200, force_tol=1e-3,
                                                       chunk_size=chunk), static_argnums=2)
    bands = run(starts, ends, None)
    certify = jax.jit(jax.vmap(lambda b: certify_band_top(f, b)))
    connect = jax.jit(jax.vmap(lambda s, im, c: descent_connection(f, s, im, c, num_steps=1000)))
    return dict(minima=minima, starts=starts, ends=ends, bands=bands, certs=certify(bands),
                run=run, certify=certify, connect=connect)


def test_muller_brown_minima_are_the_known_ones(muller_brown):
    np.testing.assert_allclose(muller_brown["minima"], paths.MULLER_BROWN_MINIMA, atol=1e-3)
    values = jax.vmap(paths.muller_brown)(muller_brown["minima"])
    np.testing.assert_allclose(values, [-146.699, -80.768, -108.167], atol=1e-2)


def test_muller_brown_bands_find_both_published_saddles(muller_brown):
    certs = muller_brown["certs"]
    np.testing.assert_allclose(certs.theta, PUBLISHED_SADDLES, atol=1e-3)
    np.testing.assert_array_equal(certs.label, [INDEX_1_SADDLE, INDEX_1_SADDLE])
    assert np.all(np.asarray(certs.grad_norm) <= 1e-8)  # Newton's certificate
    np.testing.assert_array_equal(certs.n_neg, [1, 1])
    np.testing.assert_allclose(certs.loss, [-40.665, -72.249], atol=1e-2)
    # the climbing image itself is already at the saddle, before any refinement
    bands = muller_brown["bands"]
    tops = bands.images[jnp.arange(2), bands.climbing]
    np.testing.assert_allclose(tops, PUBLISHED_SADDLES, atol=1e-2)
    # the eigenvalues at each saddle are one negative, one positive, computed independently
    for theta in np.asarray(certs.theta):
        lam = np.linalg.eigvalsh(np.asarray(jax.hessian(paths.muller_brown)(jnp.asarray(theta))))
        assert lam[0] < -100 and lam[1] > 100


def test_descent_from_each_saddle_ends_at_the_two_minima_of_its_band(muller_brown):
    bands, certs = muller_brown["bands"], muller_brown["certs"]
    conn = muller_brown["connect"](certs.theta, bands.images, bands.climbing)
    np.testing.assert_array_equal(conn.connects, [True, True])
    np.testing.assert_array_equal(conn.on_path, [True, True])
    # a point that is not on the band is not a pass of it
    far = jnp.asarray(PUBLISHED_SADDLES[::-1])  # each band's top swapped with the other's
    swapped = muller_brown["connect"](far, bands.images, bands.climbing)
    np.testing.assert_array_equal(swapped.connects, [False, False])


def test_vmap_over_paths_equals_a_loop_and_any_chunk(muller_brown):
    f, bands = paths.muller_brown, muller_brown["bands"]
    one = jax.jit(lambda a, b: paths.relax_band(f, paths.linear_path(a, b, 11), num_steps=1500,
                                                climb_after=200, force_tol=1e-3))
    # one path alone is another XLA program than the vmapped batch: on jaxlib 0.10.2 (x86_64,
    # 2026-12-07) its images differ by up to 1.2e-5 after 1500 steps (rounding amplified by
    # the optimizer), so bit identity is not claimed; the discrete outcome must agree
    for j in range(2):
        single = one(muller_brown["starts"][j], muller_brown["ends"][j])
        assert int(single.climbing) == int(bands.climbing[j])
        assert bool(single.converged) == bool(bands.converged[j])
        np.testing.assert_allclose(single.images, bands.images[j], atol=1e-4)
        np.testing.assert_allclose(single.energies, bands.energies[j], rtol=1e-4)
    # one path at a time (lax.map over vmaps of width 1) is another XLA program: rounding
    # differs in the last bits and 1500 optimizer steps amplify it, but not beyond 1e-5, and
    # the certified saddles agree to rounding
    chunked = muller_brown["run"](muller_brown["starts"], muller_brown["ends"], 1)
    np.testing.assert_array_equal(chunked.climbing, bands.climbing)
    np.testing.assert_array_equal(chunked.converged, bands.converged)
    np.testing.assert_allclose(chunked.images, bands.images, atol=1e-5)
    np.testing.assert_allclose(chunked.energies, bands.energies, rtol=1e-5)
    certs = muller_brown["certify"](chunked)
    np.testing.assert_allclose(certs.theta, muller_brown["certs"].theta, atol=1e-10)


def test_eigenvector_following_walks_to_an_index_1_saddle():
    start = jnp.asarray(PUBLISHED_SADDLES[1]) + jnp.array([0.05, -0.04])
    out = jax.jit(lambda t: eigenvector_following(paths.muller_brown, t, 0.02, 200))(start)
    assert float(out.grad_norm) < 1e-8
    np.testing.assert_allclose(out.theta, PUBLISHED_SADDLES[1], atol=1e-3)


# ----------------------------------------------------------------------------- no barrier


def convex_valley(theta):
    """y² + relu(x² − 1)²: convex, its minima fill the segment [−1, 1] × {0}."""
    return theta[1] ** 2 + jax.nn.relu(theta[0] ** 2 - 1.0) ** 2


def test_convex_in_between_has_no_barrier_and_no_saddle():
    band = jax.jit(lambda a, b: paths.relax_band(convex_valley, paths.linear_path(a, b, 7),
                                                 num_steps=50))(jnp.array([-1.0, 0.0]),
                                                                jnp.array([1.0, 0.0]))
    assert float(paths.barrier_height(band.energies)) == 0.0
    cert = jax.jit(lambda b: certify_band_top(convex_valley, b))(band)
    assert int(cert.label) == NO_BARRIER
    assert np.isnan(float(cert.loss)) and np.all(np.isnan(np.asarray(cert.theta)))
    assert int(cert.n_neg) == -1


# ----------------------------------------------------------------------------- geometry


def test_improved_tangent_is_the_uphill_segment_on_a_monotone_chain():
    images = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0], [4.0, 2.0]])
    energies = jnp.array([0.0, 1.0, 2.0, 3.0])
    tau = paths.improved_tangents(images, energies)
    np.testing.assert_allclose(tau, [[0.0, 1.0], [1.0, 0.0]])
    # at a maximum the tangent mixes both segments and stays a unit vector
    tau = paths.improved_tangents(images, jnp.array([0.0, 1.0, 3.0, 2.0]))
    np.testing.assert_allclose(jnp.linalg.norm(tau, axis=1), 1.0)


def test_insert_images_puts_midpoints_where_the_energy_jumps():
    images = paths.linear_path(jnp.zeros(2), jnp.array([4.0, 0.0]), 5)
    energies = jnp.array([0.0, 0.1, 5.0, 5.2, 0.0])
    new = paths.insert_images(images, energies, 2)
    np.testing.assert_allclose(new[:, 0], [0, 1, 1.5, 2, 3, 3.5, 4])  # jumps 4.9 and 5.2
    np.testing.assert_allclose(paths.arc_length(new)[-1], 4.0)
    with pytest.raises(ValueError):
        paths.insert_images(images, energies, 5)


def test_autoneb_between_the_outer_muller_brown_minima_climbs_the_higher_saddle():
    a, b = jnp.array([-0.5582, 1.4417]), jnp.array([0.6235, 0.0280])
    band = jax.jit(lambda a, b: paths.autoneb(paths.muller_brown, a, b, num_images=7,
                                              insertions=(4,), num_steps=1500,
                                              climb_after=200))(a, b)
    assert band.images.shape == (11, 2) and int(band.num_images) == 11
    np.testing.assert_allclose(band.images[band.climbing], PUBLISHED_SADDLES[0], atol=2e-2)


# ----------------------------------------------------------------------------- alignment


@pytest.fixture(scope="module")
def mlp():
    problem = mlp_problem("gaussian", widths=(6, 5), n_points=24, dim_in=3, l2=1e-2)
    return problem, problem.init_fn(jax.random.PRNGKey(0))


def test_permuting_hidden_units_keeps_the_function(mlp):
    problem, params = mlp
    rng = np.random.default_rng(0)
    copy = align.permute_mlp(params, [rng.permutation(6), rng.permutation(5)])
    x = problem.dataset.x_train
    np.testing.assert_allclose(problem.apply_fn(copy, x), problem.apply_fn(params, x),
                               rtol=1e-13, atol=1e-13)
    assert align.weight_distance(params, copy) > 1.0


def test_alignment_of_a_permuted_copy_is_exact_and_has_no_barrier(mlp):
    problem, params = mlp
    rng = np.random.default_rng(1)
    copy = align.permute_mlp(params, [rng.permutation(6), rng.permutation(5)])
    result = align.weight_matching(params, copy)
    assert result.distance_before > 1.0 and result.distance_after == 0.0
    theta_a, unravel = flatten(params)
    theta_b = flatten(jax.tree.map(jnp.asarray, result.params))[0]
    energy = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    line = jax.jit(lambda a, b: paths.line_energies(energy, a, b, 5))(theta_a, theta_b)
    assert float(paths.barrier_height(line)) == 0.0
    # a band from that line starts (and stays) at one point: no interior maximum, no saddle
    band = paths.Band(paths.linear_path(theta_a, theta_b, 5), line, 1, 0.0, 0.0, True, 0, 5)
    assert not bool(has_interior_maximum(band))


def test_alignment_never_increases_the_weight_distance(mlp):
    problem, _ = mlp
    for seed in range(6):
        a = problem.init_fn(jax.random.PRNGKey(10 + seed))
        b = problem.init_fn(jax.random.PRNGKey(20 + seed))
        result = align.weight_matching(a, b, seed=seed)
        assert result.distance_after <= result.distance_before + 1e-12
        assert result.distance_after == pytest.approx(align.weight_distance(a, result.params))


def test_hungarian_fallback_agrees_with_scipy():
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 12):
        score = rng.standard_normal((n, n))
        perm = align.hungarian(score)
        best = align.linear_assignment(score)
        assert sorted(perm) == list(range(n))
        rows = np.arange(n)
        assert score[rows, perm].sum() == pytest.approx(score[rows, best].sum(), abs=1e-12)


def test_certify_top_labels_a_minimum_as_drifted():
    cert = jax.jit(lambda t: certify_top(paths.muller_brown, t, jnp.zeros(2), follow_iters=0))(
        jnp.array([0.62, 0.03]))
    assert label_names(cert.label) == "drifted_to_minimum" and int(cert.n_neg) == 0


# ----------------------------------------------------------------------------- defaults


def test_defaults_converge_on_the_tested_surfaces_and_certify_the_known_saddles():
    """Under relax_band's defaults (500 Adam steps, climbing after 100, converged at 10⁻³ of
    the starting chain's largest gradient norm) every band here reports converged, and its
    certified top is the known saddle. With the earlier absolute 10⁻⁴ none of the Müller-Brown
    bands did (their perpendicular forces stall at 1e-2 to 0.3 for gradients of 10²-10³)."""
    toy_band = jax.jit(lambda a, b: paths.nudged_elastic_band(toy.toy_loss, a, b))(
        jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0]))
    assert bool(toy_band.converged)
    cert = jax.jit(lambda b: certify_band_top(toy.toy_loss, b))(toy_band)
    assert label_names(cert.label) == "index_1_saddle"
    np.testing.assert_allclose(cert.theta, [0.0, 0.0], atol=1e-8)

    f = paths.muller_brown
    minima = jax.jit(jax.vmap(lambda t: newton_critical_point(f, t).params))(
        jnp.asarray(paths.MULLER_BROWN_MINIMA))
    bands = jax.jit(lambda s, e: paths.many_bands(f, s, e))(minima[:2], minima[1:])
    np.testing.assert_array_equal(bands.converged, [True, True])
    assert np.all(np.asarray(bands.steps) < 500)  # stopped by the test, not the step bound
    # the threshold is 10⁻³ of the starting forces, which are 10² to 10³ here
    start = jax.vmap(lambda a, b: paths.linear_path(a, b, 11))(minima[:2], minima[1:])
    f0 = jnp.max(jnp.linalg.norm(jax.vmap(jax.vmap(jax.grad(f)))(start[:, 1:-1]), axis=2),
                 axis=1)
    np.testing.assert_allclose(bands.force_tol, 1e-3 * f0, rtol=1e-12)
    assert np.all(np.asarray(bands.perp_force) <= np.asarray(bands.force_tol))
    certs = jax.jit(jax.vmap(lambda b: certify_band_top(f, b)))(bands)
    np.testing.assert_array_equal(certs.label, [INDEX_1_SADDLE, INDEX_1_SADDLE])
    np.testing.assert_allclose(certs.theta, PUBLISHED_SADDLES, atol=1e-3)
    # an absolute tolerance is still honoured as given
    strict = jax.jit(lambda a, b: paths.nudged_elastic_band(f, a, b, force_tol=1e-4))(
        minima[0], minima[1])
    assert not bool(strict.converged) and float(strict.force_tol) == 1e-4


# ----------------------------------------------------------------------------- (c), point 5


def test_descent_connection_above_dense_max_params_forms_no_dense_hessian(monkeypatch):
    """Above ``dense_max_params`` the descent direction is a Lanczos Ritz vector (HVPs): with
    the dense Hessian made to fail, both Müller-Brown saddles still connect their minima."""
    import crit.mountain_pass as mp

    f = paths.muller_brown
    minima = jax.vmap(lambda t: newton_critical_point(f, t).params)(
        jnp.asarray(paths.MULLER_BROWN_MINIMA))
    images = jax.vmap(lambda a, b: paths.linear_path(a, b, 11))(minima[:2], minima[1:])
    saddles = jnp.asarray(PUBLISHED_SADDLES)

    def no_dense(*args, **kwargs):
        raise AssertionError("dense Hessian formed above dense_max_params")

    monkeypatch.setattr(mp, "dense_hessian", no_dense)
    conn = jax.jit(jax.vmap(lambda s, im: mp.descent_connection(
        f, s, im, 5, num_steps=1000, dense_max_params=1, lanczos_steps=2)))(saddles, images)
    np.testing.assert_array_equal(conn.connects, [True, True])


def test_lanczos_branch_says_index_ge_1_when_a_second_negative_eigenvalue_can_hide():
    """H = diag(−1, −1, 2): the Krylov space holds one vector of the double eigenvalue −1, so
    Lanczos breaks down after 2 steps with Ritz values −1, 2 and a residual-checked positive
    second one. That does not exclude a second negative eigenvalue (here there is one): the
    Lanczos label is index_ge_1, never index_1_saddle; the dense count is higher_index. A run
    that spans R^P (the toy, P = 2) keeps index_1_saddle."""
    def double(t):
        return -0.5 * t[0] ** 2 - 0.5 * t[1] ** 2 + t[2] ** 2

    def label(dense_max_params):
        cert = jax.jit(lambda t: certify_top(double, t, jnp.full(2, -1.0), follow_iters=0,
                                             dense_max_params=dense_max_params,
                                             lanczos_steps=3, lanczos_k=2))(jnp.zeros(3))
        return str(label_names(cert.label)), int(cert.n_neg)

    assert label(1) == ("index_ge_1", 1)
    assert label(100) == ("higher_index", 2)
    cert = certify_top(toy.toy_loss, jnp.array([0.01, -0.01]), jnp.zeros(2),
                       dense_max_params=1, lanczos_steps=2, lanczos_k=2)
    assert label_names(cert.label) == "index_1_saddle"


# ----------------------------------------------------------------------------- pytrees


def toy_tree_loss(params):
    """The lecture toy over a parameter pytree {"w1": (1,), "w2": ()}."""
    return (1.0 - params["w1"][0] * params["w2"]) ** 2


def as_tree(theta):
    return {"w1": theta[..., :1], "w2": theta[..., 1]}


def flat_chain(images):
    return paths.flatten_chain(images)[0]


def test_pytree_paths_api_agrees_with_the_flat_one():
    """One convention: every function takes a loss of a parameter pytree, points as pytrees and
    chains as stacked pytrees. On the toy as a pytree the band, its certified top, the line, the
    descent connection, AutoNEB and many bands agree with the same calls on flat vectors (a flat
    vector is the pytree of one leaf, so those are the earlier flat results)."""
    a, b = jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0])
    kw = dict(num_images=7, num_steps=300, climb_after=20)
    flat_band = jax.jit(lambda a, b: paths.nudged_elastic_band(toy.toy_loss, a, b, **kw))(a, b)
    tree_band = jax.jit(lambda a, b: paths.nudged_elastic_band(toy_tree_loss, a, b, **kw))(
        as_tree(a), as_tree(b))
    assert tree_band.images["w1"].shape == (7, 1) and tree_band.images["w2"].shape == (7,)
    np.testing.assert_allclose(flat_chain(tree_band.images), flat_band.images, atol=1e-12)
    np.testing.assert_allclose(tree_band.energies, flat_band.energies, atol=1e-12)
    assert int(tree_band.climbing) == int(flat_band.climbing)
    assert bool(tree_band.converged) == bool(flat_band.converged)
    np.testing.assert_allclose(paths.arc_length(tree_band.images),
                               paths.arc_length(flat_band.images), atol=1e-12)

    flat_cert = jax.jit(lambda b: certify_band_top(toy.toy_loss, b))(flat_band)
    tree_cert = jax.jit(lambda b: certify_band_top(toy_tree_loss, b))(tree_band)
    assert int(tree_cert.label) == int(flat_cert.label) == INDEX_1_SADDLE
    np.testing.assert_allclose(ravel_pytree(tree_cert.theta)[0],
                               flat_cert.theta, atol=1e-12)
    np.testing.assert_allclose(tree_cert.eigenvalues, flat_cert.eigenvalues, atol=1e-10)

    line = jax.jit(lambda loss, a, b: paths.line_energies(loss, a, b, 5), static_argnums=0)
    np.testing.assert_allclose(line(toy_tree_loss, as_tree(a), as_tree(b)),
                               line(toy.toy_loss, a, b), atol=1e-14)

    connect = jax.jit(lambda loss, s, im: descent_connection(loss, s, im, 3, num_steps=300),
                      static_argnums=0)
    flat_conn = connect(toy.toy_loss, flat_cert.theta, flat_band.images)
    tree_conn = connect(toy_tree_loss, tree_cert.theta, tree_band.images)
    np.testing.assert_allclose(flat_chain(tree_conn.ends), flat_conn.ends, atol=1e-10)
    assert bool(tree_conn.connects) == bool(flat_conn.connects)

    neb = jax.jit(lambda loss, a, b: paths.autoneb(loss, a, b, num_images=5, insertions=(2,),
                                                   num_steps=200, climb_after=20),
                  static_argnums=0)
    flat_neb = neb(toy.toy_loss, a, b)
    tree_neb = neb(toy_tree_loss, as_tree(a), as_tree(b))
    np.testing.assert_allclose(flat_chain(tree_neb.images), flat_neb.images, atol=1e-12)

    starts, ends = jnp.stack([a, -b]), jnp.stack([b, -a])
    many = jax.jit(lambda loss, s, e: paths.many_bands(loss, s, e, num_images=5, num_steps=200),
                   static_argnums=0)
    flat_many = many(toy.toy_loss, starts, ends)
    tree_many = many(toy_tree_loss, as_tree(starts), as_tree(ends))
    np.testing.assert_allclose(jax.vmap(flat_chain)(tree_many.images), flat_many.images,
                               atol=1e-12)


def test_line_energies_of_a_network_as_a_pytree_equal_the_flat_ones(mlp):
    problem, params = mlp
    other = problem.init_fn(jax.random.PRNGKey(3))
    theta_a, unravel = flatten(params)
    theta_b = flatten(other)[0]
    flat = paths.line_energies(lambda t: problem.loss_fn(unravel(t)), theta_a, theta_b, 5)
    tree = paths.line_energies(problem.loss_fn, params, other, 5)
    np.testing.assert_allclose(tree, flat, rtol=1e-13)
