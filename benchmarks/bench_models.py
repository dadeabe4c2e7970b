"""HVP cost and memory on the model registry's CNN, ResNet-20 and Transformer (issue 12).

Run from the repository root::

    python -m benchmarks.bench_models              # ~5 min on 2 shared CPU cores
    python -m benchmarks.bench_models --skip_torch --no_contrast --models cnn,transformer

Every loss is ``crit.problems.model_problem(...).loss_fn``: the full-data softmax
cross-entropy over the N training rows, accumulated over ``eval_batch_size`` rows at a time
with ``jax.checkpoint`` per batch (eval batch 0: all rows at once), float64. Data:
CIFAR-shaped synthetic images, 32×32×3 standard normal pixels, 10 uniform random classes
(``--data digits`` puts the CNN on ``digits_images``, 8×8×1). Parameters: ``init_fn`` of key
0. ResNet-20's BatchNorm runs in eval mode on a state passed to ``loss_fn``: the running
statistics after one training-mode pass over the timing rows (momentum 0.9 from the
initial mean 0, variance 1), so that every state field is non-trivial.

1. Cost: gradient, ``jit(grad(L))``; HVP, the matvec of ``crit.hessian.hvp_operator``:
   ``jit`` of ``hvp_operator`` gives the gradient and the linearization (a
   ``jax.tree_util.Partial`` holding the residuals), then ``jit(lambda matvec, v: matvec(v))``
   is timed, one product per call with the residuals as arguments, as Lanczos reuses them.
   Gradient and HVP are timed alternately, ``--reps`` rounds after a warm-up of each (compile
   time excluded), ``block_until_ready``; medians, and the ratio as the median of the
   per-round ratios, so both see the same load on a shared machine. The linearization is
   timed once. Contrasts (``--no_contrast`` skips them): the same loss with
   ``eval_batch_size=0`` (no scan, no checkpoint), and the same checkpointed batches in a
   Python loop instead of ``lax.scan`` (not crit's code path); their Hv are compared with the
   unbatched one.
2. Memory (XLA's ``compile().memory_analysis()``, nothing run): temporary bytes, i.e. without
   arguments, outputs and the data (a compile-time constant), for N and 10·N rows with the
   same ``eval_batch_size``, and with ``eval_batch_size=0``. Columns: the gradient; one HVP
   in one jit (linearization + product, what ``crit.hessian.hvp`` costs); the residuals the
   shared linearization keeps between products (``eval_shape``); one product given them.
3. PyHessian (optional: ``pip install torch==2.13.0`` then ``pip install --no-deps pyhessian``;
   plain ``torch`` pulls a CUDA build): the same ResNet-20 in PyTorch with crit's weights
   and running statistics, float64, eval mode, on the same N rows. ``pyhessian.hessian``
   builds its gradient once with ``create_graph=True``; one product is
   ``pyhessian.utils.hessian_vector_product`` (double backward through the retained graph).
   The loss and Hv are compared with crit's. Without torch or pyhessian the part is skipped
   and the reason printed.

Targets (issue 12): HVP <= 2 gradients for each model; the HVP's temporary memory at 10·N
within 10% of that at N.

XLA on CPU runs float64 convolutions far below its float32 speed (the first line of the
output measures both); this is why the ResNet is timed on a few dozen images.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from benchmarks.bench_hvp import timeit  # median and min of reps after a warm-up
from crit.data import Dataset, digits_images_dataset
from crit.hessian import hvp_operator
from crit.problems import model_problem

MODELS = ("cnn", "resnet", "transformer")
HPARAMS = {
    "cnn": {},  # registry defaults: channels (6, 16), hidden (64,), relu, kernel 5
    "resnet": {"depth": 20, "width": 16},  # BatchNorm, eval mode
    "transformer": {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "patch": 4},
}
MIB = 2.0 ** 20


def keyed(text: str, cast=int) -> dict[str, int]:
    """'cnn=256,resnet=32' -> {'cnn': 256, 'resnet': 32}."""
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        if k not in MODELS:
            raise SystemExit(f"unknown model {k!r} in {text!r}; known: {', '.join(MODELS)}")
        out[k] = cast(v)
    return out


def synthetic_images(n: int, seed: int = 0) -> Dataset:
    """CIFAR-shaped data: (n, 32, 32, 3) standard normal pixels, 10 uniform random classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32, 32, 3))
    y = rng.integers(0, 10, size=n)
    return Dataset("synthetic32x32x3", x, y, x[:0], y[:0], "classification", 10)


def make_data(model: str, n: int, data: str) -> Dataset:
    if model == "cnn" and data == "digits":
        return digits_images_dataset(n_points=n)
    return synthetic_images(n)




