"""Early, readable errors for hyper-parameters (a leaf module: imports nothing of the package).

Integers that set shapes or schedules (`rank`, `update_proj_gap`) accept anything int-like —
Python, NumPy or concrete JAX integer scalars, as configs loaded from YAML/NumPy give them —
and are converted to Python ints. A traced integer (under `optax.inject_hyperparams` inside `jit`)
raises, naming the `static_args` that fix it. Real-valued hyper-parameters (`scale`, `gamma`)
are checked when their value is known (Python numbers, NumPy or concrete JAX arrays); traced
values cannot be checked and pass through.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import numpy as np

#: Step counts are int32; `count % update_proj_gap` needs the gap to fit.
MAX_GAP = 2**31 - 1


#: The arguments of `fira` / `galore` / `scale_by_fira` / `scale_by_galore` / `project` that
#: `optax.inject_hyperparams` must keep static: it turns every numeric argument, defaults
#: included, into an array in the state (traced under `jit`), and it calls every function
#: argument as a schedule.
STATIC_ARGS = ("rank", "update_proj_gap")


def traced_message(name: str, value: Any) -> str:
    """What to do when a structural hyper-parameter is a traced value."""
    return (
        f"{name} sets array shapes or the refresh schedule, so it must be a concrete Python "
        f"int, got the traced value {value!r}. Under optax.inject_hyperparams every numeric "
        "argument (defaults included) becomes a traced array inside jit: list the structural "
        f"ones in static_args, e.g. optax.inject_hyperparams(fo.fira, static_args={STATIC_ARGS!r})"
        "(learning_rate=..., rank=...), and add 'projected' / 'dimension_numbers' to "
        "static_args when you pass them as functions."
    )


def as_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """`value` as a Python int in `[low, high]`, or a ValueError naming `name`."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(traced_message(name, value))
    if isinstance(value, (bool, np.bool_, float, np.floating)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.") from None
    if value < low:
        raise ValueError(f"{name} must be positive, got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high} (step counts are int32), got {value}.")
    return value


def concrete(value: Any) -> np.ndarray | None:
    """The value as a NumPy array when it is known now, else None (a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def check_real(name: str, value: Any, *, low: float, low_open: bool, what: str) -> None:
    """Raises when a known `value` is not finite or not above `low` (`≥ low` if closed)."""
    if callable(value):
        return
    array = concrete(value)
    if array is None:
        return
    bad = ~np.isfinite(array) | ((array <= low) if low_open else (array < low))
    if np.any(bad):
        raise ValueError(f"{name} must be {what}, got {value!r}.")
