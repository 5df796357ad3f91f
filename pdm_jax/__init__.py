"""pdm-jax: remaining-useful-life models in JAX/Flax that stop on one machine, resume on another."""

__version__ = "0.1.0"
