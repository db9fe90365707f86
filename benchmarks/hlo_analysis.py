"""Where does the update's time go? Counts ops in the optimized HLO of `tx.update`.

For one layer of LLaMA shapes (7 projected matrices, or any `--size` of `step_time.SIZES`)
this compiles the jitted, donating update of `fo.fira`, `fo.galore`, `optax.contrib.galore`
and `optax.adamw` and reports, for the ENTRY computation (the non-refresh path: the SVD lives
in the `conditional`'s branch computations):

* dots and their shapes (each m×n×k matmul is one projection or one projection back);
* full-size ops: instructions whose output has ≥ the smallest matrix's m·n elements, by
  opcode (fusion kinds, copy/transpose, dot, reduce): each is (at least) one pass over a
  full-size buffer;
* custom calls (LAPACK SVD / QR / eigh) and conditionals anywhere in the module;
* XLA's cost analysis (flops, bytes accessed: note it sums over both branches of a cond).

Usage::

    python -m benchmarks.hlo_analysis --size 60m --layers 1 [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re

import jax
import numpy as np

from benchmarks.step_time import HUGE_GAP, SIZES, jax_optimizers, make_tree
from fira_optax import _testing

INSTR = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(?[a-z0-9]+\[[^\]]*\][^ ]*|\([^=]*?\)) ([\w\-]+)\("
)
SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def numel(shape_str: str) -> int:
    total = 0
    for _, dims in SHAPE.findall(shape_str):
        total = max(total, int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1)
    return total


def analyse(text: str, min_full: int) -> dict:
    comps = _testing.hlo_computations(text)
    entry = comps.get(_testing.hlo_entry(text), [])
    dots, full, opcodes = [], collections.Counter(), collections.Counter()
    for line in entry:
        m = INSTR.match(line)
        if not m:
            continue
        _, shape, op = m.groups()
        opcodes[op] += 1
        kind = ""
        if op == "fusion":
            k = re.search(r"kind=(k\w+)", line)
            kind = k.group(1) if k else ""
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = comps.get(called.group(1), []) if called else []
            if any(" dot(" in b for b in body):
                kind += "+dot"
            if any(" reduce(" in b for b in body):
                kind += "+reduce"
        if op in ("dot", "convolution") or (op == "fusion" and "dot" in kind):
            dots.append(shape)
        if numel(shape) >= min_full and op not in ("parameter", "get-tuple-element", "tuple"):
            full[f"{op}{'(' + kind + ')' if kind else ''}"] += 1
    custom = collections.Counter()
    for lines in comps.values():
        for line in lines:
            t = re.search(r'custom_call_target="([^"]+)"', line)
            if t:
                custom[t.group(1)] += 1
    n_cond = sum(1 for line in entry if " conditional(" in line)
    return {
        "dots": dots,
        "full": full,
        "custom": custom,
        "conditionals": n_cond,
        "entry_ops": sum(opcodes.values()),
        "fusions": opcodes["fusion"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="60m")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dump", default=None, help="write each optimized HLO text here")
    parser.add_argument("--only", default=None, help="comma list of optimizer names")
    args = parser.parse_args(argv)
    size = dataclasses.replace(SIZES[args.size], layers=args.layers)
    params, grads = make_tree(size, 0), make_tree(size, 1)
    min_full = min(m * n for m, n in size.shapes().values())
    print(f"{size.name}, {args.layers} layer(s), {len(size.shapes())} matrices, rank {size.rank}")
    for name, tx in jax_optimizers(size.rank, HUGE_GAP).items():
        if args.only and name not in args.only.split(","):
            continue
        state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(tx.update, donate_argnums=(0, 1)).lower(grads, state, params).compile()
        text = compiled.as_text()
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            fname = re.sub(r"[^\w.]+", "_", name) + ".hlo.txt"
            with open(os.path.join(args.dump, fname), "w") as f:
                f.write(text)
        a = analyse(text, min_full)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ma = compiled.memory_analysis()
        print(f"\n## {name}")
        print(
            f"  ENTRY ops: {a['entry_ops']}, fusions: {a['fusions']}, "
            f"conditionals: {a['conditionals']}"
        )
        print(
            f"  dots in ENTRY ({len(a['dots'])}): "
            + ", ".join(f"{s}×{c}" for s, c in collections.Counter(a["dots"]).items())
        )
        print(f"  full-size (≥{min_full} elems) ENTRY ops: {dict(a['full'])}")
        print(f"  custom calls (whole module): {dict(a['custom'])}")
        if cost:
            print(
                f"  cost_analysis: flops {cost.get('flops', 0) / 1e9:.3f} G, "
                f"bytes accessed {cost.get('bytes accessed', 0) / 2**20:.1f} MiB (both branches)"
            )
        if ma is not None:
            print(
                f"  temp {ma.temp_size_in_bytes / 2**20:.2f} MiB, "
                f"alias {ma.alias_size_in_bytes / 2**20:.2f} MiB"
            )


if __name__ == "__main__":
    main()
