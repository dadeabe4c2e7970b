"""What config.json records about the software and hardware a run used (no flags: any app, even
one that does not import experiments.common, can use it)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import crit

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "matplotlib", "absl-py",
            "scikit-learn", "mnist1d")


def environment(packages=PACKAGES) -> dict:
    """crit's version, Python, the platform, package versions, JAX devices, process count and
    ``jax_default_matmul_precision`` (None: JAX's default, TF32 / bfloat16 passes for float32
    dots on GPU / TPU).

    crit, Python and the package versions are what a resume compares (crit.store): results
    computed with other versions are never mixed into one run.
    """
    import jax

    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"crit": crit.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "packages": versions,
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "process_count": jax.process_count(),
            "matmul_precision": jax.config.jax_default_matmul_precision}
