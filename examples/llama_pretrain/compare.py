"""Compare AdamW, GaLore and Fira on the same model, data, seed and schedule.

From the repository root::

    python -m examples.llama_pretrain.compare --config tiny --workdir runs/compare

trains the ``tiny`` config (about 2 minutes per optimizer on two CPU cores) once per
optimizer, one after another, in ``workdir/<optimizer>/``, then writes

* ``workdir/results.md``: final validation loss / perplexity, optimizer-state bytes,
  mean step time (compile excluded) and total wall time per optimizer,
* ``workdir/loss_curves.png``: smoothed training loss (lines) and validation loss
  (markers) against the step.

Only the optimizer differs between the runs: AdamW uses ``adamw_learning_rate`` (1e-3),
GaLore and Fira use ``learning_rate`` (0.01), all with the same warm-up + cosine schedule,
as in the papers. ``--optimizers``, ``--data_path`` and ``--set key=value`` work as in
``main.py``; ``--plot_only`` rebuilds the report from existing runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform

from examples.llama_pretrain import configs, train


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


def plot(workdir: pathlib.Path, names: list[str], title: str) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lows, highs = [], []
    for i, name in enumerate(names):
        color = f"C{i}"
        train_rows, val_rows = read_metrics(workdir / name / "metrics.jsonl")
        steps = [r["step"] for r in train_rows]
        smooth = ema([r["loss"] for r in train_rows])
        vsteps, vloss = [r["step"] for r in val_rows], [r["loss"] for r in val_rows]
        for ax in axes:
            ax.plot(steps, smooth, color=color, label=f"{name} train (EMA)")
            ax.plot(vsteps, vloss, "o--", color=color, label=f"{name} val", markersize=4)
        tail = smooth[len(smooth) // 2 :] + vloss[len(vloss) // 2 :]
        lows.append(min(tail))
        highs.append(max(tail))
    axes[0].set_title("loss")
    axes[1].set_title("second half (zoom)")
    if lows:
        margin = 0.05 * (max(highs) - min(lows) + 1e-3)
        axes[1].set_ylim(min(lows) - margin, max(highs) + margin)
        axes[1].set_xlim(left=axes[0].get_xlim()[1] / 2)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = workdir / "loss_curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(
    workdir: pathlib.Path, config_name: str, config: configs.Config, results: list[dict]
) -> pathlib.Path:
    import jax

    base = next((r for r in results if r["optimizer"] == "adamw"), None)
    lines = [
        f"# AdamW vs GaLore vs Fira: `{config_name}` config",
        "",
        f"{config.num_layers} layers, d_model {config.d_model}, FFN {config.ffn_dim}, "
        f"{config.num_heads} heads, vocab {config.vocab_size}, "
        f"{results[0]['num_params'] / 1e6:.2f}M params; {config.num_train_steps} steps of "
        f"{config.batch_size * config.grad_accum_steps} x {config.max_seq_len} tokens; "
        f"rank {config.rank}, update_proj_gap {config.update_proj_gap}, scale {config.scale}; "
        f"lr {config.adamw_learning_rate:g} (AdamW) / {config.learning_rate:g} (GaLore, Fira), "
        f"{config.warmup_frac:.0%} warm-up, cosine to {config.final_lr_frac:g}x; "
        f"seed {config.seed}; data: {config.data_path or 'bundled Shakespeare (byte-level)'}.",
        "",
        f"Machine: {platform.machine()}, JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores; load average at the end "
        f"{os.getloadavg()[0]:.1f} (timings are wall-clock and shift with other load).",
        "",
        "| optimizer | final val loss | val perplexity | optimizer-state bytes | "
        "vs AdamW | ms/step | total time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rel = f"{r['opt_state_bytes'] / base['opt_state_bytes']:.2f}x" if base else "-"
        lines.append(
            f"| {r['optimizer']} | {r['final_val_loss']:.4f} | {r['final_val_perplexity']:.3f} | "
            f"{r['opt_state_bytes']:,} | {rel} | {r['mean_step_ms']:.1f} | "
            f"{r['total_time_s']:.1f} |"
        )
    lines += [
        "",
        "ms/step is the mean wall time of a training step after the first (compile) step; "
        "total time includes data loading, compilation, evaluation and checkpointing. "
        "Optimizer-state bytes are the summed sizes of all optimizer-state arrays "
        "(moments, projection bases, counters).",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    out = workdir / "results.md"
    out.write_text("\n".join(lines))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(configs.PRESETS))
    parser.add_argument("--workdir", default="runs/compare")
    parser.add_argument("--optimizers", default=",".join(configs.OPTIMIZERS))
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plot_only", action="store_true", help="Reuse finished runs.")
    args = parser.parse_args(argv)

    config = configs.override(configs.get_config(args.config), args.set)
    if args.data_path:
        config = dataclasses.replace(config, data_path=args.data_path)
    workdir = pathlib.Path(args.workdir)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    results = []
    for name in names:
        run_dir = workdir / name
        if args.plot_only:
            result = json.loads((run_dir / "final_metrics.json").read_text())
        else:
            result = train.train_and_evaluate(dataclasses.replace(config, optimizer=name), run_dir)
        results.append(result)
        print(json.dumps(result))
    config = json.loads((workdir / names[0] / "config.json").read_text())
    config = configs.Config(**config)
    report = write_report(workdir, args.config, config, results)
    png = plot(workdir, names, f"{args.config}: {', '.join(names)}")
    print(report.read_text())
    print(f"Wrote {report} and {png}")


if __name__ == "__main__":
    main()
