"""Step metrics: one timer and one way to name scalars.

Producers (the dynamic sampler, the response validator, the rollout statistics, the actor, weight sync)
return *unprefixed* ``{name: float}`` dicts; the caller that owns a section of the step puts them under
its prefix with :func:`scoped`. Wall-clock sections are measured with :func:`timed`, which writes
``timing/<name>_s``. Every scalar of a step ends up in TensorBoard and in ``steps.jsonl``.
"""
from __future__ import annotations

import numbers
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, MutableMapping


@contextmanager
def timed(metrics: MutableMapping[str, float], name: str) -> Iterator[None]:
    """Measure the ``with`` body's wall-clock time into ``metrics[f"timing/{name}_s"]`` (seconds, float,
    ``time.perf_counter``). Written only when the body completes; an exception propagates unchanged."""
    t0 = time.perf_counter()
    yield
    metrics[f"timing/{name}_s"] = time.perf_counter() - t0


def scoped(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``{f"{prefix}/{key}": float(value)}`` for every entry of ``metrics``.

    Raises:
        ValueError: ``prefix`` is empty or ends with ``/``, or a key already starts with ``prefix + "/"``
            (a producer that prefixes its own names would be scoped twice).
    """
    if not prefix or prefix.endswith("/"):
        raise ValueError(f"metric prefix must be a non-empty name without a trailing '/', got {prefix!r}")
    doubled = [k for k in metrics if k.startswith(prefix + "/")]
    if doubled:
        raise ValueError(f"metrics {doubled[:3]} are already under {prefix!r}/: producers return unprefixed names")
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The entries of ``metrics`` that are real numbers (bool, int, float, numpy scalars; NaN and inf
    kept), as floats, in the dict's order: what TensorBoard and ``steps.jsonl`` receive for a step."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
