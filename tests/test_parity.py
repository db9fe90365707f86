"""Parity of fira_optax.fira / .galore with the official PyTorch code (fira==1.0.2,
galore-torch==1.0) on identical gradient sequences.

Metric (per leaf): max over steps and entries of |W_ours - W_official| divided by
max |W_official_final - W0|; must be <= 1e-4 (both sides run in float32).

Run ``python tests/test_parity.py`` for a table of the errors per case and leaf (also columns
for each side against the float64 NumPy reference), or ``pytest tests/test_parity.py -s``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optax
import pytest
from _harness import learning_rates, relative_errors, run_ours
from _numpy_reference import projection_side, run_reference
from _official import run_official

from fira_optax import _testing
from fira_optax._testing import make_problem

TOL = 1e-4
STEPS = 24
GAP = 6  # refreshes at steps 1, 7, 13, 19
SEED = 0

MATRICES = {"tall": (48, 24), "wide": (24, 48), "square": (32, 32)}
PLAIN = {"bias": (32,), "dense": (16, 24)}  # never projected


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    proj_type: str = "std"
    rank: int = 8
    scale: float = 1.0
    weight_decay: float = 0.0
    schedule: bool = False
    spike: int | None = None  # 0-based step of a gradient spike of size 50 ...
    spike_mode: str = "scale"  # ... "scale": G *= 50; "burst": G += 50 * rms(G) * noise

    @property
    def id(self) -> str:
        parts = [self.kind, self.proj_type, f"r{self.rank}"]
        if self.scale != 1.0:
            parts.append(f"a{self.scale:g}")
        if self.weight_decay:
            parts.append(f"wd{self.weight_decay:g}")
        if self.schedule:
            parts.append("sched")
        if self.spike is not None:
            parts.append(f"{self.spike_mode}spike{self.spike + 1}")
        return "-".join(parts)

    def learning_rate(self):
        if self.schedule:
            return optax.warmup_cosine_decay_schedule(0.0, 2e-2, 5, STEPS, end_value=1e-3)
        return 1e-2


def official_supported(kind: str, shape: tuple[int, int], proj_type: str, rank: int) -> bool:
    """False where the official code crashes or departs from the spec (see module notes)."""
    m, n = shape
    side = projection_side(m, n, proj_type)
    k = min(rank, m, n)
    if proj_type == "reverse_std" and m < n and rank >= m:
        # project_back tests R.shape[0] <= R.shape[1] (m <= k) and multiplies on the wrong side.
        return False
    if kind == "fira" and side == "left" and k == n:
        # Fira's norm_dim rule ties (R is n x n) and reduces the non-rank axis: crashes on tall
        # matrices, silently differs from the spec (rank-axis reduction) on square ones.
        return False
    return True


def _cases() -> list[Case]:
    cases = []
    for kind in ("fira", "galore"):
        for pt in ("std", "reverse_std", "left", "right"):
            cases.append(Case(kind, pt, rank=8))
            cases.append(Case(kind, pt, rank=64))  # rank >= min(m, n) for every shape
        cases.append(Case(kind, "std", rank=8, scale=0.25, weight_decay=0.1))
        cases.append(Case(kind, "std", rank=8, schedule=True))
        cases.append(Case(kind, "std", rank=8, spike=9))  # non-refresh step 10
    # alpha = 0.25 once per proj_type (and with weight decay above)
    cases.append(Case("fira", "left", rank=8, scale=0.25))
    cases.append(Case("fira", "right", rank=64, scale=0.25))
    cases.append(Case("galore", "reverse_std", rank=8, scale=0.25))
    cases.append(Case("galore", "right", rank=8, scale=0.25))
    cases.append(Case("fira", "left", rank=8, spike=12, spike_mode="burst"))  # refresh step 13
    cases.append(Case("fira", "std", rank=8, spike=9, spike_mode="burst"))
    # Drop cases where the official code cannot run any projected matrix.
    return [
        c
        for c in cases
        if any(official_supported(c.kind, s, c.proj_type, c.rank) for s in MATRICES.values())
    ]


CASES = _cases()
RESULTS: dict[str, dict] = {}


def run_case(case: Case) -> dict:
    """Run official, ours and the float64 reference on one case; return errors and extras."""
    shapes = {
        name: s
        for name, s in MATRICES.items()
        if official_supported(case.kind, s, case.proj_type, case.rank)
    }
    projected = set(shapes)
    shapes.update(PLAIN)
    spike = None if case.spike is None else (case.spike, 50.0, case.spike_mode)
    w0, grads = make_problem(shapes, STEPS, SEED, spike=spike)
    lr = case.learning_rate()
    lrs = learning_rates(lr, STEPS)
    hyper = dict(
        rank=case.rank,
        update_proj_gap=GAP,
        scale=case.scale,
        proj_type=case.proj_type,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=case.weight_decay,
        projected=projected,
    )

    limiter_memory: list[dict[str, float]] = []

    def on_step(t, opt, params):
        if case.kind == "fira":
            limiter_memory.append(
                {n: float(opt.state[params[n]]["scaling_grad"]) for n in sorted(projected)}
            )

    official = run_official(case.kind, w0, grads, lrs, on_step=on_step, **hyper)
    ours = run_ours(case.kind, w0, grads, lr, **hyper)
    trace: list = []
    ref = run_reference(case.kind, w0, grads, lrs, trace=trace, **hyper)
    return {
        "ours_vs_official": relative_errors(ours, official, w0),
        "official_vs_ref": relative_errors(official, ref, w0),
        "ours_vs_ref": relative_errors(ours, ref, w0),
        "limiter_memory": limiter_memory,
        "trace": trace,
        "projected": sorted(projected),
    }


# The fast tier (`-m "not slow"`) runs one plain case per optimizer and the limiter's burst.
FAST = {"fira-std-r8", "galore-std-r8", "fira-std-r8-burstspike10"}
PARAMS = [pytest.param(c, id=c.id, marks=() if c.id in FAST else pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_parity_with_official(case: Case, record_property):
    res = run_case(case)
    RESULTS[case.id] = res
    errs = res["ours_vs_official"]
    for name, e in errs.items():
        record_property(f"err_{name}", e)
    print(f"\n{case.id}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{case.id}: parity error above {TOL:g}: {bad} (all: {errs})"

    if case.spike is not None and case.kind == "fira":
        # The limiter must have engaged at the spike: the raw residual norm (reference trace)
        # jumped by more than gamma, and the official limiter memory grew by exactly gamma.
        # NB phi = ||N|| / ||R|| cancels most of a pure rescaling (lam ~ 1.1 for G *= 50); a
        # burst outside the subspace gives lam ~ 2.5-3.5 (more would need a spike orthogonal
        # to the basis); on a refresh step the new basis absorbs part of the burst (lam ~ 1.05).
        t = case.spike
        min_lam = 2.0 if case.spike_mode == "burst" and t % GAP != 0 else 1.02
        for name in res["projected"]:
            prev = res["limiter_memory"][t - 1][name]
            cur = res["limiter_memory"][t][name]
            raw, lam, _ = res["trace"][t][name][0]
            assert lam > min_lam and raw / prev > 1.01 * min_lam, (name, raw, prev, lam)
            assert cur / prev == pytest.approx(1.01, rel=1e-5), (name, prev, cur)


def _sparse_case(kind, gradients, shapes, **hyper):
    """Ours and the official code on per-leaf gradient sequences `gradients(shape, seed)`."""
    w0, grads = {}, None
    for i, (name, shape) in enumerate(shapes.items()):
        w0[name] = (0.1 * np.random.default_rng([SEED, i]).standard_normal(shape)).astype(
            np.float32
        )
        seq = gradients(shape, i)
        grads = grads or [{} for _ in seq]
        for t, g in enumerate(seq):
            grads[t][name] = g
    svd = hyper.pop("svd", "torch")
    lrs = [1e-2] * len(grads)
    hyper["projected"] = set(shapes)
    official = run_official(kind, w0, grads, lrs, svd=svd, **hyper)
    ours = run_ours(kind, w0, grads, 1e-2, **hyper)
    return w0, grads, ours, official


@pytest.mark.parametrize("kind", ["fira", "galore"])
def test_parity_when_the_gradient_leaves_the_subspace(kind):
    """A 4×8 matrix at rank 1 whose gradient is row 0 at step 1 and row 1 afterwards: every
    later gradient is orthogonal to the basis (R = 0) until the refresh, yet the official
    code moves the weights on every step (momentum, and for Fira the residual, held by the
    limiter from the first step's zero residual). Both sides use their own SVD: the basis
    is exactly ±e0."""
    w0, grads, ours, official = _sparse_case(
        kind,
        lambda shape, i: _testing.one_hot_rows(12, i),
        {"m": (4, 8)},
        rank=1,
        update_proj_gap=3,
    )
    errors = relative_errors(ours, official, w0)
    assert errors["m"] <= TOL, errors
    for history in (ours, official):
        moves = [
            np.abs(b["m"] - a["m"]).max() for a, b in zip([w0, *history[:-1]], history, strict=True)
        ]
        assert min(moves) > 1e-3, moves  # no frozen step


@pytest.mark.parametrize("kind", ["fira", "galore"])
@pytest.mark.parametrize("nonzero", [1, 3])
def test_parity_on_sparse_gradients(kind, nonzero):
    """Gradients on `nonzero` random rows (wide) / columns (tall) per step, three idle steps
    (exactly zero: PyTorch's grad None, no step and no weight decay), rank 2, α = 0.25,
    weight decay. The official code gets fira_optax's bases (`svd="jax"`): a gradient exactly
    orthogonal to the basis in one build is 1e-7 off it in another, which the official φ
    turns into an O(1) difference — that round-off, and only it, is left out."""
    steps, idle = 30, (7, 8, 20)
    shapes = {"wide": (16, 64), "tall": (64, 16)}
    w0, grads, ours, official = _sparse_case(
        kind,
        lambda shape, i: _testing.sparse_gradients(shape, steps, i, nonzero=nonzero, idle=idle),
        shapes,
        rank=2,
        update_proj_gap=5,
        scale=0.25,
        weight_decay=0.1,
        svd="jax",
    )
    errors = relative_errors(ours, official, w0)
    assert max(errors.values()) <= TOL, errors
    for t, (before, after) in enumerate(zip([w0, *ours[:-1]], ours, strict=True)):
        for name in shapes:
            moved = np.any(after[name] != before[name])
            assert moved == (t not in idle), (name, t)  # idle steps: no step, no decay


def test_skip_rules_are_needed():
    """The shapes excluded from official parity really do fail in the official code."""
    lrs = [1e-2, 1e-2]
    w0, grads = make_problem({"tall": (48, 24)}, 2, SEED)
    with pytest.raises(RuntimeError):  # fira, left projection with k == n on a tall matrix
        run_official(
            "fira",
            w0,
            grads,
            lrs,
            rank=24,
            update_proj_gap=GAP,
            proj_type="left",
            projected={"tall"},
        )
    w0, grads = make_problem({"wide": (24, 48)}, 2, SEED)
    for kind in ("fira", "galore"):
        with pytest.raises(RuntimeError):  # reverse_std on a wide matrix with rank >= m
            run_official(
                kind,
                w0,
                grads,
                lrs,
                rank=24,
                update_proj_gap=GAP,
                proj_type="reverse_std",
                projected={"wide"},
            )


def _table(results: dict[str, dict]) -> str:
    names = list(MATRICES) + list(PLAIN)
    head = f"{'case':<30} {'leaf':<7} {'ours-vs-official':>17} {'official-vs-f64':>16} "
    head += f"{'ours-vs-f64':>12}"
    lines = [head, "-" * len(head)]
    worst = 0.0
    for cid, res in results.items():
        for name in names:
            if name not in res["ours_vs_official"]:
                continue
            e = res["ours_vs_official"][name]
            worst = max(worst, e) if math.isfinite(e) else math.inf
            lines.append(
                f"{cid:<30} {name:<7} {e:>17.2e} {res['official_vs_ref'][name]:>16.2e} "
                f"{res['ours_vs_ref'][name]:>12.2e}"
            )
    lines.append(f"worst ours-vs-official: {worst:.2e} (tolerance {TOL:g})")
    return "\n".join(lines)


if __name__ == "__main__":
    import time

    t0 = time.time()
    results = {}
    for c in CASES:
        try:
            results[c.id] = run_case(c)
        except Exception as exc:  # keep going; report at the end
            print(f"{c.id}: FAILED to run: {type(exc).__name__}: {exc}")
    print(_table(results))
    print(f"{len(results)} cases in {time.time() - t0:.1f}s")
