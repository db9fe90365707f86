"""Configs and their command line: every field is checked when a config is built (presets
included), a ``--config.FIELD=VALUE`` override is parsed with the field's type, and a bad one
names the field and what it accepts. Fast: no training."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest
from absl import flags

from examples.llama_pretrain import cli, compare, configs, main

CONFIG = f"--config={cli.CONFIG_FILE}"


def parse(*args: str) -> configs.Config:
    return main.parse_flags(["main", "--workdir=w", *args])[0]


def test_every_preset_is_valid_in_both_views():
    for name, config in configs.PRESETS.items():
        configs.validate(config)
        assert configs.preset(name) is config
        as_dict = configs.get_config(name)
        assert isinstance(as_dict, ml_collections.ConfigDict)
        assert set(as_dict) == set(configs.FIELD_TYPES)
        assert configs.from_config_dict(as_dict) == config
        assert parse(f"{CONFIG}:{name}") == config


def test_config_dict_is_locked_and_typed():
    config = configs.get_config("tiny")
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        config.rnak = 4
    with pytest.raises(TypeError, match="cannot be casted"):
        config.rank = 8.5
    with pytest.raises(TypeError, match="cannot be casted"):
        config.scan_layers = 1
    config.learning_rate = 1  # An int in a float field is cast.
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    config.grad_clip = 2  # An optional field is typed while it is None.
    assert config.grad_clip == 2.0 and isinstance(config.grad_clip, float)
    assert configs.from_config_dict(config).grad_clip == 2.0


@pytest.mark.parametrize(
    "assignment, match",
    [
        (
            "scan_layers=maybe",
            r"^flag --config.scan_layers=maybe: \('Non-boolean argument to boolean flag', "
            r"'maybe'\)$",
        ),
        ("divide_refresh=ture", r"--config.divide_refresh=ture: .*Non-boolean argument"),
        ("scan_layers=yes", r"--config.scan_layers=yes: .*Non-boolean argument"),
        ("grad_accum_steps=0", r"^grad_accum_steps must be an integer >= 1, got 0$"),
        ("batch_size=0", r"^batch_size must be an integer >= 1, got 0$"),
        ("num_train_steps=0", r"^num_train_steps must be an integer >= 2, got 0$"),
        ("num_train_steps=1", r"^num_train_steps must be an integer >= 2, got 1$"),
        ("rank=abc", r"^flag --config.rank=abc: invalid literal for int\(\)"),
        ("rank=8.0", r"^flag --config.rank=8.0: invalid literal for int\(\)"),
        ("rank=none", r"^flag --config.rank=none: invalid literal for int\(\)"),
        ("learning_rate=fast", r"^flag --config.learning_rate=fast: could not convert"),
        ("dtype=float8", r"^dtype must be one of float32, bfloat16, float16; got 'float8'$"),
        ("refresh_schedule=bad", r"refresh_schedule must be one of official, staggered; got"),
        ("optimizer=sgd", r"optimizer must be one of adamw, galore, fira, .*; got 'sgd'"),
        ("proj_type=up", r"proj_type must be one of std, reverse_std, left, right; got 'up'"),
        ("learning_rate=nan", r"learning_rate must be a finite number in \(0, inf\), got nan"),
        ("learning_rate=0", r"learning_rate must be a finite number in \(0, inf\)"),
        ("warmup_frac=1", r"warmup_frac must be a finite number in \[0, 1\), got 1.0"),
        ("b2=1", r"b2 must be a finite number in \[0, 1\)"),
        ("gamma=0.5", r"gamma must be a finite number in \[1, inf\)"),
        ("grad_clip=0", r"grad_clip must be a finite number in \(0, inf\)"),
        ("val_fraction=0", r"val_fraction must be a finite number in \(0, 1\)"),
        ("eval_every=0", r"eval_every must be an integer >= 1"),
        ("log_every=0", r"log_every must be an integer >= 1"),
        ("checkpoint_every=-1", r"checkpoint_every must be an integer >= 0"),
        ("seed=-1", r"seed must be an integer >= 0"),
        ("num_heads=3", r"d_model must be num_heads times an even head dimension"),
        ("d_model=100", r"d_model must be num_heads times an even head dimension"),
        ("no_such_field=1", r"^--config.no_such_field: no such field; fields are vocab_size, "),
    ],
)
def test_bad_override_names_the_key_and_what_it_accepts(assignment, match):
    with pytest.raises(flags.Error, match=match):
        parse(f"--config.{assignment}")
    with pytest.raises(flags.Error, match=match):  # After an explicit --config too.
        parse(f"{CONFIG}:llama_60m", f"--config.{assignment}")


@pytest.mark.parametrize(
    "raw, value",
    [("true", True), ("TRUE", True), ("t", True), ("1", True)]
    + [("false", False), ("False", False), ("F", False), ("0", False)],
)
def test_bool_override_accepts_absl_words(raw, value):
    for key in ("scan_layers", "divide_refresh"):
        assert getattr(parse(f"--config.{key}={raw}"), key) is value


def test_bare_bool_override_sets_true_and_no_prefix_false():
    assert parse("--config.scan_layers").scan_layers is True
    assert parse("--noconfig.divide_refresh").divide_refresh is False


def test_good_overrides_parse_with_the_field_type():
    config = parse(
        "--config.rank=4", "--config.learning_rate=3e-3", "--config.grad_clip=1",
        "--config.data_path=/data/corpus", "--config.d_model=96", "--config.num_heads=6",
        "--config.refresh_schedule=staggered", "--config.dtype", "bfloat16",
    )  # fmt: skip
    assert (config.rank, config.learning_rate, config.grad_clip) == (4, 3e-3, 1.0)
    assert isinstance(config.grad_clip, float)
    assert (config.d_model, config.num_heads, config.dtype) == (96, 6, "bfloat16")
    assert config.data_path == "/data/corpus" and config.refresh_schedule == "staggered"


def test_preset_then_override():
    config = parse(f"{CONFIG}:llama_60m", "--config.num_train_steps=20")
    assert config == dataclasses.replace(configs.preset("llama_60m"), num_train_steps=20)
    with pytest.raises(flags.Error, match="before a value for --config"):
        parse("--config.rank=4", f"{CONFIG}:llama_60m")  # An override before --config.
    with pytest.raises(flags.Error, match=r"^--config: ValueError: Unknown config 'nope'"):
        parse(f"{CONFIG}:nope")


def test_other_flags():
    config, fv = main.parse_flags(["main", "--workdir=w", "--mesh", "fsdp=4", "--multihost"])
    assert (fv.workdir, fv.mesh, fv.multihost, config) == ("w", "fsdp=4", True, parse())
    with pytest.raises(flags.Error, match="--workdir must have a value"):
        main.parse_flags(["main"])
    with pytest.raises(flags.Error, match="Unknown command line flag 'set'"):
        parse("--set", "rank=4")
    with pytest.raises(flags.Error, match=r"Unexpected arguments \['rank=4'\]"):
        parse("rank=4")


def test_compare_flags():
    config, fv = compare.parse_flags(
        ["compare", f"{CONFIG}:micro", "--config.seed=3", "--optimizers=fira,adamw",
         "--ranks=2,8", "--seeds=2", "--adamw_lrs=1e-3,3e-3"]
    )  # fmt: skip
    assert config == dataclasses.replace(configs.preset("micro"), seed=3)
    assert cli.preset_name(fv) == "micro"
    assert (fv.optimizers, fv.ranks, fv.seeds) == (["fira", "adamw"], ["2", "8"], 2)
    assert (fv.workdir, fv.adamw_lrs, fv.plot_only) == ("runs/compare", ["1e-3", "3e-3"], False)
    for bad, match in [
        ("--optimizers=fira,sgd", r"--optimizers=\['fira', 'sgd'\]: must be of adamw, galore"),
        ("--ranks=2,x", r"--ranks=\['2', 'x'\]: must be integers >= 1"),
        ("--ranks=0", "must be integers >= 1"),
        ("--adamw_lrs=fast", "must be numbers > 0"),
        ("--seeds=0", "--seeds=0: 0 is not a positive integer"),
    ]:
        with pytest.raises(flags.Error, match=match):
            compare.parse_flags(["compare", bad])


def test_replace_and_construction_are_validated_too():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 8.0"):
        dataclasses.replace(configs.preset("tiny"), rank=8.0)
    with pytest.raises(ValueError, match="scan_layers must be true or false, got 1"):
        dataclasses.replace(configs.preset("tiny"), scan_layers=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        configs.Config(batch_size=True)
    with pytest.raises(ValueError, match=r"Unknown config fields \['rnak'\]; fields are"):
        configs.from_config_dict({"rnak": 4})
    with pytest.raises(ValueError, match="Unknown config 'nope'; choose from"):
        configs.preset("nope")
