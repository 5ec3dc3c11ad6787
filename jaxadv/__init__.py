"""jaxadv: fast, trustworthy adversarial robustness for image classifiers in JAX."""

from jaxadv._xla_flags import apply_cpu_defaults as _apply_cpu_defaults

_apply_cpu_defaults()  # before any JAX backend starts; see jaxadv/_xla_flags.py

__version__ = "0.1.0"
