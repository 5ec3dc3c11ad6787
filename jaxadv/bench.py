"""Timing harness: compile time apart, warm-up, block on results, median of repeats."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import jax


def _first_and_warmup(fn: Callable[[], Any], warmup: int, min_warmup_s: float, min_sample_s: float):
    """The first (compiling) call's seconds, and how many calls make one timed sample."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    warm, n, t_start = [], 0, time.perf_counter()
    while n < warmup or (time.perf_counter() - t_start < min_warmup_s and n < 10_000):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
        n += 1
    est = statistics.median(warm) if warm else compile_s
    return compile_s, max(1, min(10_000, math.ceil(min_sample_s / max(est, 1e-9))))


def _sample(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / inner


def _summary(compile_s: float, times: list[float], inner: int) -> dict:
    return {
        "compile_s": compile_s,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "calls_per_sample": inner,
    }


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_warmup_s: float = 0.25,
    min_sample_s: float = 0.01,
) -> dict:
    """Time `fn()` (which must return JAX arrays, or anything already computed); the first call is the compile.

    Warm-up runs at least `warmup` calls and at least `min_warmup_s` seconds: sub-ms
    kernels run 2-4x slower for their first calls (thread pool wake-up, page faults), so a
    fixed count of one or two calls is not a steady state. Each of the `repeats` timed
    samples then groups enough back-to-back calls to last `min_sample_s` (like
    `timeit.Timer.autorange`), so timer resolution and per-sample jitter do not dominate
    fast ops; times are reported per call.

    Returns:
      {"compile_s": the first call (compilation plus one run; use `compile_seconds` for
       the compile alone), "times_s": steady-state seconds per call, one per sample,
       "median_s", "min_s", "max_s", "calls_per_sample"}
    """
    compile_s, inner = _first_and_warmup(fn, warmup, min_warmup_s, min_sample_s)
    return _summary(compile_s, [_sample(fn, inner) for _ in range(repeats)], inner)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_warmup_s: float = 0.25,
    min_sample_s: float = 0.01,
) -> dict[str, dict]:
    """`time_call` for several functions whose speeds are to be compared, sample by sample in turn.

    Each function is compiled and warmed up as in `time_call`; then round r times one
    sample of every function, in an order rotated by r; a function fast enough to need
    several calls per sample first runs one untimed sample to warm up again. A slow spell
    of a shared machine then falls on all of them alike, so the ratio of their medians is
    measured in one stretch of time rather than minutes apart.

    Returns:
      {name: the `time_call` result of that function}
    """
    names = list(fns)
    prep = {k: _first_and_warmup(fns[k], warmup, min_warmup_s, min_sample_s) for k in names}
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            # A fast function timed right after a slow one starts cold (its thread pool
            # asleep, its data out of cache) and a 10 ms sample would mostly measure that:
            # the jaxadv median filter read 115k img/s between SciPy and kornia samples
            # and 200-270k alone. So each fast function re-warms untimed for one sample's
            # worth of calls first; calls longer than a sample are timed as they come.
            if prep[k][1] > 1:
                _sample(fns[k], prep[k][1])
            times[k].append(_sample(fns[k], prep[k][1]))
    return {k: _summary(prep[k][0], times[k], prep[k][1]) for k in names}


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
