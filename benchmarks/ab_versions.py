"""Update time of this checkout's `fira_optax` vs an earlier revision's, interleaved in one process.

    .venv/bin/python -m benchmarks.ab_versions --base e0adf39 [--layers 2 --rounds 40]
    taskset -c 1 .venv/bin/python -m benchmarks.ab_versions --base e0adf39   # one core

The base revision's `fira_optax/` is read with `git show` into a temporary folder as the
package `fira_optax_base` (its absolute imports renamed), so both versions run side by side:
`fo.fira` and `fo.galore` at rank 128 on the projected matrices of `--layers` LLaMA-60M layers
(step_time.py's shapes), every round running each of the four once (non-refresh steps, inputs
donated); medians. A "no regression" check for changes to the update path.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import fira_optax
from benchmarks.step_time import SIZES

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_base(rev: str, root: pathlib.Path):
    """`fira_optax` as it was at `rev`, imported as `fira_optax_base` from `root`."""
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "fira_optax/"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    package = root / "fira_optax_base"
    package.mkdir()
    for name in names:
        text = subprocess.run(
            ["git", "show", f"{rev}:{name}"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
        (package / pathlib.Path(name).name).write_text(
            text.replace("fira_optax", "fira_optax_base")
        )
    spec = importlib.util.spec_from_file_location(
        "fira_optax_base", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fira_optax_base"] = module  # its own absolute imports resolve to it
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, pathlib.Path(tmp))
        shapes = dataclasses.replace(SIZES["60m"], layers=args.layers).shapes()
        params = {
            k: 0.02 * jax.random.normal(jax.random.key(i), s)
            for i, (k, s) in enumerate(shapes.items())
        }
        grads = {
            k: jax.random.normal(jax.random.key(100 + i), s)
            for i, (k, s) in enumerate(shapes.items())
        }
        runners = {}
        for label, module in [(f"base {args.base}", base), ("this checkout", fira_optax)]:
            for name in ("fira", "galore"):
                tx = getattr(module, name)(1e-2, args.rank, update_proj_gap=200, scale=0.25)
                update = jax.jit(tx.update, donate_argnums=(1,))
                updates, state = update(grads, tx.init(params), params)  # the refresh step
                jax.block_until_ready(updates)
                runners[f"{name:6s} {label}"] = [update, state]
        times = {key: [] for key in runners}
        for _ in range(args.rounds):
            for key, runner in runners.items():
                g = jax.tree.map(jnp.copy, grads)
                jax.block_until_ready(g)
                start = time.perf_counter()
                updates, runner[1] = runner[0](g, runner[1], params)
                jax.block_until_ready(updates)
                times[key].append(time.perf_counter() - start)
        print(
            f"{args.layers} LLaMA-60M layers ({len(shapes)} matrices), rank {args.rank}, "
            f"{args.rounds} interleaved rounds, jax {jax.__version__}"
        )
        print("| optimizer, version | median ms | min ms |\n|---|---:|---:|")
        for key, values in times.items():
            print(
                f"| {key} | {1e3 * statistics.median(values[2:]):.2f} | {1e3 * min(values):.2f} |"
            )


if __name__ == "__main__":
    main()
