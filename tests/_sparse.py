"""A problem with sparse gradients: a 2-layer MLP on one-hot tokens, one token per step.

The first layer `w1` (16×64) of a one-hot input gets a gradient on one row only (the token's),
so after a refresh most of its gradients are orthogonal to the rank-2 basis (`R = 0` with
`G ≠ 0`). Used by the tests (`test_faults.py`, `test_parity.py`) and by
`benchmarks/sparse_gradients.py`, which trains the same model with JAX and with the official
PyTorch code from the same initial weights and token order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB = 16
HIDDEN = 64


def init_and_data(seed: int = 0, steps: int = 300):
    """`(w0, tokens, targets)`: float32 weights `{"w1", "w2"}` (numpy), one token per step and
    the target class of each token (a fixed random permutation)."""
    rng = np.random.default_rng(seed)
    w0 = {
        "w1": (rng.normal(size=(VOCAB, HIDDEN)) / np.sqrt(VOCAB)).astype(np.float32),
        "w2": (rng.normal(size=(HIDDEN, VOCAB)) / np.sqrt(HIDDEN)).astype(np.float32),
    }
    tokens = rng.integers(0, VOCAB, size=steps)
    targets = rng.permutation(VOCAB)
    return w0, tokens, targets


def loss_fn(params, tokens, targets):
    """Mean cross-entropy of `relu(onehot(tokens) @ w1) @ w2` against `targets[tokens]`."""
    x = jax.nn.one_hot(tokens, VOCAB, dtype=params["w1"].dtype)
    logits = jax.nn.relu(x @ params["w1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets[tokens]).mean()


def train(tx: optax.GradientTransformation, seed: int = 0, steps: int = 300) -> dict:
    """Trains with batch 1; returns the per-step gradients, updates and the final loss.

    Returns a dict: `grads` (the list of per-step gradient trees, numpy), `frozen` (the number
    of steps on which `w1`'s gradient is non-zero but its update exactly zero), `loss` (the
    mean loss over all the tokens at the end).
    """
    w0, tokens, targets = init_and_data(seed, steps)
    params = jax.tree.map(jnp.asarray, w0)
    targets = jnp.asarray(targets)
    state = tx.init(params)

    @jax.jit
    def step(params, state, token):
        grads = jax.grad(loss_fn)(params, token[None], targets)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads, updates

    grads_seen, frozen = [], 0
    for token in tokens:
        params, state, grads, updates = step(params, state, jnp.asarray(token))
        grads_seen.append(jax.tree.map(np.asarray, grads))
        if np.any(grads["w1"] != 0) and not np.any(updates["w1"] != 0):
            frozen += 1
    loss = float(loss_fn(params, jnp.arange(VOCAB), targets))
    return {"grads": grads_seen, "frozen": frozen, "loss": loss, "params": params}


def train_torch(kind: str, seed: int = 0, steps: int = 300, **hyper) -> dict:
    """The same training loop with the official PyTorch optimizer (`kind` "fira"/"galore",
    both matrices projected; `hyper`: lr, rank, update_proj_gap, scale); same returns."""
    import torch

    from tests._official import make_official_optimizer, sign_canonical_svd

    w0, tokens, targets = init_and_data(seed, steps)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    lr = hyper.pop("lr")
    opt = make_official_optimizer(kind, params, projected=set(params), lr=lr, **hyper)
    targets_t = torch.tensor(targets)

    def loss_of(tok):
        x = torch.nn.functional.one_hot(tok, VOCAB).to(torch.float32)
        logits = torch.relu(x @ params["w1"]) @ params["w2"]
        return torch.nn.functional.cross_entropy(logits, targets_t[tok])

    frozen = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sign_canonical_svd():
            for token in tokens:
                opt.zero_grad()
                loss_of(torch.tensor([int(token)])).backward()
                before = params["w1"].detach().clone()
                opt.step()
                moved = bool(torch.any(params["w1"].detach() != before))
                if bool(torch.any(params["w1"].grad != 0)) and not moved:
                    frozen += 1
            with torch.no_grad():
                loss = float(loss_of(torch.arange(VOCAB)))
    finally:
        torch.set_num_threads(threads)
    return {"frozen": frozen, "loss": loss}


def sparse_gradients(
    shape: tuple[int, int], steps: int, seed: int, nonzero: int = 2, idle: tuple[int, ...] = ()
) -> list[np.ndarray]:
    """Gradients of one m×n matrix that are non-zero on `nonzero` random rows (a wide matrix,
    projected on the left) or columns (a tall one, projected on the right) per step — often
    exactly orthogonal to the basis of the last refresh — and exactly zero on the steps in
    `idle`.
    """
    m, n = shape
    rng = np.random.default_rng([seed, m, n])
    out = []
    for t in range(steps):
        g = np.zeros(shape, np.float32)
        if t not in idle:
            if m < n:
                rows = rng.choice(m, size=nonzero, replace=False)
                g[rows] = rng.standard_normal((nonzero, n))
            else:
                cols = rng.choice(n, size=nonzero, replace=False)
                g[:, cols] = rng.standard_normal((m, nonzero))
        out.append(g)
    return out


def one_hot_rows(steps: int, seed: int) -> list[np.ndarray]:
    """A 4×8 gradient on row 0 at the first step and on row 1 afterwards."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = np.zeros((4, 8), np.float32)
        g[0 if t == 0 else 1] = rng.standard_normal(8)
        out.append(g)
    return out
