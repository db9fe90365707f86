"""Compare AdamW, GaLore, Fira and the paper's ablations: the main job and the rank sweep.

Main job (``scripts/compare.sh``)::

    python -m examples.llama_pretrain.compare --workdir runs/compare

trains the ``tiny`` config once per optimizer (AdamW, the AdamW control, GaLore, Fira; about
two minutes each on two CPU cores) at the preset's rank, learning rates and seed. Rank sweep
(``scripts/sweep.sh``)::

    python -m examples.llama_pretrain.compare --workdir runs/sweep \\
        --config=examples/llama_pretrain/configs.py:tiny \\
        --optimizers adamw,galore,fira,fira_no_limiter,fira_no_phi,adamw_control \\
        --ranks 2,8,32 --seeds 3 --adamw_lrs 1e-3,3e-3,1e-2

trains every low-rank optimizer at every rank and seed, and AdamW over a learning-rate
sweep: each ``--adamw_lrs`` value on the first ``--lr_sweep_seeds`` seeds (default 1), then
the best of them (lowest mean final validation loss over those seeds) on all ``--seeds``
seeds, and ``adamw_control`` (AdamW whose embeddings / head / norms train at the low-rank
runs' ``learning_rate``) at that best rate on all seeds. Seeds are ``seed, seed + 1, ...``;
a seed sets both the initialization and the batch order. Runs go seed by seed, so a sweep
stopped early has whole seeds.

Each run lives in ``workdir/<label>/seed<k>/`` (``fira_r8``, ``adamw_lr0.003``, ...); a
finished run (``final_metrics.json`` with the same config) is reused, not retrained, so a
sweep can be resumed or extended (more seeds, ranks) into the same ``workdir``. The report
covers every finished run in ``workdir`` whose config equals this one up to the optimizer,
rank, AdamW learning rate and seed:

* ``workdir/results.md``: final validation loss (whole validation split) as mean +- sd over
  seeds per optimizer and rank, the AdamW learning-rate sweep and its control, one line per
  run (state bytes, ms/step, time), and what the numbers show: a difference is claimed only
  when it is larger than the seed spread (with several seeds: every seed of one optimizer
  beats every seed of the other; with one seed: the difference exceeds the larger of the two
  optimizers' seed ranges measured by the rank sweep in ``--reference``),
* ``workdir/results.json``: the runs and the per-group statistics,
* ``workdir/loss_curves.png``: training (EMA) and validation loss of the first seed's runs
  at ``rank``,
* ``workdir/val_loss_vs_rank.png`` (several ranks): final validation loss against the rank,
  one line per low-rank optimizer (mean +- sd), AdamW at its best rate as a band.

``--config`` (default: the ``tiny`` preset), its ``--config.FIELD=VALUE`` overrides (e.g.
``--config.data_path=DIR`` for another corpus, ``--config.num_train_steps=100``) and ``--mesh``
work as in ``main.py`` (``cli.py``); ``--plot_only`` rebuilds the report from the finished runs
without training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import time
from typing import Any

import numpy as np
from absl import flags

from examples.llama_pretrain import cli, configs

# Fields a sweep varies; runs whose configs agree on everything else are comparable.
SWEPT = ("optimizer", "rank", "adamw_learning_rate", "seed", "vocab_size")
NAMES = {
    "adamw": "AdamW",
    "adamw_control": "AdamW control",
    "galore": "GaLore",
    "fira": "Fira",
    "fira_no_limiter": "Fira w/o limiter",
    "fira_no_phi": "Fira w/o φ",
    "apollo": "APOLLO",
    "apollo_mini": "APOLLO-Mini",
    "golore": "GoLore",
    "frugal": "FRUGAL",
}
DEFAULT_REFERENCE = pathlib.Path(__file__).parent / "results" / "sweep_shakespeare.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep."""

    optimizer: str
    seed: int
    rank: int | None = None  # Low-rank optimizers.
    lr: float | None = None  # adamw / adamw_control: adamw_learning_rate.

    @property
    def group(self) -> str:
        if self.optimizer in configs.LOW_RANK_OPTIMIZERS:
            return f"{self.optimizer}_r{self.rank}"
        return f"{self.optimizer}_lr{self.lr:g}"

    def directory(self, workdir: pathlib.Path) -> pathlib.Path:
        return workdir / self.group / f"seed{self.seed}"

    def config(self, base: configs.Config) -> configs.Config:
        kw: dict[str, Any] = dict(optimizer=self.optimizer, seed=self.seed)
        if self.rank is not None:
            kw["rank"] = self.rank
        if self.lr is not None:
            kw["adamw_learning_rate"] = self.lr
        return dataclasses.replace(base, **kw)


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]


