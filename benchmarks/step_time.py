"""Time one optimizer update on the projected matrices of LLaMA-60M / 130M / 350M shapes.

Optimizers (all with `rank` from the GaGore/Fira papers, scale 0.25, no weight decay):

* `fo.fira`, `fo.fira(refresh="randomized")`, `fo.galore` (this library; with `--family`
  also `fo.apollo`, `fo.apollo_mini`, `fo.golore`, `fo.frugal`),
* `optax.contrib.galore` (optax's own GaLore; its default base optimizer is `scale_by_adam`),
* `optax.adamw` (full-rank baseline),
* the official PyTorch `fira.FiraAdamW` and `torch.optim.AdamW` (CPU, same thread count).

JAX updates are `jax.jit(tx.update, donate_argnums=(0, 1))`: gradients and state are donated as
in a training loop (a fresh copy of the gradients is made, outside the timed region, before
each call). Every timing is `block_until_ready`-ed and measured after a warm-up.

Rounds are interleaved: in each round every optimizer runs once, so background load hits all
of them alike and the ratios stay meaningful on a shared machine.

* every optimizer is built once with `update_proj_gap=200` (one executable per optimizer);
* non-refresh steps: the state is past its first (refresh) step and its step counters never
  reach a multiple of 200;
* refresh steps: before each (untimed), every step counter of the state is set to the next
  multiple of 200, so the same executable takes its refresh branch (SVD or randomized); for
  the official optimizer, `state["step"]` of every parameter is set likewise;
* amortized at gap 200: `(199 · non_refresh + refresh) / 200`.

Usage::

    python -m benchmarks.step_time --sizes 60m,130m --rounds 30
    python -m benchmarks.step_time --smoke          # tiny shapes, 3 rounds, < 60 s (CI)
    python -m benchmarks.step_time --no-torch       # JAX only (GPU machine)
    python -m benchmarks.step_time --train-step     # + forward/backward/update (examples model)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import fira_optax as fo

HUGE_GAP = 1_000_000_000
GAP = 200


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    d_model: int
    ffn: int
    layers: int
    rank: int

    def shapes(self) -> dict[str, tuple[int, int]]:
        """The projected matrices, JAX (in, out) layout: q, k, v, o, gate, up, down per layer."""
        d, f = self.d_model, self.ffn
        per_layer = {
            "attn/q_proj": (d, d),
            "attn/k_proj": (d, d),
            "attn/v_proj": (d, d),
            "attn/o_proj": (d, d),
            "mlp/gate_proj": (d, f),
            "mlp/up_proj": (d, f),
            "mlp/down_proj": (f, d),
        }
        return {
            f"layers_{i}/{name}": shape
            for i in range(self.layers)
            for name, shape in per_layer.items()
        }

    @property
    def numel(self) -> int:
        return sum(m * n for m, n in self.shapes().values())


SIZES = {
    "smoke": Size("smoke", 64, 172, 1, 16),
    "60m": Size("60m", 512, 1376, 8, 128),
    "130m": Size("130m", 768, 2048, 12, 256),
    "350m": Size("350m", 1024, 2736, 24, 256),
    "1b": Size("1b", 2048, 5461, 24, 512),
}

SCALE = 0.25
LR = 1e-3


# ----------------------------------------------------------------------------------------------
# JAX optimizers.


def family_optimizers(rank: int, gap: int) -> dict[str, optax.GradientTransformation]:
    """The rest of the low-rank family, at the settings of their papers' pre-training runs."""
    return {
        "fo.apollo": fo.apollo(LR, rank, update_proj_gap=gap),
        "fo.apollo_mini": fo.apollo_mini(LR, update_proj_gap=gap),
        "fo.golore": fo.golore(LR, rank, update_proj_gap=gap, scale=SCALE),
        "fo.frugal": fo.frugal(LR, rank, update_proj_gap=gap),
    }