def build(model, n, batch, data, **overrides):
    problem = model_problem(model, make_data(model, n, data), eval_batch_size=batch,
                            **{**HPARAMS[model], **overrides})
    params = problem.init_fn(jax.random.PRNGKey(0))
    state = problem.init_state_fn(jax.random.PRNGKey(0))
    if problem.has_state:  # one training-mode pass: non-trivial running statistics
        d = problem.dataset
        _, state = jax.jit(problem.train_loss_fn)(params, state, d.x_train, d.y_train,
                                                   jax.random.PRNGKey(1))
    return problem, params, state


# --------------------------------------------------------------------------- 1. cost

def timeit_pair(fa, fb, reps):
    """Time fa and fb alternately (a, b, a, b, ...) after a warm-up of each, so that both see
    the same load on a shared machine. Returns ((median, min) of a, (median, min) of b,
    median of the per-round ratios b / a)."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ratio = float(np.median(np.asarray(tb) / np.asarray(ta)))
    return ((float(np.median(ta)), float(np.min(ta))),
            (float(np.median(tb)), float(np.min(tb))), ratio)


def unrolled_loss(problem, state, batch):
    """crit's full-data loss with its batches in a Python loop instead of ``lax.scan`` (each
    still under ``jax.checkpoint``, weights n_b / N): a contrast, not crit's code path."""
    x, y = jnp.asarray(problem.dataset.x_train), jnp.asarray(problem.dataset.y_train)
    n = x.shape[0]
    one = jax.checkpoint(lambda p, xb, yb: problem.batch_loss_fn(p, xb, yb, state))
    spans = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    return lambda p: sum(one(p, x[s:e], y[s:e]) * ((e - s) / n) for s, e in spans)


def bench_cost(model, n, batch, reps, data, variant="crit", v_seed=1):
    """Gradient and shared-linearization HVP of the full-data loss. ``variant``: "crit"
    (``problem.loss_fn``), "xla_conv" (the same with ``conv="xla"``: XLA's own convolution
    instead of the default shifted products) or "unrolled" (:func:`unrolled_loss`, same
    batches)."""
    overrides = {"conv": "xla"} if variant == "xla_conv" else {}
    problem, params, state = build(model, n, batch if variant != "unrolled" else 0, data,
                                   **overrides)
    theta, unravel = ravel_pytree(params)
    loss = (unrolled_loss(problem, state, batch) if variant == "unrolled"
            else problem.bind_state(state))
    f = lambda t: loss(unravel(t))  # noqa: E731
    v = jax.random.normal(jax.random.PRNGKey(v_seed), theta.shape, theta.dtype)
    grad = jax.jit(jax.grad(f))
    linearize = jax.jit(lambda t: hvp_operator(f, t))
    apply = jax.jit(lambda matvec, u: matvec(u))
    out = {"P": problem.n_params, "data": problem.dataset.name}
    jax.block_until_ready(linearize(theta))  # compile
    t = time.perf_counter()
    g, matvec = jax.block_until_ready(linearize(theta))
    out["linearize"] = time.perf_counter() - t
    out["grad"], out["hvp"], out["ratio"] = timeit_pair(
        lambda: grad(theta).block_until_ready(), lambda: apply(matvec, v).block_until_ready(),
        reps)
    out["residual_mib"] = sum(leaf.nbytes for leaf in jax.tree.leaves(matvec)) / MIB
    out["hv"] = np.asarray(apply(matvec, v))
    out["grad_err"] = float(np.linalg.norm(np.asarray(g) - np.asarray(grad(theta)))
                            / np.linalg.norm(np.asarray(g)))
    out["loss"] = float(jax.jit(f)(theta))
    return out, (problem, params, state, v)


# --------------------------------------------------------------------------- 2. memory

def bench_memory(model, n, batch, data):
    problem = model_problem(model, make_data(model, n, data), eval_batch_size=batch,
                            **HPARAMS[model])
    params = jax.eval_shape(problem.init_fn, jax.random.PRNGKey(0))
    state = jax.eval_shape(problem.init_state_fn, jax.random.PRNGKey(0))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    _, unravel = ravel_pytree(zeros)
    theta = jax.ShapeDtypeStruct((problem.n_params,), jnp.float64)

    def flat(s):
        return lambda t: problem.loss_fn(unravel(t), s)

    def temp(fn, *args):
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
        return m.temp_size_in_bytes / MIB

    out = {"grad": temp(lambda t, s: jax.grad(flat(s))(t), theta, state),
           "hvp": temp(lambda t, v, s: hvp_operator(flat(s), t)[1](v), theta, theta, state)}
    _, matvec = jax.eval_shape(lambda t, s: hvp_operator(flat(s), t), theta, state)
    out["residuals"] = sum(leaf.size * leaf.dtype.itemsize
                           for leaf in jax.tree.leaves(matvec)) / MIB
    out["product"] = temp(lambda m, v: m(v), matvec, theta)
    out["data"] = problem.dataset.x_train.nbytes / MIB
    return out