def ema(values: list[float], decay: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam / TensorBoard smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** (i + 1)))
    return out


# --------------------------------------------------------------------------- running


def _comparable(stored: dict, wanted: dict) -> bool:
    """Whether a stored run's config equals ``wanted`` outside the swept fields. A field the
    stored config lacks (the run predates it) counts as the field's default, which keeps the
    behaviour from before the field existed."""
    defaults = {f.name: f.default for f in dataclasses.fields(configs.Config)}
    stored = {**{k: defaults.get(k) for k in wanted if k not in stored}, **stored}
    return {k: v for k, v in stored.items() if k not in SWEPT} == {
        k: v for k, v in wanted.items() if k not in SWEPT
    }


def finished(run: Run, base: configs.Config, workdir: pathlib.Path) -> dict | None:
    """The final metrics of ``run`` if it finished with the config it would get now."""
    directory = run.directory(workdir)
    try:
        result = json.loads((directory / "final_metrics.json").read_text())
        stored = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        return None
    wanted = dataclasses.asdict(run.config(base))
    # AdamW runs do not depend on the rank (their labels come from the rank-free mask).
    keys = [k for k in SWEPT if k != "vocab_size" and not (k == "rank" and run.rank is None)]
    same = all(stored.get(k) == wanted[k] for k in keys)
    return result if same and _comparable(stored, wanted) else None


def train_run(
    run: Run, base: configs.Config, workdir: pathlib.Path, mesh: str | None = None
) -> dict:
    result = finished(run, base, workdir)
    if result is None:
        from examples.llama_pretrain import train

        result = train.train_and_evaluate(run.config(base), run.directory(workdir), mesh=mesh)
    print(json.dumps({"run": run.group, **result}))
    return result


def best_lr(results: dict[Run, dict], lrs: list[float], seeds: list[int]) -> float | None:
    """The AdamW rate with the lowest mean final val loss over ``seeds`` (all finished)."""
    means = {}
    for lr in lrs:
        losses = [results.get(Run("adamw", s, lr=lr)) for s in seeds]
        if all(losses):
            means[lr] = float(np.mean([r["final_val_loss"] for r in losses]))
    return min(means, key=means.get) if means else None


def run_sweep(
    base: configs.Config,
    workdir: pathlib.Path,
    optimizers: list[str],
    ranks: list[int],
    seeds: list[int],
    adamw_lrs: list[float],
    lr_sweep_seeds: int,
    train_fn=train_run,
) -> None:
    """Trains (or reuses) every run of the sweep, seed by seed; see the module docstring."""
    results: dict[Run, dict] = {}
    sweep_seeds = seeds[:lr_sweep_seeds]
    for seed in seeds:
        for name in optimizers:
            if name in configs.LOW_RANK_OPTIMIZERS:
                todo = [Run(name, seed, rank=r) for r in ranks]
            elif name == "adamw" and seed in sweep_seeds:
                todo = [Run(name, seed, lr=lr) for lr in adamw_lrs]
            elif name == "adamw":  # The sweep seeds are done: the best rate only.
                lr = best_lr(results, adamw_lrs, sweep_seeds)
                todo = [] if lr is None else [Run(name, seed, lr=lr)]
            elif name == "adamw_control":
                lr = best_lr(results, adamw_lrs, sweep_seeds) if "adamw" in optimizers else None
                todo = [Run(name, seed, lr=base.adamw_learning_rate if lr is None else lr)]
            else:
                raise ValueError(f"Unknown optimizer {name!r}; choose from {configs.OPTIMIZERS}")
            for run in todo:
                results[run] = train_fn(run, base, workdir)


