"""Run the official PyTorch Fira / GaLore / APOLLO AdamW on given gradient sequences.

The official packages (``fira==1.0.2``, ``galore-torch==1.0``, ``apollo-torch==1.0.3``) are
installed with ``--no-deps``. They import modules they never use on the code paths exercised
here:

* ``transformers.utils.versions.require_version`` (a version assertion) -- stubbed as a no-op;
* ``bitsandbytes.optim.optimizer.Optimizer2State`` (imported at module level by
  ``galore_torch/adamw8bit.py`` through ``galore_torch/__init__.py``, and by
  ``apollo_torch/adamw8bit.py`` and ``q_apollo.py``) -- stubbed as an empty
  ``torch.optim.Optimizer`` subclass;
* ``bitsandbytes.functional`` (imported by ``apollo_torch/q_apollo.py``, the quantized variant)
  -- stubbed as an empty module.

Stubs are installed into ``sys.modules`` only when the real package cannot be imported.

SVD sign convention
-------------------
Singular vectors are unique only up to sign (for distinct singular values). To compare two
implementations, both must pick the same sign. The convention shared with ``fira_optax`` and
``tests/_numpy_reference.py`` is: each *kept basis vector* (a column of P = U[:, :k] for a left
projection, a row of P = Vh[:k] for a right projection) is multiplied by the sign of its entry of
largest magnitude (the first such entry on ties; a zero sign counts as +1).

:func:`sign_canonical_svd` monkeypatches ``torch.linalg.svd`` so that it flips column j of U by
the sign of U[:, j]'s largest-magnitude entry AND, separately, row j of Vh by the sign of
Vh[j]'s largest-magnitude entry. U and Vh then no longer jointly reconstruct the input
(U diag(S) Vh != A in general), but the official projectors only ever use ONE of them per
projection (U for "left", Vh for "right"), so each basis is canonical and nothing else changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "canonicalize_svd",
    "install_stubs",
    "jax_svd",
    "make_official_optimizer",
    "projection_recorder",
    "replay_refresh",
    "run_official",
    "sign_canonical_svd",
]


# --------------------------------------------------------------------------------------
# Stubs for the unused imports of the official packages
# --------------------------------------------------------------------------------------
def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _new_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_stubs() -> None:
    """Install minimal ``transformers`` / ``bitsandbytes`` stubs if they are not importable."""
    if "transformers.utils.versions" not in sys.modules and not _module_available("transformers"):

        def require_version(requirement: str, hint: str | None = None) -> None:
            return None

        versions = _new_module("transformers.utils.versions", require_version=require_version)
        utils = _new_module("transformers.utils", versions=versions)
        _new_module("transformers", utils=utils, __path__=[])
        utils.__path__ = []

    if "bitsandbytes.optim.optimizer" not in sys.modules and not _module_available("bitsandbytes"):

        class Optimizer2State(torch.optim.Optimizer):
            """Placeholder: GaLoreAdamW8bit subclasses it at import time; never instantiated."""

            def __init__(self, *args, **kwargs):
                raise RuntimeError("bitsandbytes is stubbed out in the tests")

        optimizer = _new_module("bitsandbytes.optim.optimizer", Optimizer2State=Optimizer2State)
        optim = _new_module("bitsandbytes.optim", optimizer=optimizer, __path__=[])
        functional = _new_module("bitsandbytes.functional")  # q_apollo's; never called
        _new_module("bitsandbytes", optim=optim, functional=functional, __path__=[])


install_stubs()

from apollo_torch import APOLLOAdamW  # noqa: E402
from fira import FiraAdamW  # noqa: E402
from galore_torch import GaLoreAdamW  # noqa: E402


# --------------------------------------------------------------------------------------
# Sign-canonical SVD
# --------------------------------------------------------------------------------------
def _sign_of_largest(x: torch.Tensor, dim: int) -> torch.Tensor:
    # torch.argmax returns the first maximal index on ties (documented behaviour).
    idx = x.abs().argmax(dim=dim, keepdim=True)
    s = torch.sign(torch.gather(x, dim, idx))
    return torch.where(s == 0, torch.ones_like(s), s)


def canonicalize_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
    """Flip columns of U and rows of Vh *independently* (see module docstring)."""
    U = U * _sign_of_largest(U, dim=-2)  # sign per column, broadcast over rows
    Vh = Vh * _sign_of_largest(Vh, dim=-1)  # sign per row, broadcast over columns
    return U, S, Vh


@contextlib.contextmanager
def sign_canonical_svd(compute_dtype: torch.dtype | None = None):
    """Temporarily replace ``torch.linalg.svd`` with a sign-canonical version.

    ``compute_dtype`` (e.g. ``torch.float64``): compute the SVD in that dtype and return it in
    that dtype. The official ``get_orthogonal_matrix`` downcasts non-float32 gradients to
    float32 before the SVD and casts the basis back with ``.type(original_type)``, so with
    float64 parameters and float32-representable gradients (as in these tests, where the
    downcast is exact) this makes the whole official run float64.
    """
    original = torch.linalg.svd

    def svd(A, full_matrices=True, *, driver=None, out=None):
        if out is not None:
            raise NotImplementedError("out= is not supported by the test wrapper")
        if compute_dtype is not None:
            A = A.to(compute_dtype)
        U, S, Vh = original(A, full_matrices=full_matrices, driver=driver)
        # NOTE: U and Vh are canonicalised separately, so U @ diag(S) @ Vh != A in general.
        # The official projectors use only one of them per projection, so this is harmless.
        return canonicalize_svd(U, S, Vh)

    torch.linalg.svd = svd
    try:
        yield
    finally:
        torch.linalg.svd = original


@contextlib.contextmanager
def jax_svd():
    """Temporarily make ``torch.linalg.svd`` return fira_optax's own sign-canonical bases.

    ``U`` is ``fira_optax._refresh.svd_basis(A, ·, "left")`` and ``Vh`` its ``"right"``
    basis, the functions our refresh calls, so both sides start every refresh from the same
    float32 basis: the comparison then covers everything but the SVD's round-off. Needed
    where the official formulas magnify that round-off: with sparse gradients a gradient is
    often exactly orthogonal to the basis, and a basis entry of 1e-7 where the other build
    has 0 changes `φ = ‖N‖ / (‖R‖ + 1e-8)` by O(1).
    """
    import jax
    import jax.numpy as jnp

    from fira_optax._refresh import svd_basis

    original = torch.linalg.svd
    bases = jax.jit(
        lambda a, k: (svd_basis(a, k, "left"), svd_basis(a, k, "right")), static_argnums=1
    )

    def svd(A, full_matrices=True, *, driver=None, out=None):
        if full_matrices or driver is not None or out is not None:
            raise NotImplementedError("the test wrapper computes thin SVDs only")
        k = min(A.shape[-2:])
        U, Vh = bases(jnp.asarray(A.detach().to(torch.float32).numpy()), k)
        S = torch.zeros(k, dtype=A.dtype)  # never read by the official projectors
        as_torch = lambda x: torch.tensor(np.asarray(x)).to(A.dtype)
        return as_torch(U), S, as_torch(Vh)

    torch.linalg.svd = svd
    try:
        yield
    finally:
        torch.linalg.svd = original


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------
def make_official_optimizer(
    kind: str,
    params: Mapping[str, torch.nn.Parameter],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projected: Iterable[str] = (),
    lr: float = 1e-3,
    proj: str = "random",
    scale_type: str = "channel",
    scale_front: bool = False,
    disable_nl: bool = False,
) -> torch.optim.Optimizer:
    """Build the official optimizer with a plain group and a low-rank (``rank``) group.

    ``kind`` is "fira", "galore" or "apollo". APOLLO only: ``proj`` ("random" or "svd") and
    ``scale_type`` ("channel" or "tensor") go into the low-rank group, ``scale_front`` and
    ``disable_nl`` (no norm-growth limiter) to the constructor.
    """
    projected = set(projected)
    unknown = projected - set(params)
    if unknown:
        raise KeyError(f"projected names not in params: {sorted(unknown)}")
    extra_group, extra_kwargs = {}, {}
    if kind == "fira":
        cls, scale_key = FiraAdamW, "alpha"
    elif kind == "galore":
        cls, scale_key = GaLoreAdamW, "scale"
    elif kind == "apollo":
        cls, scale_key = APOLLOAdamW, "scale"
        extra_group = {"proj": proj, "scale_type": scale_type}
        extra_kwargs = {"scale_front": scale_front, "disable_nl": disable_nl}
    else:
        raise ValueError(f"kind must be 'fira', 'galore' or 'apollo', got {kind!r}")
    plain = [p for name, p in params.items() if name not in projected]
    lowrank = [p for name, p in params.items() if name in projected]
    groups = []
    if plain:
        groups.append({"params": plain})
    if lowrank:
        groups.append(
            {
                "params": lowrank,
                "rank": rank,
                "update_proj_gap": update_proj_gap,
                scale_key: scale,
                "proj_type": proj_type,
                **extra_group,
            }
        )
    return cls(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        correct_bias=True,
        no_deprecation_warning=True,
        **extra_kwargs,
    )


def run_official(
    kind: str,
    w0: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    lrs: Sequence[float],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projected: Iterable[str] = (),
    dtype: torch.dtype = torch.float32,
    svd_dtype: torch.dtype | None = None,
    svd: str = "torch",
    on_step: Callable[[int, torch.optim.Optimizer, dict[str, torch.nn.Parameter]], None]
    | None = None,
    **apollo_options,
) -> list[dict[str, np.ndarray]]:
    """Run the official ``kind`` optimizer; return the weights after each step.

    ``grads[t][name]`` is assigned to ``param.grad`` (no autograd; None where it is exactly
    zero: the parameter is not stepped); ``lrs[t]`` is written into
    every param group before step ``t``. Names in ``projected`` go into the low-rank group
    (Fira's scale key is ``alpha``, GaLore's is ``scale``); the rest into a plain AdamW group.
    ``on_step(t, optimizer, params)`` is called after each step (t from 0) for inspection,
    e.g. of ``optimizer.state[params[name]]["scaling_grad"]`` (Fira's limiter memory).
    ``dtype`` is the parameter/gradient dtype; ``svd_dtype`` see :func:`sign_canonical_svd`
    (``dtype=torch.float64, svd_dtype=torch.float64`` gives an all-float64 official run).
    ``svd="jax"`` gives the official code fira_optax's own bases (see :func:`jax_svd`).
    ``apollo_options`` (``kind="apollo"``): ``proj``, ``scale_type``, ``scale_front``,
    ``disable_nl``; see :func:`make_official_optimizer`.
    """
    if len(grads) != len(lrs):
        raise ValueError(f"{len(grads)} gradients but {len(lrs)} learning rates")
    params = {
        name: torch.nn.Parameter(torch.tensor(np.asarray(w), dtype=dtype)) for name, w in w0.items()
    }
    opt = make_official_optimizer(
        kind,
        params,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        projected=projected,
        lr=float(lrs[0]) if len(lrs) else 1e-3,
        **apollo_options,
    )
    history: list[dict[str, np.ndarray]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead / contention
    try:
        with sign_canonical_svd(svd_dtype) if svd == "torch" else jax_svd():
            for t, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
                lr = float(lr)
                if not math.isfinite(lr) or lr < 0:
                    raise ValueError(f"bad learning rate at step {t}: {lr}")
                for group in opt.param_groups:
                    group["lr"] = lr
                for name, p in params.items():
                    # An exactly zero gradient is a parameter PyTorch does not step (grad
                    # None), what fira_optax calls an idle matrix.
                    grad = np.asarray(g[name])
                    p.grad = torch.tensor(grad, dtype=dtype) if np.any(grad) else None
                opt.step()
                if on_step is not None:
                    on_step(t, opt, params)
                history.append({n: p.detach().numpy().copy() for n, p in params.items()})
    finally:
        torch.set_num_threads(threads)
    return history


# --------------------------------------------------------------------------------------
# Replaying the official projections in fira_optax
# --------------------------------------------------------------------------------------
def projection_recorder(
    names: Iterable[str], update_proj_gap: int
) -> tuple[Callable, dict[str, list[np.ndarray]]]:
    """An ``on_step`` for :func:`run_official` (APOLLO) that records every projection matrix.

    Returns ``(on_step, tables)``; after the run ``tables[name][j]`` is the official
    projector's ``ortho_matrix`` (left ``m×rank`` or right ``rank×n``, as fira_optax's basis)
    of its ``j``-th refresh, made at the parameter's step ``j·T + 1`` and used until ``(j+1)·T``.
    """
    tables: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def on_step(t, opt, params):
        for name, table in tables.items():
            state = opt.state[params[name]]
            step = state.get("step", 0)  # the parameter's steps so far (idle steps: none)
            if step and len(table) == (step - 1) // update_proj_gap:  # a refresh step
                table.append(state["projector"].ortho_matrix.detach().numpy().copy())

    return on_step, tables


def replay_refresh(tables: Mapping[str, Sequence[np.ndarray]], update_proj_gap: int):
    """A fira_optax ``refresh=`` callable that returns the recorded official projections.

    Called per matrix with its step count before this step; on the official schedule its
    refresh number is ``step // update_proj_gap``, the row of the leaf's table.
    """
    import jax.numpy as jnp

    stacked = {name: jnp.asarray(np.stack(table)) for name, table in tables.items()}

    def refresh(grad_mxn, basis, key, *, k, side, path, step):
        table = stacked[path]
        if table.shape[1:] != basis.shape:
            raise ValueError(f"{path}: recorded {table.shape[1:]}, basis {basis.shape}")
        return table[jnp.minimum(step // update_proj_gap, table.shape[0] - 1)]

    return refresh
