"""Named hyper-parameter presets for the LLaMA pre-training example.

Two views of one config:

* ``get_config(name)``: the preset as a locked ``ml_collections.ConfigDict``, one typed field
  per ``Config`` field, as the flax examples have them. ``main.py`` and ``compare.py`` load it
  through ``ml_collections.config_flags``, so ``--config=examples/llama_pretrain/configs.py:tiny``
  picks the preset and ``--config.rank=8`` overrides a field, parsed with the field's type
  (``--config.scan_layers=maybe`` or an unknown field is an error).
* ``Config``: the same fields as a frozen, hashable dataclass, what ``train.py`` runs (the
  compiled steps are cached per config). ``preset(name)`` returns the preset as a ``Config``,
  ``from_config_dict`` turns a ``ConfigDict`` into one; derive variants with
  ``dataclasses.replace``::

    cfg = dataclasses.replace(preset("tiny"), optimizer="fira", num_train_steps=100)

Every ``Config`` is validated when it is built (``validate``, from ``__post_init__``): a value
out of range raises a ValueError naming the field and what it accepts.

Presets
-------
``tiny``
    A ~0.86M-parameter model (d_model 128) that trains in a couple of minutes per optimizer
    on two CPU cores: the main job (``scripts/compare.sh``) and the default. Rank 8: at
    rank 32 the subspace holds 99.99 % of the gradient's energy and Fira and GaLore tie; at
    rank 8 it misses part of it (the rank sweep, ``scripts/sweep.sh``). AdamW's learning
    rate, 1e-3, is the best of the sweep's 3e-4 / 1e-3 / 3e-3 / 1e-2.
``llama_60m`` / ``llama_130m`` / ``llama_350m`` / ``llama_1b``
    The model shapes of the GaLore / Fira C4 pre-training tables (hidden / FFN / layers /
    heads = 512/1376/8/8, 768/2048/12/12, 1024/2736/24/16, 2048/5461/24/32) with the
    papers' optimizer settings: rank 128/256/256/512, ``update_proj_gap`` 200, scale 0.25
    (0.0625 for 1B), lr 0.01 for GaLore/Fira and 1e-3 for AdamW, 10% linear warm-up then
    cosine decay to 0.1x, sequence length 256, 512 sequences per update (64 per
    micro-batch x 8 accumulation steps; lower ``batch_size`` and raise
    ``grad_accum_steps`` if memory is short), 10K/20K/60K/100K steps. The papers use
    the T5 tokenizer (vocab 32k) on C4; this example defaults to a byte-level tokenizer
    (vocab 256) on a local corpus, so the embedding / output-head sizes differ while every
    projected (attention / MLP) matrix has exactly the paper's shape. Pass a 32k-vocab
    ``tokenizer_path`` and a C4 text dump as ``data_path`` to get closer to the papers.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

# "fira_no_limiter" / "fira_no_phi" are the paper's ablations (Fira without the norm-growth
# limiter; Fira with the residual added unscaled, phi = 1); "adamw_control" is AdamW with the
# projected matrices at ``adamw_learning_rate`` and every other leaf (embeddings, output head,
# norms) at ``learning_rate``, the rate the low-rank runs train those leaves with.
#: The low-rank family beyond Fira and GaLore (fira_optax's aliases of the same names).
FAMILY = ("apollo", "apollo_mini", "golore", "frugal")
LOW_RANK_OPTIMIZERS = ("galore", "fira", "fira_no_limiter", "fira_no_phi", *FAMILY)
STATE_FREE = ("sign", "sgd")
OPTIMIZERS = ("adamw", *LOW_RANK_OPTIMIZERS, "adamw_control")
DTYPES = ("float32", "bfloat16", "float16")  # Activation / compute dtypes.
PROJ_TYPES = ("std", "reverse_std", "left", "right")  # fira_optax's side rules.
REFRESH_SCHEDULES = ("official", "staggered")  # fira_optax's refresh schedules.


@dataclasses.dataclass(frozen=True)
class Config:
    # Model.
    vocab_size: int = 256  # Byte-level tokenizer; overwritten by a --tokenizer JSON's vocab.
    d_model: int = 128
    ffn_dim: int = 344
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 128
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-6
    scan_layers: bool = False  # Stack layers -> kernels become (L, m, n) leaves.
    dtype: str = "float32"  # Activation/compute dtype; parameters stay float32.

    # Optimizer.
    optimizer: str = "fira"  # One of OPTIMIZERS.
    learning_rate: float = 0.01  # Peak lr of the low-rank optimizers (all their leaves).
    # Peak lr of "adamw" (all leaves) and of the projected matrices of "adamw_control".
    adamw_learning_rate: float = 1e-3
    warmup_frac: float = 0.1
    final_lr_frac: float = 0.1  # Cosine decays to this fraction of the peak.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float | None = None  # Global-norm clip before the optimizer (papers: off).
    rank: int = 32
    update_proj_gap: int = 50
    scale: float = 0.25
    proj_type: str = "std"
    gamma: float = 1.01  # Fira norm-growth limiter.
    # "official" (every matrix refreshes on the same step) or "staggered" (each matrix at its
    # own offset inside the update_proj_gap window: no straggler step; docs/sharding.md).
    refresh_schedule: str = "official"
    # On a mesh of several devices, each device refreshes its share of the projected
    # matrices (fira_optax's `refresh_shardings=`, the params' layout) instead of every device
    # refreshing every matrix. No effect on one device.
    divide_refresh: bool = True
    # The family: APOLLO's scale (its update is multiplied by √apollo_scale; APOLLO-Mini
    # uses its own 128), the fraction of the steps GoLore refreshes with the SVD before it
    # draws random bases (the paper: 0.8), FRUGAL's state-free update of what the subspace
    # misses ("sign" descent or "sgd") and its learning rate relative to the subspace's.
    apollo_scale: float = 1.0
    golore_svd_frac: float = 0.8
    frugal_state_free: str = "sign"
    frugal_state_free_ratio: float = 1.0

    # Training loop.
    batch_size: int = 16  # Sequences per micro-batch.
    grad_accum_steps: int = 1  # Micro-batches per optimizer update.
    num_train_steps: int = 400  # Optimizer updates.
    eval_every: int = 100
    eval_batches: int = 8  # Batches of the intermediate evaluations; the final one reads
    # the whole validation split (see input_pipeline.Dataset.full_val_batches).
    log_every: int = 5
    checkpoint_every: int = 0  # 0 = never (a final checkpoint is still written if > 0).
    max_checkpoints_to_keep: int = 2
    seed: int = 0

    # Data.
    data_path: str | None = None  # None = bundled Shakespeare corpus; file or dir of .txt.
    tokenizer_path: str | None = None  # Optional HF `tokenizers` JSON; None = bytes.
    val_fraction: float = 0.05  # Tail of every document held out for validation.

    def __post_init__(self):
        validate(self)

    @property
    def peak_lr(self) -> float:
        """Peak lr of the schedule (for "adamw_control": of the projected matrices)."""
        if self.optimizer in ("adamw", "adamw_control"):
            return self.adamw_learning_rate
        return self.learning_rate

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.max_seq_len


def _int(config: Config, key: str, low: int) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def _real(config: Config, key: str, interval: str) -> None:
    """A finite number in ``interval``: ``"[a, b]"``, ``"(a, b)"``, ``"[a, inf)"``, ..."""
    value = getattr(config, key)
    low, high = (float(x) for x in interval[1:-1].split(","))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if interval[0] == "(" else low <= value) and (
            value < high if interval[-1] == ")" else value <= high
        )
    if not ok:
        raise ValueError(f"{key} must be a finite number in {interval}, got {value!r}")


def _choice(config: Config, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, key)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _bool(config: Config, key: str) -> None:
    value = getattr(config, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def validate(config: Config) -> None:
    """Raises a ValueError naming the field and its allowed values when one is out of range.

    Run on every ``Config`` when it is built (``__post_init__``: the presets,
    ``dataclasses.replace`` and ``from_config_dict`` alike).
    """
    for key in ("vocab_size", "d_model", "ffn_dim", "num_layers", "num_heads", "max_seq_len"):
        _int(config, key, 1)
    if config.d_model % config.num_heads or (config.d_model // config.num_heads) % 2:
        raise ValueError(
            "d_model must be num_heads times an even head dimension (RoPE rotates pairs), got "
            f"d_model={config.d_model}, num_heads={config.num_heads}"
        )
    _real(config, "rope_theta", "(0, inf)")
    _real(config, "rms_eps", "[0, inf)")
    _bool(config, "scan_layers")
    _choice(config, "dtype", DTYPES)

    _choice(config, "optimizer", OPTIMIZERS)
    _real(config, "learning_rate", "(0, inf)")
    _real(config, "adamw_learning_rate", "(0, inf)")
    _real(config, "warmup_frac", "[0, 1)")
    _real(config, "final_lr_frac", "[0, 1]")
    _real(config, "b1", "[0, 1)")
    _real(config, "b2", "[0, 1)")
    _real(config, "eps", "[0, inf)")
    _real(config, "weight_decay", "[0, inf)")
    if config.grad_clip is not None:
        _real(config, "grad_clip", "(0, inf)")  # none: no clipping
    _int(config, "rank", 1)
    _int(config, "update_proj_gap", 1)
    _real(config, "scale", "(0, inf)")
    _choice(config, "proj_type", PROJ_TYPES)
    _real(config, "gamma", "[1, inf)")
    _choice(config, "refresh_schedule", REFRESH_SCHEDULES)
    _bool(config, "divide_refresh")
    _real(config, "apollo_scale", "(0, inf)")
    _real(config, "golore_svd_frac", "[0, 1]")
    _choice(config, "frugal_state_free", STATE_FREE)
    _real(config, "frugal_state_free_ratio", "[0, inf)")

    for key in ("batch_size", "grad_accum_steps", "eval_every", "eval_batches", "log_every"):
        _int(config, key, 1)
    _int(config, "num_train_steps", 2)  # The schedule: >= 1 warm-up step and 1 decay step.
    _int(config, "checkpoint_every", 0)
    _int(config, "max_checkpoints_to_keep", 1)
    _int(config, "seed", 0)

    for key in ("data_path", "tokenizer_path"):
        value = getattr(config, key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a path or none, got {value!r}")
    _real(config, "val_fraction", "(0, 1)")


# Shared by the paper-shaped presets: 512 sequences of 256 tokens per update
# (64 x 8 micro-batches), peak lr 0.01 (GaLore / Fira) or 1e-3 (AdamW), 10% warm-up,
# cosine to 0.1x, T = 200, alpha = 0.25, bf16 activations.
_PAPER = dict(
    max_seq_len=256,
    batch_size=64,
    grad_accum_steps=8,
    update_proj_gap=200,
    scale=0.25,
    learning_rate=0.01,
    adamw_learning_rate=1e-3,
    eval_every=1_000,
    eval_batches=16,
    checkpoint_every=1_000,
    log_every=50,
    dtype="bfloat16",
)


def _paper(d_model, ffn_dim, num_layers, num_heads, rank, steps, **kw) -> Config:
    return Config(
        d_model=d_model,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        rank=rank,
        num_train_steps=steps,
        **{**_PAPER, **kw},
    )


PRESETS: dict[str, Config] = {
    # ~0.86M params; 400 steps of 16 x 128 bytes; ~2 min per optimizer on 2 CPU cores.
    # Rank 8 of 128 and AdamW's lr from the rank sweep (README.md here, "The rank sweep").
    "tiny": Config(rank=8, adamw_learning_rate=1e-3),
    # A model small enough for the unit tests (train_test.py).
    "micro": Config(
        d_model=32,
        ffn_dim=64,
        num_layers=2,
        num_heads=2,
        max_seq_len=32,
        batch_size=4,
        rank=8,
        update_proj_gap=5,
        num_train_steps=10,
        eval_every=5,
        eval_batches=2,
        log_every=5,
    ),
    # Paper shapes and step counts (GaLore Table 2 / Fira Table 1: 10K/20K/60K/100K).
    "llama_60m": _paper(512, 1376, 8, 8, rank=128, steps=10_000),
    "llama_130m": _paper(768, 2048, 12, 12, rank=256, steps=20_000),
    "llama_350m": _paper(1024, 2736, 24, 16, rank=256, steps=60_000, scan_layers=True),
    "llama_1b": _paper(2048, 5461, 24, 32, rank=512, steps=100_000, scale=0.0625, scan_layers=True),
}


def preset(name: str) -> Config:
    """Returns the preset called ``name`` (see ``PRESETS``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown config {name!r}; choose from {sorted(PRESETS)}") from None


def _field_types() -> tuple[dict[str, type], frozenset[str]]:
    """Each field's type (``X`` for an optional ``X | None``) and the optional fields."""
    kinds, optional = {}, set()
    for name, hint in typing.get_type_hints(Config).items():
        args = typing.get_args(hint)
        if type(None) in args:
            optional.add(name)
            (hint,) = (k for k in args if k is not type(None))
        kinds[name] = hint
    return kinds, frozenset(optional)


#: The type of each ``Config`` field and the fields that may be None.
FIELD_TYPES, OPTIONAL_FIELDS = _field_types()


def to_config_dict(config: Config) -> ml_collections.ConfigDict:
    """``config`` as a locked ``ConfigDict``: one field per ``Config`` field, of its type.

    Locked: a field that ``Config`` lacks cannot be added. Typed: assigning a value that does
    not cast to the field's type raises a TypeError, and ``config_flags`` parses an override
    with the field's type. An optional field (``grad_clip``, ``data_path``,
    ``tokenizer_path``) is a ``FieldReference`` of its type, typed while it is None.
    """
    out = ml_collections.ConfigDict()
    for name, kind in FIELD_TYPES.items():
        value = getattr(config, name)
        if value is not None and kind is float:
            value = float(value)  # An int in a float field: the field stays a float.
        if name in OPTIONAL_FIELDS:
            value = config_dict.FieldReference(value, field_type=kind)
        out[name] = value
    out.lock()
    return out


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    """The preset ``name`` as a locked ``ConfigDict`` (the ``config_flags`` entry point:
    ``--config=examples/llama_pretrain/configs.py:NAME``)."""
    return to_config_dict(preset(name))


def from_config_dict(config: ml_collections.ConfigDict | Mapping) -> Config:
    """The validated ``Config`` with the fields of ``config`` (a ``ConfigDict`` or a dict).

    Raises a ValueError naming the field when a value is out of range or a key is not a field.
    """
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(f"Unknown config fields {unknown}; fields are {sorted(FIELD_TYPES)}")
    return Config(**values)
