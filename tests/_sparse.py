"""The sparse-gradient problem of `fira_optax._testing` (a 2-layer MLP on one-hot tokens, one
token per step) trained by the official PyTorch optimizers (`tests/test_faults.py`,
`benchmarks/sparse_gradients.py`): the same initial weights and token order as
`_testing.sparse_train`.
"""

from __future__ import annotations

from fira_optax import _testing


def train_torch(kind: str, seed: int = 0, steps: int = 300, **hyper) -> dict:
    """The same training loop with the official PyTorch optimizer (`kind` "fira"/"galore",
    both matrices projected; `hyper`: lr, rank, update_proj_gap, scale); same returns."""
    import torch

    from tests._official import make_official_optimizer, sign_canonical_svd

    w0, tokens, targets = _testing.sparse_init_and_data(seed, steps)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    lr = hyper.pop("lr")
    opt = make_official_optimizer(kind, params, projected=set(params), lr=lr, **hyper)
    targets_t = torch.tensor(targets)

    def loss_of(tok):
        x = torch.nn.functional.one_hot(tok, _testing.SPARSE_VOCAB).to(torch.float32)
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
                loss = float(loss_of(torch.arange(_testing.SPARSE_VOCAB)))
    finally:
        torch.set_num_threads(threads)
    return {"frozen": frozen, "loss": loss}
