"""crit: critical points and Hessian spectra of neural-network loss surfaces, in JAX.

Importing crit turns on float64 in JAX (``jax_enable_x64``): spectra and critical-point
refinement need it. Training may still run in float32 (see ``crit.train``).
"""

import jax

jax.config.update("jax_enable_x64", True)

__version__ = "0.5.0"
