"""Checkpointing the fira state: orbax save → restore in a fresh process → bit-identical run.

k = 4 steps with update_proj_gap = 4 are saved, so the first step after the restore (count 4)
is a refresh step. `python -m tests.test_checkpoint resume DIR` (from the repository root) is the
fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_optax as fo

K_SAVE, K_TOTAL, GAP = 4, 9, 4


def problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (64, 24))
    y = jnp.tanh(x @ jax.random.normal(k2, (24, 12)))
    params = {
        "w1": 0.3 * jax.random.normal(k3, (24, 40)),
        "b1": jnp.zeros(40),
        "w2": 0.3 * jax.random.normal(jax.random.fold_in(k3, 1), (3, 40, 12)),
    }
    tx = fo.fira(1e-2, 6, update_proj_gap=GAP, scale=0.25, weight_decay=0.01)

    def loss_fn(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean(jnp.square(jnp.einsum("bh,lho->lbo", h, p["w2"]) - y[None]))

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return params, tx, step


def run(params, state, step, n):
    for _ in range(n):
        params, state = step(params, state)
    return params, state


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def resume(directory: str) -> None:
    """The fresh process: restore at K_SAVE, run to K_TOTAL, write the result."""
    params0, tx, step = problem()
    target = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params0)
    ckpt = _checkpointer()
    restored = ckpt.restore(os.path.join(directory, "ckpt"), target)
    params, state = run(restored["params"], restored["opt_state"], step, K_TOTAL - K_SAVE)
    leaves = jax.tree.leaves({"params": params, "opt_state": state})
    np.savez(os.path.join(directory, "resumed.npz"), *[np.asarray(x) for x in leaves])


@pytest.mark.slow
def test_orbax_resume_in_fresh_process_is_bit_identical(tmp_path):
    params, tx, step = problem()
    state = tx.init(params)
    p_mid, s_mid = run(params, state, step, K_SAVE)
    ckpt = _checkpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p_mid, "opt_state": s_mid})
    ckpt.wait_until_finished()
    p_end, s_end = run(p_mid, s_mid, step, K_TOTAL - K_SAVE)  # uninterrupted

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-m", "tests.test_checkpoint", "resume", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        check=True,
        timeout=240,
    )
    resumed = np.load(tmp_path / "resumed.npz")
    want = jax.tree.leaves({"params": p_end, "opt_state": s_end})
    assert len(resumed.files) == len(want)
    for i, x in enumerate(want):
        np.testing.assert_array_equal(resumed[f"arr_{i}"], np.asarray(x))
    # The restored run went through a refresh: the basis changed after the restore.
    bases_mid, bases_end = (optax.tree_utils.tree_get(s, "bases") for s in (s_mid, s_end))
    assert not np.array_equal(np.asarray(bases_mid["w1"]), np.asarray(bases_end["w1"]))


def test_flax_serialization_round_trip_is_bit_exact():
    from flax import serialization

    params, tx, step = problem()
    p, s = run(params, tx.init(params), step, K_SAVE)
    blob = serialization.to_bytes({"params": p, "opt_state": s})
    template = {"params": params, "opt_state": tx.init(params)}
    back = serialization.from_bytes(template, blob)
    assert jax.tree.structure(back) == jax.tree.structure(template)
    for a, b in zip(
        jax.tree.leaves(back), jax.tree.leaves({"params": p, "opt_state": s}), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    p1, s1 = run(back["params"], back["opt_state"], step, 2)
    p2, s2 = run(p, s, step, 2)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "resume":
    resume(sys.argv[2])
