"""Config validation: every field is checked when a config is built (presets included), and a
bad ``--set key=value`` names the key and what it accepts. Fast: no training."""

from __future__ import annotations

import dataclasses

import pytest

from examples.llama_pretrain import configs


def test_every_preset_is_valid():
    for name, config in configs.PRESETS.items():
        configs.validate(config)
        assert configs.get_config(name) is config


@pytest.mark.parametrize(
    "assignment, match",
    [
        (
            "scan_layers=maybe",
            r"--set scan_layers=maybe: scan_layers must be one of "
            r"true/false/1/0/yes/no \(any case\), got 'maybe'",
        ),
        ("divide_refresh=ture", r"divide_refresh must be one of true/false/1/0/yes/no"),
        ("grad_accum_steps=0", r"^grad_accum_steps must be an integer >= 1, got 0$"),
        ("batch_size=0", r"^batch_size must be an integer >= 1, got 0$"),
        ("num_train_steps=0", r"^num_train_steps must be an integer >= 2, got 0$"),
        ("num_train_steps=1", r"^num_train_steps must be an integer >= 2, got 1$"),
        ("rank=abc", r"^--set rank=abc: rank must be an integer, got 'abc'$"),
        ("rank=none", r"--set rank=none: rank cannot be none"),
        ("learning_rate=fast", r"--set learning_rate=fast: learning_rate must be a number"),
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
        ("no_such_field=1", r"Bad override 'no_such_field=1'; fields are"),
    ],
)
def test_bad_override_names_the_key_and_what_it_accepts(assignment, match):
    with pytest.raises(ValueError, match=match):
        configs.override(configs.get_config("tiny"), [assignment])


@pytest.mark.parametrize(
    "raw, value",
    [("true", True), ("TRUE", True), ("Yes", True), ("1", True)]
    + [("false", False), ("False", False), ("NO", False), ("0", False)],
)
def test_bool_override_accepts_the_usual_words(raw, value):
    for key in ("scan_layers", "divide_refresh"):
        assert getattr(configs.override(configs.get_config("tiny"), [f"{key}={raw}"]), key) is value


def test_good_overrides_parse_with_the_field_type():
    config = configs.override(
        configs.get_config("tiny"),
        ["rank=4", "learning_rate=3e-3", "grad_clip=none", "grad_clip=1", "data_path=none",
         "d_model=96", "num_heads=6", "refresh_schedule=staggered", "dtype=bfloat16"],
    )  # fmt: skip
    assert (config.rank, config.learning_rate, config.grad_clip) == (4, 3e-3, 1.0)
    assert (config.d_model, config.num_heads, config.dtype) == (96, 6, "bfloat16")
    assert config.data_path is None and config.refresh_schedule == "staggered"


def test_replace_and_construction_are_validated_too():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 8.0"):
        dataclasses.replace(configs.get_config("tiny"), rank=8.0)
    with pytest.raises(ValueError, match="scan_layers must be true or false, got 1"):
        dataclasses.replace(configs.get_config("tiny"), scan_layers=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        configs.Config(batch_size=True)