# --------------------------------------------------------------------------- 3. PyHessian

def get(tree, path):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def torch_resnet(torch, params, state, depth, width, n_outputs):
    """crit's ResNet (crit.models.resnet) in PyTorch with crit's weights and statistics."""
    nn, F = torch.nn, torch.nn.functional

    def conv_bn(cin, cout, k, stride):
        return nn.Conv2d(cin, cout, k, stride, padding=(k // 2 if stride == 1 else 0),
                         bias=False), nn.BatchNorm2d(cout, eps=1e-5)

    class Block(nn.Module):
        def __init__(self, cin, c, stride):
            super().__init__()
            self.stride = stride
            self.conv0, self.bn0 = conv_bn(cin, c, 3, stride)
            self.conv1, self.bn1 = conv_bn(c, c, 3, 1)
            self.short = stride != 1 or cin != c
            if self.short:
                self.conv2, self.bn2 = conv_bn(cin, c, 1, stride)

        def forward(self, x):
            # XLA's 'SAME' with stride 2 on an even size pads one row/column after, none before
            h = F.pad(x, (0, 1, 0, 1)) if self.stride == 2 else x
            y = F.relu(self.bn0(self.conv0(h)))
            y = self.bn1(self.conv1(y))
            s = self.bn2(self.conv2(x)) if self.short else x
            return F.relu(s + y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn(3, width, 3, 1)
            blocks, cin = [], width
            for stage in range(3):
                for b in range((depth - 2) // 6):
                    c = width * 2 ** stage
                    blocks.append(Block(cin, c, 2 if stage > 0 and b == 0 else 1))
                    cin = c
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, n_outputs)

        def forward(self, x):  # x: NHWC like crit's data
            h = F.relu(self.bn(self.conv(x.permute(0, 3, 1, 2))))
            return self.fc(self.blocks(h).mean(dim=(2, 3)))

    net = Net().double()
    p, s = params["params"], state["batch_stats"]
    pairs = [(("Conv_0",), net.conv, ("_Norm_0",), net.bn)]
    for i, blk in enumerate(net.blocks):
        for j in range(3 if blk.short else 2):
            pairs.append(((f"_Block_{i}", f"Conv_{j}"), getattr(blk, f"conv{j}"),
                          (f"_Block_{i}", f"_Norm_{j}"), getattr(blk, f"bn{j}")))
    # (flax path, torch tensor, from-flax transform, to-flax transform) for every parameter
    mapping = []
    for cpath, conv, npath, bn in pairs:
        mapping.append((cpath + ("kernel",), conv.weight, lambda a: a.transpose(3, 2, 0, 1),
                        lambda a: a.transpose(2, 3, 1, 0)))
        for name, tensor in (("scale", bn.weight), ("bias", bn.bias)):
            mapping.append((npath + ("BatchNorm_0", name), tensor, lambda a: a, lambda a: a))
        stats = get(s, npath + ("BatchNorm_0",))
        bn.running_mean.copy_(torch.from_numpy(np.array(stats["mean"])))
        bn.running_var.copy_(torch.from_numpy(np.array(stats["var"])))
    mapping.append((("Dense_0", "kernel"), net.fc.weight, lambda a: a.T, lambda a: a.T))
    mapping.append((("Dense_0", "bias"), net.fc.bias, lambda a: a, lambda a: a))
    with torch.no_grad():
        for path, tensor, to_torch, _ in mapping:
            value = np.array(to_torch(np.asarray(get(p, path))), order="C")
            tensor.copy_(torch.from_numpy(value))
    if len(mapping) != len(list(net.parameters())):
        raise RuntimeError("the port misses parameters")
    return net.eval(), mapping


def bench_pyhessian(crit_out, ctx, reps, power_iters=100, slq_steps=30):
    try:
        import torch
    except ImportError as exc:
        return f"skipped: torch not installed ({exc}); `pip install torch==2.13.0`"
    try:
        from pyhessian import hessian as pyhessian_hessian
        from pyhessian.utils import hessian_vector_product
    except ImportError as exc:
        return f"skipped: pyhessian not installed ({exc}); `pip install --no-deps pyhessian`"
    torch.set_num_threads(os.cpu_count() or 1)
    problem, params, state, v = ctx
    d = problem.dataset
    net, mapping = torch_resnet(torch, params, state, HPARAMS["resnet"]["depth"],
                                HPARAMS["resnet"]["width"], d.n_outputs)
    x = torch.from_numpy(np.asarray(d.x_train, dtype=np.float64))
    y = torch.from_numpy(np.asarray(d.y_train, dtype=np.int64))
    criterion = torch.nn.CrossEntropyLoss()
    tparams = [t for _, t, _, _ in mapping]

    def tree_to_torch(flat):
        tree = ravel_pytree(params)[1](jnp.asarray(flat))["params"]
        return [torch.from_numpy(np.array(to_t(np.asarray(get(tree, path))), order="C"))
                for path, _, to_t, _ in mapping]

    def torch_to_flat(tensors):
        tree = jax.tree.map(np.zeros_like, jax.tree.map(np.asarray, params))
        for (path, _, _, to_f), t in zip(mapping, tensors):
            leaf = get(tree["params"], path)
            leaf[...] = to_f(t.detach().numpy())
        return np.asarray(ravel_pytree(tree)[0])

    def grad():
        net.zero_grad(set_to_none=True)
        return torch.autograd.grad(criterion(net(x), y), tparams)

    out = {"torch": torch.__version__}
    grad()  # warm-up before the one-off setup is timed
    t = time.perf_counter()
    net.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # PyHessian's loss.backward(create_graph=True)
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
        hc = pyhessian_hessian(net, criterion, data=(x, y), cuda=False)
    out["setup"] = time.perf_counter() - t
    # PyHessian's parameter order is net.parameters(); mapping holds the same tensors
    order = {id(t): i for i, t in enumerate(tparams)}
    perm = [order[id(t)] for t in hc.params]
    vt = tree_to_torch(np.asarray(v))
    vt = [vt[i] for i in perm]
    out["grad"], out["hvp"], out["ratio"] = timeit_pair(
        grad, lambda: hessian_vector_product(hc.gradsH, hc.params, vt), reps)
    hv = hessian_vector_product(hc.gradsH, hc.params, vt)
    back = [None] * len(hv)
    for k, i in enumerate(perm):
        back[i] = hv[k]
    hv = torch_to_flat(back)
    with torch.no_grad():
        out["loss"] = float(criterion(net(x), y))
    out["loss_err"] = abs(out["loss"] - crit_out["loss"]) / abs(crit_out["loss"])
    out["hv_err"] = float(np.linalg.norm(hv - crit_out["hv"]) / np.linalg.norm(crit_out["hv"]))
    out.update(spectra_side_by_side(torch, hc, ctx, perm, torch_to_flat, power_iters,
                                    slq_steps))
    return out


def pyhessian_shims(torch):
    """What PyHessian 0.1 needs to run on a float64 model under torch 2.x, changing no number:
    its vectors are drawn with torch's default dtype (float32, which a float64 graph refuses),
    and its ``density`` calls ``torch.eig``, removed in torch 1.13 (replaced here by
    ``torch.linalg.eigh`` of the same symmetric tridiagonal, eigenvalues in the first column
    of an (m, 2) array as ``torch.eig`` returned them)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.eig(torch.eye(2), eigenvectors=True)
    except (AttributeError, RuntimeError):  # torch >= 1.13: a stub that raises
        def eig(matrix, eigenvectors=True):
            values, vectors = torch.linalg.eigh(matrix)
            return torch.stack([values, torch.zeros_like(values)], 1), vectors
        torch.eig = eig


def spectra_side_by_side(torch, hc, ctx, perm, torch_to_flat, power_iters, slq_steps):
    """λ_max (PyHessian's power iteration against crit's Lanczos) and one SLQ run from the same
    Rademacher vector (PyHessian's ``density`` against crit's ``lanczos_tridiag``), with HVP
    counts and times. crit's products use the batched loss of the timed row."""
    import importlib
    pyh = importlib.import_module("pyhessian.hessian")
    from crit.lanczos import lanczos_tridiag, tridiag_eigh

    pyhessian_shims(torch)
    problem, params, state, _ = ctx
    theta, unravel = ravel_pytree(params)
    f = lambda t: problem.bind_state(state)(unravel(t))  # noqa: E731
    _, matvec = jax.jit(lambda t: hvp_operator(f, t))(theta)
    calls = {"n": 0}
    original = pyh.hessian_vector_product

    def counted(*args):
        calls["n"] += 1
        return original(*args)

    pyh.hessian_vector_product = counted
    utils = importlib.import_module("pyhessian.utils")
    shipped = utils.normalization

    def exact_normalization(v):  # PyHessian's, without the 1e-6 it adds to every norm
        norm = float(utils.group_product(v, v)) ** 0.5
        return [vi / norm for vi in v]

    out = {}
    try:
        for tag, normalization in (("pyh", shipped), ("pyh_exact", exact_normalization)):
            utils.normalization = pyh.normalization = normalization
            calls["n"] = 0
            t = time.perf_counter()
            torch.manual_seed(0)
            top, _ = hc.eigenvalues(maxIter=power_iters, tol=1e-10, top_n=1)
            out[f"{tag}_top"], out[f"{tag}_top_s"], out[f"{tag}_top_hvps"] = (
                float(top[0]), time.perf_counter() - t, calls["n"])
            # PyHessian's density draws its Rademacher probe first: same seed, same probe
            torch.manual_seed(1)
            probe = [torch.randint_like(p, high=2) for p in hc.params]
            for p in probe:
                p[p == 0] = -1
            calls["n"] = 0
            t = time.perf_counter()
            torch.manual_seed(1)
            nodes, weights = hc.density(iter=slq_steps, n_v=1)
            out[f"{tag}_slq_s"], out[f"{tag}_slq_hvps"] = time.perf_counter() - t, calls["n"]
            order = np.argsort(nodes[0])
            out[f"{tag}_nodes"] = np.asarray(nodes[0])[order]
            out[f"{tag}_weights"] = np.asarray(weights[0])[order]
    finally:
        pyh.hessian_vector_product = original
        utils.normalization = pyh.normalization = shipped
    back = [None] * len(probe)
    for k, i in enumerate(perm):
        back[i] = probe[k]
    v0 = jnp.asarray(torch_to_flat(back))

    def ritz(steps, start):
        run = jax.jit(lambda mv, v: lanczos_tridiag(mv, v, steps, return_basis=False))
        jax.block_until_ready(run(matvec, start))  # compile
        t = time.perf_counter()
        res = jax.block_until_ready(run(matvec, start))
        values, vectors = tridiag_eigh(res.alphas, res.betas, res.valid)
        residuals = np.abs(np.asarray(res.betas[-1] * vectors[-1, :]))
        return (np.asarray(values), np.asarray(vectors[0, :]) ** 2, residuals,
                time.perf_counter() - t)

    values, _, residuals, seconds = ritz(power_iters // 2, jax.random.normal(
        jax.random.PRNGKey(0), theta.shape, theta.dtype))
    out["crit_top"], out["crit_top_res"], out["crit_top_s"], out["crit_top_hvps"] = (
        float(values[-1]), float(residuals[-1]), seconds, power_iters // 2)
    values, weights, _, seconds = ritz(slq_steps, v0)
    out["crit_nodes"], out["crit_weights"], out["crit_slq_s"] = values, weights, seconds
    return out


# --------------------------------------------------------------------------- main

def conv_throughput():
    """GFLOP/s of one 3×3, 16→16 'SAME' convolution on (64, 32, 32, 16), forward only: XLA's
    convolution in float32 and float64, crit's shifted products (``crit.models.conv``) in
    float64, and PyTorch's ``conv2d`` in float64 and float32 where torch is installed."""
    from crit.models.conv import shifted_conv
    flops = 2 * 64 * 32 * 32 * 16 * 16 * 9
    out = {}
    for name, conv, dtype in (("xla float32", jax.lax.conv_general_dilated, jnp.float32),
                              ("xla float64", jax.lax.conv_general_dilated, jnp.float64),
                              ("shifted float64", shifted_conv, jnp.float64)):
        x = jax.random.normal(jax.random.PRNGKey(0), (64, 32, 32, 16), dtype)
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16), dtype)
        f = jax.jit(lambda a, b, conv=conv: conv(a, b, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        med, _ = timeit(lambda: f(x, w).block_until_ready(), 5)
        out[name] = flops / med / 1e9
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(os.cpu_count() or 1)
    for dtype in (torch.float64, torch.float32):
        x, w = torch.randn(64, 16, 32, 32, dtype=dtype), torch.randn(16, 16, 3, 3, dtype=dtype)
        with torch.no_grad():
            med, _ = timeit(lambda: torch.nn.functional.conv2d(x, w, padding=1), 5)
        out[f"torch {str(dtype).split('.')[-1]}"] = flops / med / 1e9
    return out


def flop_ratios(model, n, batch, data):
    """XLA's flop count (``compile().cost_analysis()``) of the gradient and of one product of
    the shared linearization. A ``lax.scan`` body is counted once, so with eval batches both
    are per batch; the ratio is what an HVP costs in gradients at equal FLOP/s."""
    problem, params, state = build(model, n, batch, data)
    theta, unravel = ravel_pytree(params)
    f = lambda t: problem.bind_state(state)(unravel(t))  # noqa: E731

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    _, matvec = jax.jit(lambda t: hvp_operator(f, t))(theta)
    grad = flops(jax.grad(f), theta)
    return {"grad": grad, "hvp": flops(lambda m, u: m(u), matvec, theta)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,resnet,transformer",
                        help="models to time and measure (comma list)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--time_n", default="cnn=256,resnet=32,transformer=256",
                        help="rows N of the timed full-data loss, per model")
    parser.add_argument("--time_batch", default="cnn=64,resnet=8,transformer=64",
                        help="eval_batch_size of the timed loss, per model")
    parser.add_argument("--no_contrast", action="store_true",
                        help="time crit's batched loss only: skip the eval_batch_size=0 and "
                             "Python-loop contrasts")
    parser.add_argument("--mem_n", type=int, default=256,
                        help="N of the memory part (also measured at 10·N)")
    parser.add_argument("--mem_batch", type=int, default=32,
                        help="eval_batch_size of the memory part")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic",
                        help="the CNN's data: 32x32x3 synthetic images or digits_images (8x8x1)")
    parser.add_argument("--skip_torch", action="store_true", help="skip the PyHessian part")
    parser.add_argument("--power_iters", type=int, default=100,
                        help="PyHessian's power iterations for λ_max (crit's Lanczos: half)")
    parser.add_argument("--slq_steps", type=int, default=30,
                        help="Lanczos steps of the side-by-side SLQ run")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    time_n, time_batch = keyed(args.time_n), keyed(args.time_batch)
    missing = [m for m in models if m not in time_n or m not in time_batch]
    if missing:
        raise SystemExit(f"--time_n and --time_batch need an entry for {', '.join(missing)}")
    if args.data == "digits" and "cnn" in models and 10 * args.mem_n > 1796:
        raise SystemExit(f"--data digits has 1796 training images at most; 10·--mem_n = "
                         f"{10 * args.mem_n}")
    start = time.perf_counter()
    print(f"# Model benchmark (issue 12), {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"{platform.platform()}, load average {os.getloadavg()[0]:.1f} (shared machine: "
          f"timings are preliminary), jax {jax.__version__} on {jax.default_backend()}, "
          f"float64")
    conv = conv_throughput()
    print("convolution 3x3 16->16 on 64x32x32, forward, GFLOP/s: " + ", ".join(
        f"{k} {v:.1f}" for k, v in conv.items()) + f" (XLA float64 is "
        f"{conv['xla float32'] / conv['xla float64']:.0f}x slower than float32; crit's shifted "
        f"products {conv['shifted float64'] / conv['xla float64']:.2f}x XLA's float64)")
    hp = {m: ", ".join(f"{k}={v}" for k, v in HPARAMS[m].items()) or "registry defaults"
          for m in MODELS}
    print("models: " + "; ".join(f"{m} ({hp[m]})" for m in models) + "\n")

    # 1. cost
    print(f"## 1. HVP (shared linearization) vs gradient of the full-data loss, {args.reps} "
          "rounds of (gradient, HVP) after a warm-up: medians (min)\n")
    print("| model | data | P | N | loss | gradient ms | HVP ms | HVP / gradient | "
          "linearization ms (once) | residuals MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results, ctx_resnet = {}, None
    for m in models:
        n, b = time_n[m], time_batch[m]
        variants = [("crit", b)]
        if not args.no_contrast and b:
            variants += [("crit", 0), ("unrolled", b)]
        if not args.no_contrast and m in ("cnn", "resnet"):
            variants += [("xla_conv", b)]
        for variant, batch in variants:
            r, ctx = bench_cost(m, n, batch, args.reps, args.data, variant)
            results[m, variant, batch] = r
            if m == "resnet" and (variant, batch) == ("crit", b):
                ctx_resnet = (r, ctx)
            label = (f"crit, eval batch {batch}" if variant == "crit" and batch else
                     "crit, eval batch 0 (all rows)" if variant == "crit" else
                     f"contrast: eval batch {batch}, XLA's convolution (conv=xla)"
                     if variant == "xla_conv" else
                     f"contrast: batches of {batch} in a Python loop")
            print(f"| {m} | {r['data']} | {r['P']:,} | {n} | {label} | "
                  f"{1e3 * r['grad'][0]:.0f} ({1e3 * r['grad'][1]:.0f}) | "
                  f"{1e3 * r['hvp'][0]:.0f} ({1e3 * r['hvp'][1]:.0f}) | {r['ratio']:.2f} | "
                  f"{1e3 * r['linearize']:.0f} | {r['residual_mib']:.1f} |", flush=True)
    print("\n(HVP / gradient: median over the rounds of the ratio within a round. crit's "
          "batched loss scans its batches with lax.scan under jax.checkpoint; the contrast "
          "row runs the same checkpointed batches unrolled, which is not crit's code path.)\n")
    for m in models:
        b = time_batch[m]
        rb = results[m, "crit", b]
        verdict = "met" if rb["ratio"] <= 2 else "NOT met"
        line = (f"- {m}, eval batch {b}: HVP / gradient = {rb['ratio']:.2f} (target <= 2: "
                f"{verdict})")
        if (m, "crit", 0) in results:
            r0, ru = results[m, "crit", 0], results[m, "unrolled", b]
            diff = lambda r: (np.linalg.norm(r["hv"] - r0["hv"])  # noqa: E731
                              / np.linalg.norm(r0["hv"]))
            line += (f"; unbatched {r0['ratio']:.2f}, Python loop {ru['ratio']:.2f}; "
                     f"against the unbatched loss the batched gradient costs "
                     f"{rb['grad'][0] / r0['grad'][0]:.2f}x and its HVP "
                     f"{rb['hvp'][0] / r0['hvp'][0]:.2f}x (Python loop: "
                     f"{ru['grad'][0] / r0['grad'][0]:.2f}x, {ru['hvp'][0] / r0['hvp'][0]:.2f}x); "
                     f"Hv vs unbatched: relative difference {diff(rb):.1e} (Python loop "
                     f"{diff(ru):.1e})")
        if (m, "xla_conv", b) in results:
            rx = results[m, "xla_conv", b]
            line += (f"; with XLA's own convolution (conv=xla) the gradient takes "
                     f"{rx['grad'][0] / rb['grad'][0]:.2f}x and the HVP "
                     f"{rx['hvp'][0] / rb['hvp'][0]:.2f}x crit's default (ratio {rx['ratio']:.2f})")
        line += f"; gradient from the linearization vs jit(grad): {rb['grad_err']:.1e}"
        print(line)
    print("\nFlop floor (XLA cost analysis): one HVP product in gradients at equal FLOP/s. "
          "With eval batches the linearization keeps only each batch's inputs, so every "
          "product recomputes the batch's forward and backward pass:\n")
    for m in models:
        parts = []
        for batch in (time_batch[m], 0):
            fr = flop_ratios(m, time_n[m], batch, args.data)
            parts.append(f"eval batch {batch or 'all'}: {fr['hvp'] / fr['grad']:.2f} "
                         f"({fr['hvp'] / 1e9:.3f} / {fr['grad'] / 1e9:.3f} GFLOP)")
        print(f"- {m}: " + "; ".join(parts))
    print(f"\n({time.perf_counter() - start:.0f} s so far)\n")

    # 2. memory
    n1, n2 = args.mem_n, 10 * args.mem_n
    print(f"## 2. Temporary memory (XLA memory analysis, MiB; no arguments, outputs or data), "
          f"N = {n1} and 10·N = {n2}\n")
    print("| model | eval batch | N | gradient | HVP (one jit) | shared: residuals | "
          "shared: one product | (data x, for scale) |")
    print("|---|---|---|---|---|---|---|---|")
    mem = {}
    for m in models:
        for batch in (args.mem_batch, 0):
            for n in (n1, n2):
                r = bench_memory(m, n, batch, args.data)
                mem[m, batch, n] = r
                print(f"| {m} | {batch or 'all (0)'} | {n} | {r['grad']:.1f} | {r['hvp']:.1f} | "
                      f"{r['residuals']:.1f} | {r['product']:.1f} | {r['data']:.1f} |",
                      flush=True)
    print()
    for m in models:
        a, z = mem[m, args.mem_batch, n1], mem[m, args.mem_batch, n2]
        growth = z["hvp"] / a["hvp"] - 1
        peak_a = a["residuals"] + a["product"]
        peak_z = z["residuals"] + z["product"]
        verdict = "met" if abs(growth) <= 0.10 else "NOT met"
        u1, u2 = mem[m, 0, n1]["hvp"], mem[m, 0, n2]["hvp"]
        print(f"- {m}, eval batch {args.mem_batch}: HVP temporary {a['hvp']:.1f} -> "
              f"{z['hvp']:.1f} MiB from N = {n1} to {n2} ({100 * growth:+.1f}%, target within "
              f"10%: {verdict}); shared linearization (residuals + one product) {peak_a:.1f} -> "
              f"{peak_z:.1f} MiB ({100 * (peak_z / peak_a - 1):+.1f}%); unbatched HVP "
              f"{u1:.1f} -> {u2:.1f} MiB ({u2 / u1:.1f}x)")
    print(f"\n({time.perf_counter() - start:.0f} s so far)\n")

    # 3. PyHessian
    print("## 3. PyHessian on the same ResNet-20, weights and BatchNorm statistics\n")
    if args.skip_torch:
        print("skipped: --skip_torch")
    elif ctx_resnet is None:
        print("skipped: resnet not among --models")
    else:
        crit_out, ctx = ctx_resnet
        out = bench_pyhessian(crit_out, ctx, args.reps, args.power_iters, args.slq_steps)
        if isinstance(out, str):
            print(out)
        else:
            g = crit_out["grad"][0]
            n = ctx[0].dataset.n_train
            print(f"torch {out['torch']}, {torch_threads()} threads, N = {n}, float64, eval mode; "
                  f"crit's loss over the same N rows with eval batch "
                  f"{time_batch['resnet']}\n")
            print("| method | median ms | min ms | / crit gradient |")
            print("|---|---|---|---|")
            rows = [("crit gradient, jit(grad)", crit_out["grad"]),
                    ("crit HVP, shared linearization", crit_out["hvp"]),
                    ("torch gradient, autograd.grad", out["grad"]),
                    ("PyHessian setup: gradient with create_graph=True (once)",
                     (out["setup"], out["setup"])),
                    ("PyHessian HVP, hessian_vector_product", out["hvp"])]
            for name, (med, best) in rows:
                print(f"| {name} | {1e3 * med:.0f} | {1e3 * best:.0f} | {med / g:.2f} |")
            print()
            print(f"- PyHessian HVP / torch gradient = {out['ratio']:.2f}; "
                  f"crit HVP / PyHessian HVP = {crit_out['hvp'][0] / out['hvp'][0]:.2f} "
                  f"(> 1: crit slower)")
            print(f"- agreement: loss relative difference {out['loss_err']:.1e}, "
                  f"||Hv_crit - Hv_pyhessian|| / ||Hv_crit|| = {out['hv_err']:.1e}")
            print(f"- λ_max: crit Lanczos {out['crit_top']:.12g} (residual bound "
                  f"{out['crit_top_res']:.1e}, {out['crit_top_hvps']} HVPs, "
                  f"{out['crit_top_s']:.1f} s)")
            scale = np.max(np.abs(out["crit_nodes"]))
            k = min(5, len(out["crit_nodes"]))
            for tag, label in (("pyh", "PyHessian as shipped"),
                               ("pyh_exact", "PyHessian without the 1e-6 its normalization "
                                             "adds to every norm")):
                top_err = abs(out[f"{tag}_top"] - out["crit_top"]) / abs(out["crit_top"])
                node_err = np.max(np.abs(out["crit_nodes"] - out[f"{tag}_nodes"])) / scale
                weight_err = np.max(np.abs(out["crit_weights"] - out[f"{tag}_weights"]))
                print(f"- {label}: power iteration (tol 1e-10) λ_max {out[f'{tag}_top']:.12g} "
                      f"({out[f'{tag}_top_hvps']} HVPs, {out[f'{tag}_top_s']:.1f} s; crit's "
                      f"time / PyHessian's {out['crit_top_s'] / out[f'{tag}_top_s']:.2f}); "
                      f"relative difference from crit {top_err:.1e} (target 1e-6: "
                      f"{'met' if top_err <= 1e-6 else 'NOT met'}). SLQ, one Rademacher probe, "
                      f"{args.slq_steps} Lanczos steps from the same vector: PyHessian density "
                      f"{out[f'{tag}_slq_s']:.1f} s ({out[f'{tag}_slq_hvps']} HVPs), crit "
                      f"{out['crit_slq_s']:.1f} s (time ratio "
                      f"{out['crit_slq_s'] / out[f'{tag}_slq_s']:.2f}); nodes agree to "
                      f"{node_err:.1e}·max|node|, weights to {weight_err:.1e}; top {k} nodes "
                      "crit " + ", ".join(f"{v:.9g}" for v in out["crit_nodes"][-k:])
                      + "; PyHessian " + ", ".join(f"{v:.9g}" for v in out[f"{tag}_nodes"][-k:]))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average at the end "
          f"{os.getloadavg()[0]:.1f}")


def torch_threads():
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
