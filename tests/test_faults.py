"""Faults the training run survives (docs/reliability.md): a checkpoint damaged after it was finalized,
a full disk while saving a checkpoint, one process of a 2-process jax.distributed run killed."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from test_train import REPO, STEPS, assert_trees_equal, demo_data, final_params, tiny_overrides  # noqa: F401

from megadoc_jax import train


def truncate_largest_file(step_dir: Path) -> None:
    """What a bad disk or an interrupted copy does to a finalized step: its largest data file cut in half."""
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


@pytest.fixture
def train_log() -> list[str]:
    """The messages of megadoc_jax's loggers during the test (train.log_to_console keeps them off the root)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    package = logging.getLogger("megadoc_jax")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    yield messages
    package.removeHandler(handler)
    package.setLevel(level)


def test_a_damaged_newest_checkpoint_stops_the_run_unless_fallback_is_asked(demo_data, tmp_path, capsys, train_log):  # noqa: F811
    args = ["--config", str(REPO / "configs" / "tiny.yaml")]
    args += tiny_overrides(demo_data, tmp_path, "mesh.data=8", "train.checkpoint_every=4", "train.keep_last=2")
    assert train.main(args) == 0
    clean = tmp_path / "clean"
    shutil.copytree(tmp_path / "checkpoints", clean / "checkpoints")
    truncate_largest_file(tmp_path / "checkpoints" / str(STEPS))

    assert train.main(args) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path}/checkpoints/{STEPS}: the checkpoint of step {STEPS} is damaged" in err, err
    assert "train.fallback_on_damage=true" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "8"]  # nothing deleted without the flag

    assert train.main([*args, "train.fallback_on_damage=true"]) == 0
    assert f"deleted the damaged checkpoint of step {STEPS}; resuming from step 8" in train_log, train_log
    assert "resumed from step 8" in train_log
    assert_trees_equal(final_params(tmp_path), final_params(clean))
