"""XLA:CPU defaults that jaxadv sets before JAX starts its backends.

Measured on this project's 2-core AMD EPYC with jax 0.10.2 (benchmarks/, same weights,
batch 128): with XLA:CPU's default library fusions, a program with backward convolutions
kept only ~1.2 of the 2 cores busy, and restricting the YNNPACK library fusions to dots
(`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT`) raised it to ~1.9:
forward + input gradient 450-540 -> 680-810 img/s, FGSM 450-485 -> 750, DeepFool
33.9 -> 42.5, the train step at batch 256 165-230 -> 345-380, the forward pass unchanged.
Results agree to float rounding: logits were identical and input gradients within 2e-7,
DeepFool's success rate and median L2 identical. Training trajectories are not bit-equal:
Adam can turn such last-bit differences into lr-sized parameter differences where a
coordinate's gradient is ~0 (see tests/test_parallel.py).

XLA reads XLA_FLAGS once, when the first backend starts, and aborts on a flag it does not
know, so the flag is added only when all of these hold:
  * `JAXADV_XLA_DEFAULTS` is not "0" (the opt-out);
  * XLA_FLAGS does not already choose the YNN fusion types (the user's setting wins);
  * the installed jaxlib is one this flag was verified with (0.10.2 up to 0.11);
  * no JAX backend has started yet (otherwise the flag would silently do nothing).
GPU and TPU backends ignore XLA:CPU flags.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
_VERIFIED = ((0, 10, 2), (0, 11, 0))  # [low, high) jaxlib versions


def _jaxlib_version() -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:3])
    except (PackageNotFoundError, ValueError):  # not installed as a distribution, or a dev version string
        return None


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a private API; if it moved, assume not started
        return False


def apply_cpu_defaults() -> bool:
    """Add jaxadv's XLA:CPU flag to XLA_FLAGS if it is safe and useful; True if added."""
    if os.environ.get("JAXADV_XLA_DEFAULTS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    v = _jaxlib_version()
    if v is None or not (_VERIFIED[0] <= v < _VERIFIED[1]):
        return False
    if _backends_started():
        _warn_too_late()
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


def _warn_too_late() -> None:
    """JAX already runs without the flag (a computation ran before `import jaxadv`): say so,
    once, with the fix, but only where it matters (the CPU backend)."""
    import warnings

    try:
        import jax

        if jax.default_backend() != "cpu":
            return
    except Exception:  # noqa: BLE001 - a warning must never break the import
        return
    warnings.warn(
        "jaxadv: JAX's CPU backend started before `import jaxadv`, so jaxadv's XLA:CPU flag is off and "
        "convolution gradients (attacks, training) run up to ~1.7x slower. Import jaxadv before the first JAX "
        f"computation, or start Python with XLA_FLAGS='{FLAG}' (JAXADV_XLA_DEFAULTS=0 silences this).",
        RuntimeWarning, stacklevel=3)  # fmt: skip