# --------------------------------------------------------------------------- collecting


def collect(workdir: pathlib.Path, base: configs.Config) -> list[dict]:
    """Every finished run under ``workdir`` comparable with ``base``: metrics + run fields."""
    rows = []
    for path in sorted(workdir.glob("*/seed*/final_metrics.json")):
        stored = json.loads((path.parent / "config.json").read_text())
        if not _comparable(stored, dataclasses.asdict(base)):
            continue
        result = json.loads(path.read_text())
        name = stored["optimizer"]
        low_rank = name in configs.LOW_RANK_OPTIMIZERS
        run = Run(
            name,
            stored["seed"],
            rank=stored["rank"] if low_rank else None,
            lr=None if low_rank else stored["adamw_learning_rate"],
        )
        extra = dict(group=run.group, lr=run.lr, rank=run.rank, seed=run.seed)
        rows.append({**result, **extra, "dir": str(path.parent)})
    return rows


def group_stats(rows: list[dict]) -> dict[str, dict]:
    """Per group (optimizer and rank, or optimizer and lr): mean, sd, min, max over seeds."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    out = {}
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        losses = np.array([r["final_val_loss"] for r in members])
        out[key] = {
            "optimizer": members[0]["optimizer"],
            "rank": members[0]["rank"],
            "lr": members[0]["lr"],
            "n": len(members),
            "mean": float(losses.mean()),
            "sd": float(losses.std(ddof=1)) if len(members) > 1 else float("nan"),
            "min": float(losses.min()),
            "max": float(losses.max()),
            "seeds": [r["seed"] for r in members],
            "values": [float(v) for v in losses],
        }
    return out


def adamw_best(stats: dict[str, dict], name: str = "adamw") -> dict | None:
    """The ``name`` group with the most seeds, then the lowest mean (the tuned rate)."""
    groups = [g for g in stats.values() if g["optimizer"] == name]
    return min(groups, key=lambda g: (-g["n"], g["mean"])) if groups else None


# --------------------------------------------------------------------------- claims


def fmt(g: dict, digits: int = 3) -> str:
    if g["n"] > 1:
        return f"{g['mean']:.{digits}f} ± {g['sd']:.{digits}f}"
    return f"{g['mean']:.{digits}f}"


def load_reference(path: pathlib.Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


def spread_of(g: dict, reference: dict | None) -> float | None:
    """The seed range (max - min) of ``g``; for a one-seed group, of its ``reference`` twin."""
    if g["n"] > 1:
        return g["max"] - g["min"]
    ref = (reference or {}).get("groups", {}).get(group_key(g))
    return ref["max"] - ref["min"] if ref and ref["n"] > 1 else None


def with_proxy_spreads(reference: dict | None, stats: dict[str, dict]) -> dict:
    """``reference`` plus, for each one-seed group it lacks, a stand-in seed range: the
    largest range of the multi-seed groups at the same rank (low-rank optimizers) or of the
    same optimizer (AdamW)."""
    groups = dict((reference or {}).get("groups", {}))
    for key, g in stats.items():
        if g["n"] > 1 or (key in groups and groups[key]["n"] > 1):
            continue
        if g["rank"] is not None:
            peers = [x for x in stats.values() if x["rank"] == g["rank"] and x["n"] > 1]
        else:
            peers = [x for x in stats.values() if x["optimizer"] == g["optimizer"] and x["n"] > 1]
        if peers:
            spread = max(x["max"] - x["min"] for x in peers)
            groups[key] = {"n": 2, "min": 0.0, "max": spread}
    return {**(reference or {}), "groups": groups}


def compare_groups(a: dict, b: dict, reference: dict | None = None) -> tuple[float, str | None]:
    """``(mean_a - mean_b, verdict)``: "lower" / "higher" when the difference is larger than
    the seed spread, "within" when not, None when there is no spread to compare with.

    Several seeds on both sides: larger than the spread means that the seeds' ranges do not
    overlap (every seed of one beats every seed of the other). One seed on either side: the
    difference must exceed the larger seed range (max - min) of the two groups, taken from
    ``reference`` (a rank sweep's ``results.json``) for a group with one seed.
    """
    delta = a["mean"] - b["mean"]
    if a["n"] > 1 and b["n"] > 1:
        if a["max"] < b["min"]:
            return delta, "lower"
        if a["min"] > b["max"]:
            return delta, "higher"
        return delta, "within"
    spreads = [spread_of(g, reference) for g in (a, b)]
    if None in spreads:
        return delta, None
    if abs(delta) <= max(spreads):
        return delta, "within"
    return delta, "lower" if delta < 0 else "higher"


def group_key(g: dict) -> str:
    if g["rank"] is not None:
        return f"{g['optimizer']}_r{g['rank']}"
    return f"{g['optimizer']}_lr{g['lr']:g}"


def label(g: dict) -> str:
    if g["rank"] is None:
        return f"{NAMES[g['optimizer']]} at lr {g['lr']:g}"
    return NAMES[g["optimizer"]]


def verdict_text(a: dict, b: dict, reference: dict | None) -> str:
    """How ``a`` compares with ``b``, e.g. "0.131 below GaLore (1.552 vs 1.683; ...)"."""
    delta, verdict = compare_groups(a, b, reference)
    spreads = [x for x in (spread_of(a, reference), spread_of(b, reference)) if x is not None]
    if a["n"] > 1 and b["n"] > 1:
        seeds = f"{a['n']} vs {b['n']} seeds"
        rule = (
            f"every seed, {seeds}" if verdict in ("lower", "higher") else f"ranges overlap, {seeds}"
        )
    elif spreads and verdict is not None:
        rule = f"seed spread of one run {max(spreads):.3f}"
    else:
        rule = "one seed, no measured seed spread: no claim"
    numbers = f"{fmt(a)} vs {fmt(b)}; {rule}"
    if verdict in ("lower", "higher"):
        where = "below" if verdict == "lower" else "above"
        return f"{abs(delta):.3f} {where} {label(b)} ({numbers})"
    if verdict == "within":
        return f"level with {label(b)} within the seed spread ({delta:+.3f}: {numbers})"
    return f"{delta:+.3f} against {label(b)} ({numbers})"


def summary(
    stats: dict[str, dict], ranks: list[int], reference: dict | None, d_model: int
) -> list[str]:
    """Sentences on what the runs show, per rank: Fira vs GaLore and AdamW, the ablations."""
    lines = []
    adamw = adamw_best(stats)
    control = adamw_best(stats, "adamw_control")
    for rank in ranks:
        fira, galore = stats.get(f"fira_r{rank}"), stats.get(f"galore_r{rank}")
        if fira is None:
            continue
        others = (galore, adamw, control)
        parts = [verdict_text(fira, other, reference) for other in others if other]
        if not parts:
            continue
        text = f"At rank {rank} of {d_model}, Fira's final val loss is " + ", ".join(parts)
        ablations = [
            f"{what} is {verdict_text(g, fira, reference)}"
            for name, what in (
                ("fira_no_limiter", "without the limiter"),
                ("fira_no_phi", "without φ"),
            )
            if (g := stats.get(f"{name}_r{rank}"))
        ]
        if ablations:
            text += "; Fira " + "; Fira ".join(ablations)
        lines.append(text + ".")
    if adamw and control:
        lines.append(
            f"{label(control)} with embeddings, head and norms at the low-rank runs' rate: "
            f"{verdict_text(control, adamw, reference)}."
        )
    return lines


# --------------------------------------------------------------------------- report


def plot_curves(out: pathlib.Path, curves: list[tuple[str, pathlib.Path]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lows, highs = [], []
    for i, (name, run_dir) in enumerate(curves):
        color = f"C{i}"
        train_rows, val_rows = read_metrics(run_dir / "metrics.jsonl")
        steps = [r["step"] for r in train_rows]
        smooth = ema([r["loss"] for r in train_rows])
        vsteps, vloss = [r["step"] for r in val_rows], [r["loss"] for r in val_rows]
        for ax in axes:
            ax.plot(steps, smooth, color=color, label=f"{name} train (EMA)")
            ax.plot(vsteps, vloss, "o--", color=color, label=f"{name} val", markersize=4)
        tail = smooth[len(smooth) // 2 :] + vloss[len(vloss) // 2 :]
        lows.append(min(tail))
        highs.append(max(tail))
    axes[0].set_title("loss (last val point: whole validation split)")
    axes[1].set_title("second half (zoom)")
    if lows:
        margin = 0.05 * (max(highs) - min(lows) + 1e-3)
        axes[1].set_ylim(min(lows) - margin, max(highs) + margin)
        axes[1].set_xlim(left=axes[0].get_xlim()[1] / 2)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_rank_sweep(out: pathlib.Path, stats: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(configs.LOW_RANK_OPTIMIZERS):
        groups = sorted(
            (g for g in stats.values() if g["optimizer"] == name), key=lambda g: g["rank"]
        )
        if not groups:
            continue
        ranks = [g["rank"] for g in groups]
        means = [g["mean"] for g in groups]
        sds = [0.0 if math.isnan(g["sd"]) else g["sd"] for g in groups]
        n = "/".join(sorted({str(g["n"]) for g in groups}))
        label = f"{NAMES[name]} (n={n})"
        ax.errorbar(ranks, means, yerr=sds, marker="o", capsize=4, color=f"C{i}", label=label)
        for g in groups:
            ax.plot([g["rank"]] * g["n"], g["values"], ".", color=f"C{i}", alpha=0.35)
    for name, color in (("adamw", "gray"), ("adamw_control", "C7")):
        g = adamw_best(stats, name)
        if g is None:
            continue
        sd = 0.0 if math.isnan(g["sd"]) else g["sd"]
        ax.axhspan(g["mean"] - sd, g["mean"] + sd, color=color, alpha=0.2 if sd else 0.0)
        label = f"{NAMES[name]} lr {g['lr']:g}, mean ± sd (n={g['n']})"
        ax.axhline(g["mean"], color=color, ls="--" if name == "adamw" else ":", label=label)
    ax.set_xscale("log", base=2)
    ranks = sorted({g["rank"] for g in stats.values() if g["rank"] is not None})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank", ylabel="final val loss (nats / token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(
    workdir: pathlib.Path,
    config_name: str,
    config: configs.Config,
    reference_path: pathlib.Path | None,
    wall_s: float | None = None,
) -> pathlib.Path:
    import jax

    rows = collect(workdir, config)
    if not rows:
        raise FileNotFoundError(f"No finished runs comparable with the config under {workdir}")
    stats = group_stats(rows)
    reference = load_reference(reference_path)
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    seeds = sorted({r["seed"] for r in rows})
    data = config.data_path or "bundled Shakespeare corpus"
    cpu_s = sum(r["total_time_s"] for r in rows)
    lines = [
        f"# AdamW vs GaLore vs Fira: `{config_name}` config",
        "",
        f"{config.num_layers} layers, d_model {config.d_model}, FFN {config.ffn_dim}, "
        f"{config.num_heads} heads, vocab {config.vocab_size}, "
        f"{rows[0]['num_params'] / 1e6:.2f}M params; {config.num_train_steps} steps of "
        f"{config.batch_size * config.grad_accum_steps} x {config.max_seq_len} tokens; "
        f"rank {', '.join(map(str, ranks)) or '-'} (of d_model {config.d_model}), "
        f"update_proj_gap {config.update_proj_gap}, scale {config.scale}, γ {config.gamma}; "
        f"peak lr {config.learning_rate:g} (low-rank optimizers) / AdamW as listed, "
        f"{config.warmup_frac:.0%} warm-up, cosine to {config.final_lr_frac:g}x; "
        f"seeds {', '.join(map(str, seeds))}; data: {data} (byte-level; last "
        f"{config.val_fraction:.0%} of every document held out). Final val loss: mean "
        f"cross-entropy over the whole validation split ({rows[0]['final_val_tokens']:,} "
        "tokens).",
        "",
        f"Machine: {platform.machine()}, JAX {jax.__version__} on {jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores; {len(rows)} runs, {cpu_s / 60:.1f} min of run time in all"
        + (f", this invocation {wall_s / 60:.1f} min wall" if wall_s is not None else "")
        + f"; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "## What the runs show",
        "",
    ]
    sentences = summary(stats, ranks, with_proxy_spreads(reference, stats), config.d_model)
    if any(g["n"] < 2 for g in stats.values()):
        twin = (
            f"that of its twin in the rank sweep `{reference_path.name}` "
            f"({reference.get('data', '?')}), else "
            if reference
            else ""
        )
        sentences.append(
            f"The seed spread of a one-seed group is {twin}the largest seed range measured "
            "here at the same rank (low-rank optimizers) or for the same optimizer (AdamW)."
        )
    lines += [f"- {s}" for s in sentences] or ["- (no Fira run yet)"]
    present = {g["optimizer"] for g in stats.values()}
    low_rank = [n for n in configs.LOW_RANK_OPTIMIZERS if n in present]
    if low_rank:
        lines += [
            "",
            "## Final val loss, mean ± sd over seeds (n)",
            "",
            "| optimizer | " + " | ".join(f"rank {r}" for r in ranks) + " |",
            "|---|" + "---:|" * len(ranks),
        ]
        for name in low_rank:
            cells = []
            for r in ranks:
                g = stats.get(f"{name}_r{r}")
                cells.append(f"{fmt(g, 4)} ({g['n']})" if g else "-")
            lines.append(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    adamw_groups = sorted(
        (g for g in stats.values() if g["optimizer"] in ("adamw", "adamw_control")),
        key=lambda g: (g["optimizer"], g["lr"]),
    )
    if adamw_groups:
        best = adamw_best(stats)
        lines += [
            "",
            "## AdamW (full rank): learning-rate sweep and control",
            "",
            "| optimizer | lr (matrices) | lr (embeddings, head, norms) | final val loss | n "
            "| per seed |",
            "|---|---:|---:|---:|---:|---|",
        ]
        num_lrs = sum(g["optimizer"] == "adamw" for g in adamw_groups)
        for g in adamw_groups:
            rest = config.learning_rate if g["optimizer"] == "adamw_control" else g["lr"]
            mark = " **(best)**" if g is best and num_lrs > 1 else ""
            lines.append(
                f"| {NAMES[g['optimizer']]}{mark} | {g['lr']:g} | {rest:g} | {fmt(g, 4)} | "
                f"{g['n']} | {', '.join(f'{v:.4f}' for v in g['values'])} |"
            )
    base = adamw_best(stats)
    base_bytes = next((r["opt_state_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    lines += [
        "",
        "## Runs",
        "",
        "| run | seed | final val loss | val perplexity | optimizer-state bytes | vs AdamW "
        "| ms/step | total time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], r["group"])):
        rel = f"{r['opt_state_bytes'] / base_bytes:.2f}x" if base_bytes else "-"
        lines.append(
            f"| {r['group']} | {r['seed']} | {r['final_val_loss']:.4f} | "
            f"{r['final_val_perplexity']:.3f} | {r['opt_state_bytes']:,} | {rel} | "
            f"{r['mean_step_ms']:.1f} | {r['total_time_s']:.1f} |"
        )
    lines += [
        "",
        "ms/step: mean wall time of a training step after the first (compile) step; total "
        "time includes data loading, compilation and evaluation. Optimizer-state bytes: all "
        "optimizer-state arrays (moments, projection bases, counters).",
        "",
    ]
    # Loss curves: the first seed's runs at the config's rank (or the only rank), AdamW at
    # its best rate.
    seed0, rank0 = seeds[0], config.rank if config.rank in ranks else (ranks or [None])[0]
    curves = []
    for r in sorted(rows, key=lambda r: list(NAMES).index(r["optimizer"])):
        if r["seed"] != seed0:
            continue
        if r["rank"] is not None and r["rank"] != rank0:
            continue
        if r["optimizer"] == "adamw" and base and r["lr"] != base["lr"]:
            continue
        curves.append((r["group"], pathlib.Path(r["dir"])))
    if curves:
        plot_curves(workdir / "loss_curves.png", curves, f"{config_name}, seed {seed0}: {data}")
        lines += ["![loss curves](loss_curves.png)", ""]
    if len(ranks) > 1:
        plot_rank_sweep(
            workdir / "val_loss_vs_rank.png",
            stats,
            f"{config_name}, {config.num_train_steps} steps, d_model {config.d_model}: "
            f"{pathlib.Path(data).name}",
        )
        lines += ["![final val loss vs rank](val_loss_vs_rank.png)", ""]
    out = workdir / "results.md"
    out.write_text("\n".join(lines))
    summary_json = {
        "config": config_name,
        "data": data,
        "ranks": ranks,
        "seeds": seeds,
        "groups": stats,
        "runs": rows,
        "run_time_s": cpu_s,
        "summary": sentences,
    }
    (workdir / "results.json").write_text(json.dumps(summary_json, indent=2))
    return out


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_flags(flag_values, argv)
    for name in ("config", "mesh"):  # Listed by --help.
        flags.declare_key_flag(name, flag_values=flag_values)
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", "runs/compare", "Output folder: the runs and the report.", **fv)
    flags.DEFINE_list(
        "optimizers", ["adamw", "adamw_control", "galore", "fira"], "Of configs.OPTIMIZERS.", **fv
    )
    flags.DEFINE_list(
        "ranks", None, "Ranks of the low-rank optimizers; default: the config's.", **fv
    )
    flags.DEFINE_integer("seeds", 1, "Seeds seed, seed + 1, ...", lower_bound=1, **fv)
    flags.DEFINE_list(
        "adamw_lrs", None, "AdamW learning rates; default: adamw_learning_rate.", **fv
    )
    flags.DEFINE_integer(
        "lr_sweep_seeds", 1, "Seeds of every AdamW rate (then: the best).", lower_bound=1, **fv
    )
    flags.DEFINE_string(
        "reference",
        str(DEFAULT_REFERENCE),
        "A rank sweep's results.json: the seed spreads for one-seed runs ('' for none).",
        **fv,
    )
    flags.DEFINE_bool("plot_only", False, "Rebuild the report from the finished runs.", **fv)

    def known(names: list[str]) -> bool:
        return set(names) <= set(configs.OPTIMIZERS)

    def numbers(kind):
        def check(values: list[str] | None) -> bool:
            try:
                return values is None or all(kind(v) > 0 for v in values)
            except ValueError:
                return False

        return check

    flags.register_validator(
        "optimizers", known, f"must be of {', '.join(configs.OPTIMIZERS)}", **fv
    )
    flags.register_validator("ranks", numbers(int), "must be integers >= 1", **fv)
    flags.register_validator("adamw_lrs", numbers(float), "must be numbers > 0", **fv)


def parse_flags(argv: list[str]) -> tuple[configs.Config, flags.FlagValues]:
    """The validated config and the flags of ``argv`` (program name first), parsed into
    fresh ``FlagValues``; a bad flag or field raises ``flags.Error``."""
    flag_values = flags.FlagValues()
    return cli.parse(argv, flag_values, define_flags), flag_values


def run(config: configs.Config, flag_values: flags.FlagValues) -> pathlib.Path:
    """Trains (or reuses) the runs the flags ask for and writes the report; its path."""
    fv = flag_values
    workdir = pathlib.Path(fv.workdir)
    start = time.perf_counter()
    if not fv.plot_only:
        run_sweep(
            config,
            workdir,
            fv.optimizers,
            [int(r) for r in fv.ranks] if fv.ranks else [config.rank],
            [config.seed + i for i in range(fv.seeds)],
            [float(x) for x in fv.adamw_lrs] if fv.adamw_lrs else [config.adamw_learning_rate],
            fv.lr_sweep_seeds,
            train_fn=functools.partial(train_run, mesh=fv.mesh),
        )
    reference = pathlib.Path(fv.reference) if fv.reference else None
    if reference is not None and reference.resolve() == (workdir / "results.json").resolve():
        reference = None
    wall = None if fv.plot_only else time.perf_counter() - start
    report = write_report(workdir, cli.preset_name(fv), config, reference, wall)
    print(report.read_text())
    print(f"Wrote {report} and the figures next to it")
    return report


def main(argv: list[str]) -> pathlib.Path:
    """``run`` with the flags of ``argv`` (without the program name), for scripts and tests."""
    return run(*parse_flags(["compare", *argv]))


if __name__ == "__main__":
    cli.run_app(define_flags, run)
