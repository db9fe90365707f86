"""The example on a device mesh: 8 host CPU devices, ``fsdp=4,tensor=2``.

The 8 devices must be requested before jax is imported, so the training runs happen in a
subprocess (this file, run as ``python -m examples.llama_pretrain.mesh_test JOB DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), as in ``tests/test_sharding.py``.
The child prints one JSON line; the tests below check it.

* ``parity``: the micro model, Fira, 12 steps (refreshes at steps 1, 6, 11), trained on one
  device and on the ``fsdp=4,tensor=2`` mesh; then the mesh run resumed from its step-6
  checkpoint in the same process.
* ``multiprocess`` (slow): an 8-step mesh run as 2 processes × 4 devices
  (``jax.distributed`` on localhost, gloo collectives), then resumed from its step-4
  checkpoint in 2 fresh processes (across the refresh at step 6).

The mesh parser and the per-kernel rule are checked in-process (no devices needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from examples.llama_pretrain import sharding

MESH = "fsdp=4,tensor=2"
REPO = pathlib.Path(__file__).resolve().parents[2]
WORDS = "the king queen crown sword love death night day fair foul ho my lord lady".split()


# ------------------------------------------------------------------ in-process checks


def test_parse_mesh():
    assert sharding.parse_mesh("fsdp=4,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh("", 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh("tensor=2, data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fsdp=3", "must multiply to the device count"),
        ("fsdp=4,tensor=4", "must multiply to the device count"),
        ("model=2", "Bad mesh entry"),
        ("fsdp", "Bad mesh entry"),
        ("fsdp=two", "Bad mesh size"),
        ("fsdp=0", "size >= 1"),
        ("fsdp=2,fsdp=4", "given twice"),
        ("fsdp=-1,tensor=-1", "At most one"),
        ("fsdp=-1,tensor=3", "not divisible"),
    ],
)
def test_parse_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_mesh(spec, 8)


def test_cli_mesh_flags(monkeypatch):
    from examples.llama_pretrain import main

    _, args = main.parse_flags(["main", "--workdir", "w", "--mesh", MESH, "--multihost"])
    assert (args.workdir, args.mesh, args.multihost) == ("w", MESH, True)
    assert main.parse_flags(["main", "--workdir", "w"])[1].mesh is None  # Default: all on data.
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert main.initialize_distributed() is False  # One process: nothing to initialize.


def test_param_rule_and_divisibility_fallback():
    mesh = AbstractMesh((1, 4, 2), sharding.AXES)
    spec = sharding.param_partition_spec
    assert spec("layers/3/attn/q_proj/kernel", (64, 64), mesh) == P("fsdp", "tensor")
    assert spec("layers/3/attn/o_proj/kernel", (64, 64), mesh) == P("tensor", "fsdp")
    assert spec("layers/0/mlp/up_proj/kernel", (64, 172), mesh) == P("fsdp", "tensor")
    assert spec("layers/0/mlp/down_proj/kernel", (172, 64), mesh) == P("tensor", "fsdp")
    assert spec("embed/embedding", (256, 64), mesh) == P("tensor", "fsdp")
    assert spec("lm_head/kernel", (64, 256), mesh) == P("fsdp", "tensor")
    assert spec("layers/1/attn_norm/scale", (64,), mesh) == P(None)
    # Stacked (L, m, n) leaves of scan_layers: a leading None.
    assert spec("layers/mlp/gate_proj/kernel", (4, 64, 172), mesh) == P(None, "fsdp", "tensor")
    assert spec("layers/mlp_norm/scale", (4, 64), mesh) == P(None, None)
    # Not divisible by the mesh axis: that axis is replicated, the other one stays sharded.
    assert spec("layers/0/mlp/gate_proj/kernel", (64, 171), mesh) == P("fsdp", None)
    assert spec("embed/embedding", (255, 30), mesh) == P(None, None)


# ------------------------------------------------------------------ subprocess checks


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    # The host devices, after this process's other XLA flags (e.g. --xla_cpu_max_isa).
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def _child(job: str, workdir: pathlib.Path, timeout: float = 900) -> dict:
    cmd = [sys.executable, "-m", "examples.llama_pretrain.mesh_test", job, str(workdir)]
    try:
        out = subprocess.run(
            cmd, env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True
        )
    except subprocess.CalledProcessError as e:
        raise AssertionError(e.stderr[-6000:]) from e
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    return _child("parity", tmp_path_factory.mktemp("mesh"))


@pytest.mark.slow
def test_mesh_reaches_single_device_loss(parity):
    single, mesh = parity["single"], parity["mesh"]
    assert parity["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 2}
    rel = abs(mesh["final_val_loss"] - single["final_val_loss"]) / single["final_val_loss"]
    assert rel <= 1e-3, (single["final_val_loss"], mesh["final_val_loss"])
    # The whole trajectory, not only the end point (float32 reduction order differs).
    np.testing.assert_allclose(parity["mesh_train_losses"], parity["single_train_losses"], 1e-4)
    assert parity["params_max_rel"] < 1e-3


@pytest.mark.slow
def test_state_is_sharded_and_follows_the_params(parity):
    specs = parity["specs"]
    assert specs["param q_proj"] == ["fsdp", "tensor"]
    assert specs["param o_proj"] == ["tensor", "fsdp"]
    assert specs["param embed"] == ["tensor", "fsdp"]
    assert specs["param lm_head"] == ["fsdp", "tensor"]
    # Fira's state of q_proj (32, 32), right-sided: basis (8, 32), moments (32, 8).
    assert specs["basis q_proj"] == [None, "tensor"]
    assert specs["mu q_proj"] == ["fsdp", None]
    # gate_proj (32, 64), left-sided: basis (32, 8), moments (8, 64).
    assert specs["basis gate_proj"] == ["fsdp", None]
    assert specs["mu gate_proj"] == [None, "tensor"]
    assert specs["mu embed"] == ["tensor", "fsdp"]  # Full Adam moment: like its param.
    assert specs["step"] == []
    # After real steps every leaf has the sharding it was created with.
    assert parity["bad_shardings"] == []
    # Device 0 holds a fraction of the state (ideally 1/8; the norm scales, the counters
    # and the rank-sized leaves that keep only the tensor axis are replicated over fsdp).
    assert parity["state_bytes_device0"] < 0.2 * parity["state_bytes_total"]
    # Every adamw/galore/fira variant gets a sharded layout.
    assert set(parity["optimizers_sharded"]) >= {"adamw", "galore", "fira", "adamw_control"}
    # A global batch the data x fsdp axes do not divide: a clear error.
    assert "must be divisible by data x fsdp = 4" in parity["batch_error"]


@pytest.mark.slow
def test_mesh_divides_the_refresh(parity):
    """On the mesh the example refreshes divided (``divide_refresh``, the default): the
    gradient blocks travel by all-to-all and fewer arrays are all-gathered than when every
    device refreshes every matrix (which all-gathers each projected gradient)."""
    divided, replicated = parity["collectives"]["divided"], parity["collectives"]["replicated"]
    assert divided["all-to-all"] > 0, divided
    assert replicated["all-to-all"] == 0, replicated
    assert divided["all-gather"] < replicated["all-gather"], (divided, replicated)


@pytest.mark.slow
def test_sharded_resume_is_exact(parity):
    resume = parity["resume"]
    assert resume["state_max_abs_diff"] == 0.0, resume
    assert resume["final_val_loss"] == parity["mesh"]["final_val_loss"]
    assert resume["final_train_loss"] == parity["mesh"]["final_train_loss"]
    # The mesh checkpoint restores onto one device (orbax reshards) with the same values.
    assert parity["restore_on_one_device_max_abs_diff"] == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_two_processes(workdir: pathlib.Path, corpus: str) -> list[dict]:
    """The ``multiprocess`` job as 2 processes × 4 devices on localhost; their JSON lines."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = _env(4)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, "-m", "examples.llama_pretrain.mesh_test", "multiprocess"]
        procs.append(
            subprocess.Popen(
                [*cmd, str(workdir), corpus],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-6000:]
    return [json.loads([x for x in o.splitlines() if x.startswith("{")][-1]) for o, _ in outs]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    """2 processes × 4 devices (one process per "host", ``jax.distributed``): every process
    puts its rows of the batch on its devices, checkpoints are written and read per shard,
    and a resume in 2 fresh processes continues exactly."""
    corpus = _write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    first = _launch_two_processes(run, corpus)
    assert [x["process_index"] for x in first] == [0, 1]
    assert all(x["process_count"] == 2 and x["local_devices"] == 4 for x in first)
    assert first[0]["final_val_loss"] == first[1]["final_val_loss"]  # One global result.
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 8  # Process 0.
    from examples.llama_pretrain import train

    # Read back here, on this process's device(s): orbax reshards to the target's layout.
    _, abstract = train.abstract_train_state(_config(corpus, **SHORT), sharding.make_mesh(None))
    full = _read_state(run / "checkpoints" / "8", abstract)
    # A preemption right after the step-4 checkpoint; 2 new processes resume.
    shutil.rmtree(run / "checkpoints" / "8")
    resumed = _launch_two_processes(run, corpus)
    assert all(x["resumed_from"] == 4 for x in resumed)
    assert resumed[0]["final_val_loss"] == first[0]["final_val_loss"]
    assert _max_abs_diff(_read_state(run / "checkpoints" / "8", abstract), full) == 0.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    # The same mesh in one process (in-process collectives): the same run up to float32
    # reduction order.
    one = _child("parity_mesh_only", tmp_path / "one")
    rel = abs(first[0]["final_val_loss"] - one["final_val_loss"]) / one["final_val_loss"]
    assert rel <= 1e-5, (first[0], one)


# ------------------------------------------------------------------ the child


def _write_corpus(root: pathlib.Path) -> str:
    """Two small documents of random words (as train_test.py)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        lines = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(600)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return str(root)


SHORT = dict(num_train_steps=8, eval_every=8, checkpoint_every=4)  # The multi-process run.


def _config(corpus: str, **kw):
    from examples.llama_pretrain import configs

    base = dict(
        optimizer="fira",
        num_train_steps=12,
        log_every=1,
        eval_every=12,
        checkpoint_every=6,
        max_checkpoints_to_keep=5,
    )
    return dataclasses.replace(configs.preset("micro"), data_path=corpus, **{**base, **kw})


def _read_state(path: pathlib.Path, abstract=None):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / "default", abstract)


def _train_losses(workdir: pathlib.Path) -> list[float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _max_abs_diff(a, b) -> float:
    import jax

    diffs = jax.tree.map(
        lambda x, y: (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))) if np.size(x) else 0.0
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs))


def _spec(tree, *keys) -> list:
    """The spec of the first leaf of ``tree`` whose path contains ``keys`` in a row."""
    import jax

    n = len(keys)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = sharding.path_tuple(path)
        if any(names[i : i + n] == keys for i in range(len(names) - n + 1)):
            return list(x.sharding.spec)
    raise KeyError(keys)


def _parity(workdir: pathlib.Path, mesh_only: bool = False) -> dict:
    import jax
    from flax import nnx

    from examples.llama_pretrain import input_pipeline, train

    assert jax.device_count() == 8, jax.devices()
    corpus = _write_corpus(workdir / "corpus")
    config = _config(corpus, **(SHORT if mesh_only else {}))
    mesh = sharding.make_mesh(MESH)
    out: dict = {"mesh_shape": dict(mesh.shape)}
    out["mesh"] = train.train_and_evaluate(config, workdir / "mesh", mesh=mesh)
    if mesh_only:
        return out["mesh"]
    one = sharding.make_mesh(None, devices=jax.devices()[:1])
    out["single"] = train.train_and_evaluate(config, workdir / "single", mesh=one)
    out["single_train_losses"] = _train_losses(workdir / "single")
    out["mesh_train_losses"] = _train_losses(workdir / "mesh")

    # Layout: the abstract state (what init, the steps and restore use).
    graphdef, abstract = train.abstract_train_state(config, mesh)
    model, opt = abstract[0], abstract[1]["opt_state"]
    q, gate = (0, "attn", "q_proj", "kernel"), (0, "mlp", "gate_proj", "kernel")
    out["specs"] = {
        "param q_proj": _spec(model, "layers", *q),
        "param o_proj": _spec(model, "layers", 0, "attn", "o_proj", "kernel"),
        "param embed": _spec(model, "embed", "embedding"),
        "param lm_head": _spec(model, "lm_head", "kernel"),
        "basis q_proj": _spec(opt, "bases", "layers", *q),
        "basis gate_proj": _spec(opt, "bases", "layers", *gate),
        "mu q_proj": _spec(opt, "mu", "layers", *q),
        "mu gate_proj": _spec(opt, "mu", "layers", *gate),
        "mu embed": _spec(opt, "mu", "embed", "embedding"),
        "step": _spec(abstract[1], "step"),
    }
    # Real arrays after two steps (a refresh and a normal one) keep those shardings.
    state = train.create_train_state(config, mesh)[1]
    train_step, _ = train.compiled_steps(graphdef, config, mesh)
    dataset = input_pipeline.load_dataset(config)
    for step in range(2):
        state, _ = train_step(state, dataset.train_batch(config, step))
    bad = []
    for (path, x), want in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(abstract), strict=True
    ):
        if not x.sharding.is_equivalent_to(want.sharding, x.ndim):
            bad.append(f"{jax.tree_util.keystr(path)}: {x.sharding} != {want.sharding}")
    out["bad_shardings"] = bad
    dev0 = jax.devices()[0]
    out["state_bytes_total"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    out["state_bytes_device0"] = int(
        sum(
            s.data.nbytes
            for x in jax.tree.leaves(state)
            for s in x.addressable_shards
            if s.device == dev0
        )
    )
    sharded = []
    for name in ("adamw", "galore", "fira", "fira_no_limiter", "fira_no_phi", "adamw_control"):
        try:
            _, abs_state = train.abstract_train_state(
                dataclasses.replace(config, optimizer=name), mesh
            )
        except ValueError:  # An optimizer this checkout does not have.
            continue
        specs = [x.sharding.spec for x in jax.tree.leaves(abs_state[1]["opt_state"])]
        if any(any(a is not None for a in s) for s in specs):
            sharded.append(name)
    out["optimizers_sharded"] = sharded
    # The refresh on the mesh: divided (default) sends gradient blocks with one all-to-all
    # per group and gathers only rank-sized bases; replicated (divide_refresh=False) gathers
    # every projected gradient whole. Collectives counted in the compiled train step.
    batch = jax.ShapeDtypeStruct(
        (config.grad_accum_steps, config.batch_size, config.max_seq_len + 1), np.int32
    )
    out["collectives"] = {}
    for divide in (True, False):
        cfg = dataclasses.replace(config, divide_refresh=divide)
        gd, abs_state = train.abstract_train_state(cfg, mesh)
        step = train.make_train_step(
            gd, train.make_schedule(cfg), train.state_shardings(abs_state), mesh
        )
        hlo = step.lower(abs_state, batch).compile().as_text()
        out["collectives"]["divided" if divide else "replicated"] = {
            op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
            for op in ("all-to-all", "all-gather", "all-reduce")
        }
    try:
        train.compiled_steps(graphdef, dataclasses.replace(config, batch_size=6), mesh)
        out["batch_error"] = ""
    except ValueError as e:
        out["batch_error"] = str(e)

    # Params of the two runs after 12 steps.
    _, abstract_one = train.abstract_train_state(config, one)
    ckpt_single = _read_state(workdir / "single" / "checkpoints" / "12", abstract_one)
    ckpt_mesh = _read_state(workdir / "mesh" / "checkpoints" / "12", abstract)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ckpt_single[0]))
    out["params_max_rel"] = _max_abs_diff(ckpt_mesh[0], ckpt_single[0]) / scale

    # Resume: a preemption right after the step-6 checkpoint, in this process.
    resumed_dir = workdir / "resumed"
    shutil.copytree(workdir / "mesh", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "12")
    resumed = train.train_and_evaluate(config, resumed_dir, mesh=mesh)
    final = _read_state(resumed_dir / "checkpoints" / "12", abstract)
    out["resume"] = {
        "final_val_loss": resumed["final_val_loss"],
        "final_train_loss": resumed["final_train_loss"],
        "state_max_abs_diff": _max_abs_diff(final, ckpt_mesh),
    }
    # The sharded checkpoint restored onto one device (a different mesh).
    restored_one = _read_state(workdir / "mesh" / "checkpoints" / "12", abstract_one)
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(restored_one))
    out["restore_on_one_device_max_abs_diff"] = _max_abs_diff(restored_one, ckpt_mesh)
    nnx.merge(graphdef, restored_one)  # A valid (model, optimizer) state.
    return out


def _multiprocess(workdir: pathlib.Path, corpus: str) -> dict:
    import jax

    from examples.llama_pretrain import main as main_module
    from examples.llama_pretrain import train

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert main_module.initialize_distributed()  # From the JAX_* variables.
    assert jax.process_count() == 2 and jax.device_count() == 8
    ckpt = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.exists() else []
    result = train.train_and_evaluate(_config(corpus, **SHORT), workdir, mesh=MESH)
    return {
        **result,
        "resumed_from": max(steps, default=None),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
    }


if __name__ == "__main__":
    job, workdir = sys.argv[1], pathlib.Path(sys.argv[2])
    if job == "parity":
        print(json.dumps(_parity(workdir)), flush=True)
    elif job == "parity_mesh_only":
        print(json.dumps(_parity(workdir, mesh_only=True)), flush=True)
    elif job == "multiprocess":
        print(json.dumps(_multiprocess(workdir, sys.argv[3])), flush=True)
    else:
        raise SystemExit(f"unknown job {job!r}")
