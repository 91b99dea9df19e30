"""checkpoint.load_run: a trained run's parameters (newest or a given step, params only) onto any mesh, and
clear refusals of missing or partial checkpoints and of a config that does not match them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from megadoc_jax import checkpoint, optim, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import model as model_lib
from megadoc_jax import step as step_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """A run with train states (params + optimizer state) of steps 2 and 4, other params at each step."""
    root = tmp_path_factory.mktemp("checkpoint") / "run"
    config = config_lib.load(None, ["model.size=tiny", f"train.run_dir={root}", "train.keep_last=3"])
    root.mkdir()
    config_lib.dump(config, root / "config.yaml")
    tx, _ = optim.make_optimizer(config.optim, total_steps=10)
    saved = {}
    with checkpoint.Checkpointer(root / "checkpoints", config.train) as saver:
        for step in (2, 4):
            model = model_lib.create_sharded_model(config.model, sharding.make_mesh({}, jax.devices()[:1]), seed=step)
            saved[step] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
            saver.save(step, step_lib.init_state(saved[step], tx))
    return root, saved


def params_of(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def test_loads_the_newest_or_a_given_step_onto_a_sharded_mesh(run):
    root, saved = run
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    newest = checkpoint.load_run(root, mesh)
    assert newest.step == 4 and newest.config == config_lib.load(root / "config.yaml")
    for a, b in zip(params_of(newest.model), jax.tree.leaves(saved[4])):
        np.testing.assert_array_equal(a, b)
    wq = newest.model.layers.attention.wq[...]
    assert wq.sharding == sharding.named_sharding(mesh, ("layers", "embed", "heads", "head_dim"), wq.shape)
    older = checkpoint.load_run(root / "checkpoints", mesh, step=2, compute_dtype="float32")
    assert older.step == 2 and older.config.model.compute_dtype == "float32"
    for a, b in zip(params_of(older.model), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.load_run(root / "checkpoints" / "2", mesh).step == 2
    with pytest.raises(checkpoint.CheckpointError, match=r"compute dtype 'float64' for .*: expected one of"):
        checkpoint.load_run(root, mesh, compute_dtype="float64")
    host = checkpoint.load_run_params(root)
    assert host.step == 4 and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.params))
    for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(saved[4])):
        np.testing.assert_array_equal(a, b)


def test_missing_and_partial_checkpoints_are_refused(run, tmp_path):
    root, _ = run
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"no committed checkpoint of step 3 in .*checkpoints "
        r"\(committed steps: \[2, 4\]\)",
    ):
        checkpoint.load_run(root, mesh, step=3)
    with pytest.raises(checkpoint.CheckpointError, match=r"is not a megadoc_jax run: no config.yaml"):
        checkpoint.load_run(tmp_path, mesh)
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    (copy / "checkpoints" / "4" / "default" / "_METADATA").unlink()
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"partial or foreign checkpoint: .*run/checkpoints/4/"
        r"default/_METADATA does not exist",
    ):
        checkpoint.load_run(copy, mesh)
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is never listed
    with pytest.raises(checkpoint.CheckpointError, match=r"no committed checkpoint in .*run/checkpoints"):
        checkpoint.load_run(copy, mesh)


def test_a_config_that_does_not_match_the_checkpoint_is_refused(run, tmp_path):
    root, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    config = config_lib.load(copy / "config.yaml", ["model.kv_heads=4"])
    config_lib.dump(config, copy / "config.yaml")
    expected = (
        r"checkpoint .*run/checkpoints/4/default does not match the model of .*run/config.yaml: "
        r"params.layers.attention.wk: shape \(2, 64, 2, 16\) where the model has \(2, 64, 4, 16\)"
    )
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.load_run(copy, sharding.make_mesh({}, jax.devices()[:1]))


def damage(step_dir: Path, how: str) -> None:
    """What a bad disk or an interrupted copy does to a finalized step: its largest data file cut in half,
    or its tree metadata removed."""
    item = step_dir / checkpoint.ITEM
    if how == "truncated":
        largest = max((p for p in item.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(largest, largest.stat().st_size // 2)
    else:
        (item / "_METADATA").unlink()


def damaged_copy(run, tmp_path, damaged: dict[int, str]) -> tuple[Path, checkpoint.Checkpointer, object]:
    """A copy of the run with steps damaged ({step: how}), a Checkpointer on it and the restore target."""
    root, saved = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    for step, how in damaged.items():
        damage(copy / "checkpoints" / str(step), how)
    config = config_lib.load(copy / "config.yaml")
    tx, _ = optim.make_optimizer(config.optim, total_steps=10)
    target = jax.eval_shape(lambda: step_lib.init_state(saved[2], tx))
    return copy, checkpoint.Checkpointer(copy / "checkpoints", config.train), target


@pytest.mark.parametrize("how", ["truncated", "removed"])
def test_a_damaged_newest_step_is_named_and_skipped_only_when_asked(run, tmp_path, how):
    copy, restorer, target = damaged_copy(run, tmp_path, {4: how})
    with restorer:
        with pytest.raises(
            checkpoint.CheckpointDamaged, match=r"run/checkpoints/4: the checkpoint of step 4 is damaged"
        ):
            restorer.restore_latest(target, fallback_on_damage=False)
        assert checkpoint.committed_steps(copy / "checkpoints") == [2, 4]  # nothing deleted without the flag
        step, state = restorer.restore_latest(target, fallback_on_damage=True)
    assert step == 2 and checkpoint.committed_steps(copy / "checkpoints") == [2]
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(run[1][2])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_no_step_that_restores_is_an_error_even_with_the_flag(run, tmp_path):
    copy, restorer, target = damaged_copy(run, tmp_path, {2: "removed", 4: "removed"})
    with restorer:
        with pytest.raises(
            checkpoint.CheckpointDamaged, match=r"no checkpoint in .*checkpoints restores: .*step 4.*step 2"
        ):
            restorer.restore_latest(target, fallback_on_damage=True)
    assert checkpoint.committed_steps(copy / "checkpoints") == [2, 4]  # none deleted: nothing restored