def jax_optimizers(rank: int, gap: int) -> dict[str, optax.GradientTransformation]:
    return {
        "fo.fira": fo.fira(LR, rank, update_proj_gap=gap, scale=SCALE),
        "fo.fira(randomized)": fo.fira(
            LR, rank, update_proj_gap=gap, scale=SCALE, refresh="randomized"
        ),
        "fo.galore": fo.galore(LR, rank, update_proj_gap=gap, scale=SCALE),
        "optax.contrib.galore": optax.contrib.galore(
            LR, rank=rank, update_proj_gap=gap, scale=SCALE
        ),
        "optax.adamw": optax.adamw(LR, weight_decay=0.0),
    }


REFRESHING = (
    "fo.fira",
    "fo.fira(randomized)",
    "fo.galore",
    "optax.contrib.galore",
    "fo.apollo",
    "fo.apollo_mini",
    "fo.golore",
    "fo.frugal",
)


def make_tree(size: Size, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        name: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        for name, shape in size.shapes().items()
    }


class JaxRunner:
    """One jitted, donating update of one optimizer (gap `GAP`); `step()` returns seconds.

    `step(refresh=True)` first sets every int32 step counter of the state to the next multiple
    of `GAP` (outside the timed region), so that the *same* executable takes the refresh branch.
    """

    def __init__(self, tx: optax.GradientTransformation, params, grads, warmup: int):
        self.params = params
        self.grads = grads
        self.state = jax.jit(tx.init)(params)
        self.update = jax.jit(tx.update, donate_argnums=(0, 1))
        self.refreshes = 0
        for _ in range(warmup):  # The first step (count 0) refreshes; later ones do not.
            self.step()

    def _set_counts(self, value: int) -> None:
        def fix(x):
            if x.ndim == 0 and x.dtype == jnp.int32:
                return jnp.full_like(x, value)
            return x

        self.state = jax.block_until_ready(jax.tree.map(fix, self.state))

    def step(self, refresh: bool = False) -> float:
        if refresh:
            self.refreshes += 1
            self._set_counts(GAP * self.refreshes)
        g = jax.tree.map(jnp.copy, self.grads)
        jax.block_until_ready(g)
        t0 = time.perf_counter()
        updates, self.state = self.update(g, self.state, self.params)
        jax.block_until_ready((updates, self.state))
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# PyTorch optimizers (official Fira, torch AdamW).


class TorchRunner:
    def __init__(self, kind: str, size: Size, warmup: int, seed: int = 0):
        import torch

        rng = np.random.default_rng(seed)
        # torch layout is (out, in): the transpose of the JAX kernel.
        self.params = []
        for m, n in size.shapes().values():
            p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((n, m), dtype=np.float32)))
            p.grad = torch.from_numpy(rng.standard_normal((n, m), dtype=np.float32))
            self.params.append(p)
        if kind == "torch.AdamW":
            self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, eps=1e-6)
        else:
            from benchmarks._torch_reference import fira_adamw

            group = {
                "params": self.params,
                "rank": size.rank,
                "update_proj_gap": GAP,
                "alpha": SCALE,
                "proj_type": "std",
            }
            self.opt = fira_adamw()(
                [group], lr=LR, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True
            )
        for _ in range(warmup):
            self.step()

    def step(self, refresh: bool = False) -> float:
        import torch

        if refresh:  # The official projector refreshes when state["step"] % gap == 0.
            self.refreshes = getattr(self, "refreshes", 0) + 1
            for p in self.params:
                self.opt.state[p]["step"] = GAP * self.refreshes
        with torch.no_grad():
            t0 = time.perf_counter()
            self.opt.step()
            return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Measurement.


