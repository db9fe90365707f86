"""The command line of ``main.py`` and ``compare.py``: absl flags with an ``ml_collections`` config.

``--config`` names a config file and a preset, as in the flax examples
(``--config=examples/llama_pretrain/configs.py:llama_60m``; default: ``configs.py:tiny``), and
``--config.FIELD=VALUE`` overrides one field of it (after ``--config``, when it is given),
parsed with the field's type by ``ml_collections.config_flags``: a bool takes ``true`` /
``false`` (also ``t`` / ``f`` / ``1`` / ``0``, any case; ``--config.scan_layers`` alone is
true), an int an integer, a float a number; a value that does not parse and a field that the
config lacks are errors. The config is then validated as a whole (``configs.from_config_dict``):
an error names the field and the values it accepts.
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from examples.llama_pretrain import configs

#: The config file of the presets; ``--config=FILE:PRESET``.
CONFIG_FILE = pathlib.Path(configs.__file__).resolve()
DEFAULT_CONFIG = f"{CONFIG_FILE}:tiny"
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)")


def define_config_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    """``--config`` (and its ``--config.FIELD`` overrides, read from ``argv``) and ``--mesh``.

    The caller declares them as its key flags (``--help`` lists a module's key flags)."""
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "FILE:PRESET, e.g. examples/llama_pretrain/configs.py:llama_60m (presets: "
        f"{', '.join(configs.PRESETS)}). Override a field with --config.FIELD=VALUE.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string(
        "mesh",
        None,
        'Device mesh axis sizes, e.g. "fsdp=4,tensor=2" (default: every device on data).',
        flag_values=flag_values,
    )


DefineFlags = Callable[[flags.FlagValues, list[str]], None]


def parse(
    argv: list[str], flag_values: flags.FlagValues, define_flags: DefineFlags
) -> configs.Config:
    """Defines the flags in ``flag_values`` (``define_flags(flag_values, argv)``) and parses
    ``argv`` (program name first) into them; returns the validated config.

    Raises ``flags.Error`` with a message naming the flag or the field.
    """
    try:
        define_flags(flag_values, argv)  # Parses the default config and its overrides.
        rest = flag_values(argv)
    except flags.IllegalFlagValueError as e:
        if "Error whilst parsing config file" not in str(e):
            raise
        # get_config raised (an unknown preset): its message, not config_flags' traceback.
        raise flags.IllegalFlagValueError(f"--config: {str(e).strip().splitlines()[-1]}") from None
    except (AttributeError, KeyError):  # config_flags: an override of a missing field.
        names = [m.group(2) for m in map(_OVERRIDE.match, argv) if m]
        unknown = [n for n in names if n not in configs.FIELD_TYPES] or names
        raise flags.Error(
            f"--config.{unknown[0]}: no such field; fields are {', '.join(configs.FIELD_TYPES)}"
        ) from None
    if len(rest) > 1:
        raise flags.Error(f"Unexpected arguments {rest[1:]}")
    try:
        return configs.from_config_dict(flag_values.config)
    except OSError as e:  # The config file did not load.
        raise flags.Error(str(e)) from None
    except ValueError as e:
        raise flags.IllegalFlagValueError(str(e)) from None


def preset_name(flag_values: flags.FlagValues) -> str:
    """The preset of ``--config`` (``tiny`` for ``configs.py:tiny``; else the file's name)."""
    spec = flag_values["config"].config_filename
    path, _, preset = spec.partition(":")
    return preset or pathlib.Path(path).stem


def run_app(
    define_flags: DefineFlags,
    run: Callable[[configs.Config, flags.FlagValues], Any],
) -> None:
    """``absl.app.run`` of ``run(config, flags.FLAGS)``: ``--help`` and errors as absl has
    them (a bad flag or field prints one line and exits with status 1)."""

    def parser(argv: list[str]) -> configs.Config:
        try:
            return parse(argv, flags.FLAGS, define_flags)
        except flags.Error as e:
            sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
            sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
            sys.exit(1)

    def main(config: configs.Config) -> None:
        run(config, flags.FLAGS)

    app.run(main, flags_parser=parser)
