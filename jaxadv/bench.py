"""Timing harness: compile time apart, warm-up, block on results, median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> dict:
    """Time `fn()` (which must return JAX arrays); the first call is the compile.

    Returns:
      {"compile_s": the first call (compilation plus one run; use `compile_seconds` for
       the compile alone), "times_s": steady-state seconds per call,
       "median_s", "min_s", "max_s"}
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def compile_seconds(jitted, *args, **kwargs) -> float:
    """Seconds to trace, lower and compile `jitted` for these arguments (no execution)."""
    t0 = time.perf_counter()
    jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - t0


def throughput(timing: dict, examples_per_call: int) -> dict:
    """Images/s from a `time_call` result: the median, and the spread from the fastest/slowest call."""
    return {
        "img_per_s": examples_per_call / timing["median_s"],
        "img_per_s_min": examples_per_call / timing["max_s"],
        "img_per_s_max": examples_per_call / timing["min_s"],
        "first_call_s": timing["compile_s"],
    }