def interleaved(
    runners: dict[str, Any], rounds: int, refresh: bool = False
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(runner.step(refresh=refresh) if refresh else runner.step())
    return times


def build(builders: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Builds (compiles + warms up) each runner, printing how long each took."""
    runners = {}
    for name, make in builders.items():
        t0 = time.perf_counter()
        runners[name] = make()
        print(f"  built + warmed {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return runners


def summarize(times: list[float]) -> tuple[float, float]:
    return 1e3 * statistics.median(times), 1e3 * min(times)


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), optax {optax.__version__}, "
        f"CPU: {model}, {os.cpu_count()} cores"
    )


def load_line() -> str:
    return "load avg (1/5/15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def bench_size(size: Size, args) -> str:
    print(
        f"\n== {size.name}: {len(size.shapes())} projected matrices, "
        f"{size.numel / 1e6:.1f}M params, rank {size.rank} ==",
        flush=True,
    )
    print(load_line(), flush=True)
    params = make_tree(size, 0)
    grads = make_tree(size, 1)
    use_torch = not args.no_torch
    if use_torch:
        import torch

        torch.set_num_threads(args.threads)

    txs = jax_optimizers(size.rank, GAP)
    if args.family:
        txs.update(family_optimizers(size.rank, GAP))
    builders: dict[str, Callable[[], Any]] = {
        name: (lambda tx=tx: JaxRunner(tx, params, grads, args.warmup)) for name, tx in txs.items()
    }
    if use_torch:
        builders["official FiraAdamW"] = lambda: TorchRunner("fira", size, args.warmup)
        builders["torch.AdamW"] = lambda: TorchRunner("torch.AdamW", size, args.warmup)
    runners = build(builders)
    # Non-refresh steps: counts stay far from a multiple of GAP (rounds + warmup < GAP).
    steady = interleaved(runners, args.rounds)
    # Refresh steps: the same executables, counts set to a multiple of GAP before each step.
    refreshing = {n: r for n, r in runners.items() if n in REFRESHING + ("official FiraAdamW",)}
    refresh = interleaved(refreshing, args.refresh_rounds, refresh=True)
    del runners, refreshing
    print("  " + load_line(), flush=True)

    names = list(steady)
    med = {n: summarize(steady[n])[0] for n in names}
    mins = {n: summarize(steady[n])[1] for n in names}
    rmed = {n: summarize(refresh[n])[0] for n in refresh}
    rmin = {n: summarize(refresh[n])[1] for n in refresh}
    amort = {n: (GAP - 1) / GAP * med[n] + rmed[n] / GAP if n in rmed else med[n] for n in names}
    base_adamw = amort.get("optax.adamw")
    base_galore = amort.get("optax.contrib.galore")
    base_fira = amort.get("official FiraAdamW")
    rows = []
    for n in names:
        rows.append(
            [
                n,
                f"{med[n]:.2f}",
                f"{mins[n]:.2f}",
                f"{rmed[n]:.1f}" if n in rmed else "-",
                f"{rmin[n]:.1f}" if n in rmin else "-",
                f"{amort[n]:.2f}",
                ratio(amort[n], base_adamw),
                ratio(amort[n], base_galore),
                ratio(amort[n], base_fira),
            ]
        )
    headers = [
        "optimizer",
        "step ms (median)",
        "step ms (min)",
        "refresh ms (median)",
        "refresh ms (min)",
        f"amortized ms @gap {GAP}",
        "/ optax.adamw",
        "/ optax.contrib.galore",
        "/ official Fira",
    ]
    title = (
        f"### LLaMA-{size.name} projected matrices ({size.layers} layers, "
        f"{len(size.shapes())} matrices, "
        f"{size.numel / 1e6:.1f}M params, rank {size.rank}); "
        f"{args.rounds} rounds non-refresh, {args.refresh_rounds} rounds refresh"
    )
    steady_rows = [
        [
            n,
            f"{med[n]:.2f}",
            ratio(med[n], med.get("optax.adamw")),
            ratio(med[n], med.get("optax.contrib.galore")),
            ratio(med[n], med.get("official FiraAdamW")),
        ]
        for n in names
    ]
    steady_table = fmt_table(
        [
            "optimizer",
            "non-refresh ms (median)",
            "/ optax.adamw",
            "/ optax.contrib.galore",
            "/ official Fira",
        ],
        steady_rows,
    )
    out = "\n".join(
        [
            title,
            "",
            fmt_table(headers, rows),
            "",
            "Ratios of the amortized cost above; ratios of the non-refresh step alone:",
            "",
            steady_table,
            "",
            load_line(),
        ]
    )
    print(out, flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Whole train step (forward + backward + update) with the examples' model.


def bench_train_step(args) -> str | None:
    try:
        from flax import nnx

        from examples.llama_pretrain import configs, train
        from examples.llama_pretrain.model import Llama
    except Exception as e:
        print(f"--train-step skipped: examples.llama_pretrain unavailable ({e!r})")
        return None
    preset = "micro" if args.smoke else args.train_config
    base = configs.preset(preset)
    batch = 2 if args.smoke else args.train_batch
    base = dataclasses.replace(base, batch_size=batch, dtype="float32")
    runners: dict[str, Callable[[], float]] = {}
    for opt in ("adamw", "galore", "fira"):
        cfg = dataclasses.replace(base, optimizer=opt, update_proj_gap=HUGE_GAP)
        model = Llama(cfg, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, train.make_optimizer(cfg), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        step_fn = train.make_train_step(graphdef, train.make_schedule(cfg))
        tokens = jax.random.randint(
            jax.random.key(0), (1, cfg.batch_size, cfg.max_seq_len + 1), 0, cfg.vocab_size
        )
        holder = {"state": state}

        def run(step_fn=step_fn, holder=holder, tokens=tokens) -> float:
            t0 = time.perf_counter()
            holder["state"], metrics = step_fn(holder["state"], tokens)
            jax.block_until_ready((holder["state"], metrics))
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            run()
        runners[opt] = type("R", (), {"step": staticmethod(run)})
    rounds = 3 if args.smoke else args.train_rounds
    times = interleaved(runners, rounds)
    med = {n: summarize(t)[0] for n, t in times.items()}
    rows = [
        [n, f"{med[n]:.1f}", f"{summarize(times[n])[1]:.1f}", ratio(med[n], med["adamw"])]
        for n in times
    ]
    out = "\n".join(
        [
            f"### Train step (fwd+bwd+update), examples config `{preset}`, batch {batch}, "
            f"seq {base.max_seq_len}, float32, non-refresh steps, {rounds} rounds",
            "",
            fmt_table(["optimizer", "ms (median)", "ms (min)", "/ adamw"], rows),
            "",
            load_line(),
        ]
    )
    print(out, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="60m,130m", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved non-refresh rounds")
    parser.add_argument(
        "--refresh-rounds",
        type=int,
        default=None,
        help="interleaved refresh rounds (default: --rounds)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: os.cpu_count(), what XLA:CPU uses)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the number of layers (per-matrix work is independent: times scale "
        "linearly; compile time shrinks a lot)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch optimizers")
    parser.add_argument(
        "--family", action="store_true", help="also APOLLO, APOLLO-Mini, GoLore and FRUGAL"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 rounds (CI)")
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="also time fwd+bwd+update with examples/llama_pretrain",
    )
    parser.add_argument("--train-config", default="llama_60m")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-rounds", type=int, default=10)
    parser.add_argument("--out", default=None, help="append the tables (markdown) to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.rounds, args.warmup = "smoke", 3, 1
    if args.rounds + args.warmup >= GAP:
        parser.error(f"--rounds + --warmup must stay below the gap {GAP}")
    if args.refresh_rounds is None:
        args.refresh_rounds = args.rounds
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if not args.no_torch:
        try:
            import torch

            from benchmarks._torch_reference import fira_adamw

            fira_adamw()
        except Exception as e:
            print(f"torch / official fira unavailable ({e!r}): running with --no-torch")
            args.no_torch = True
    print(machine_line())
    if not args.no_torch:
        import torch

        print(f"torch {torch.__version__}, torch threads {args.threads}")
    sizes = [SIZES[s.strip()] for s in args.sizes.split(",") if s.strip()]
    if args.layers:
        sizes = [dataclasses.replace(s, layers=args.layers) for s in sizes]
    outputs = [bench_size(s, args) for s in sizes]
    if args.train_step:
        t = bench_train_step(args)
        if t:
            outputs.append(t)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n\n".join(outputs) + "\n")


if __name__ == "__main__":
    main()
