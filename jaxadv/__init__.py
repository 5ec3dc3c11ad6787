"""jaxadv: fast, trustworthy adversarial robustness for image classifiers in JAX."""

__version__ = "0.1.0"
