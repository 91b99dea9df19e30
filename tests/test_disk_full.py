"""A full disk while exporting a store, writing generations and saving a checkpoint: a clear error naming
the path, and once space is back the same command resumes and ends with what a run on a roomy disk gives.

The full disk is a small tmpfs in a private mount namespace (tests/small_disk.py); each job runs in a
child that fails on it, gets room, reruns and copies the result out (tests/disk_full_jobs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import disk_full_jobs
import pytest
import small_disk
from test_export import corpus, tokenizer_dir, write_lines  # noqa: F401

from generation.export import export
from megadoc_jax.data.store import StoreReader

pytestmark = pytest.mark.skipif(small_disk.unavailable() is not None, reason=str(small_disk.unavailable()))


def fill_then_rerun(
    kind: str,
    mount: Path,
    kib: int,
    args: list[str],
    copy_to: Path,
    *,
    fill_after: Path | None = None,
    leave_kib: int = 0,
    **popen,
) -> tuple[list, list, str]:
    """(exit code, stderr) of the command on a `kib` KiB disk (filled once `fill_after` appears, but for
    `leave_kib`), then once the disk has 64 times that and no filler; and what both printed on stdout."""
    job = [
        "tests/disk_full_jobs.py",
        kind,
        str(mount),
        str(64 * kib),
        str(copy_to),
        str(fill_after or "-"),
        str(leave_kib),
    ]
    done = small_disk.run_on_small_disk(mount, kib, [*job, *args], **popen)
    assert done.returncode == 0, done.stdout[-3000:]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith(disk_full_jobs.RESULT)]
    full, again = json.loads(result.removeprefix(disk_full_jobs.RESULT))
    return full, again, done.stdout


def test_export_on_a_full_disk_names_the_store_and_resumes(tmp_path, corpus, tokenizer_dir):  # noqa: F811
    path = write_lines(tmp_path / "in.jsonl", [{"id": d["id"], "text": d["text"]} for d in corpus])
    options = ["--workers", "0", "--batch-size", "4", "--flush-tokens", "2000", "--no-progress"]
    fresh = export(
        [path], tokenizer_dir, tmp_path / "fresh", workers=0, batch_size=4, flush_tokens=2000, progress=False
    )
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    args = ["export", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(mount / "store"), *options]
    kib = small_disk.disk_usage_kib(tmp_path / "fresh") // 2
    full, again, _ = fill_then_rerun("generation", mount, kib, args, copy, timeout=300)
    assert full[0] == 2 and f"error: {mount}/store: no space left on device while writing the store" in full[1], full
    assert "rerun the same command: it resumes from the last commit" in full[1]
    assert again[0] == 0, again
    assert StoreReader.open(copy / "store").verify() == fresh["content_hash"]
    report = json.loads((copy / "store" / "export_report.json").read_text())
    assert report["resumed_at_document"] > 0 and report["documents"] == fresh["documents"]


def test_generation_on_a_full_disk_names_the_worker_and_resumes(tmp_path):
    pytest.importorskip("torch", reason="the transformers backend needs torch: pip install 'megadoc-jax[torch]'")
    from test_generate import merged_lines, write_docs
    from test_transformers_backend import make_tiny_llama

    from generation.generate import GenerationSettings, run

    model_dir = make_tiny_llama(tmp_path / "tiny-llama")
    docs = write_docs(tmp_path / "docs.jsonl", count=8)
    settings = GenerationSettings(samples=2, max_new_tokens=6, chunk_documents=1)
    run(settings, [docs], model_dir, tmp_path / "clean", backend="transformers", progress=False)
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    args = ["generate", "--input", str(docs), "--model", str(model_dir), "--output", str(mount / "out")]
    args += ["--backend", "transformers", "--samples", "2", "--max-new-tokens", "6", "--chunk-documents", "1"]
    kib = small_disk.disk_usage_kib(tmp_path / "clean") // 2
    full, again, _ = fill_then_rerun("generation", mount, kib, [*args, "--no-progress"], copy, timeout=300)
    worker = mount / "out" / "worker-00000-of-00001"
    assert full[0] == 2 and f"error: {worker}: no space left on device while committing chunk" in full[1], full
    assert again[0] == 0, again
    assert merged_lines(tmp_path / "clean", tmp_path / "m1") == merged_lines(copy / "out", tmp_path / "m2")


@pytest.mark.slow
def test_a_checkpoint_save_on_a_full_disk_keeps_the_last_one_and_resumes(tmp_path):
    from test_train import REPO, assert_trees_equal, demo_data, final_params, tiny_overrides  # noqa: F401

    from generation import demo
    from megadoc_jax import train

    data = {k: str(v) for k, v in demo.ensure_demo_stores(tmp_path / "data").items()}
    extra = ("mesh.data=8", "train.checkpoint_every=4", "train.keep_last=2", "train.eval_every=0")
    config = ["--config", str(REPO / "configs" / "tiny.yaml")]
    assert train.main([*config, *tiny_overrides(data, tmp_path / "clean", *extra)]) == 0
    step = small_disk.disk_usage_kib(tmp_path / "clean" / "checkpoints" / "12")  # one checkpoint (4 and 8 are gone)
    rest = small_disk.disk_usage_kib(tmp_path / "clean") - small_disk.disk_usage_kib(tmp_path / "clean" / "checkpoints")
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    args = [*config, *tiny_overrides(data, mount / "run", *extra)]
    # Once the save of step 8 has begun (orbax begins one only when the previous one, step 4, is complete)
    # the disk fills up but for half a checkpoint: the metrics still fit, step 8 does not.
    full, again, stdout = fill_then_rerun(
        "train",
        mount,
        4 * (rest + step),
        args,
        copy,
        fill_after=mount / "run" / "checkpoints" / "8.orbax-checkpoint-tmp*",
        leave_kib=step // 2,
        timeout=400,
    )
    checkpoints = mount / "run" / "checkpoints"
    message = re.search(
        rf"train: {re.escape(str(checkpoints))}: no space left on device while saving the checkpoint of step "
        r"(\d+); the last complete checkpoint \(step (\d+)\) is kept: free space and rerun, which resumes from it",
        full[1],
    )
    assert full[0] == 4 and message, full
    assert (int(message[1]), int(message[2])) == (8, 4)  # saving step 8 failed, step 4 is kept
    kept = 4
    assert again[0] == 0, again
    assert f"resumed from step {kept}" in stdout
    assert_trees_equal(final_params(copy / "run"), final_params(tmp_path / "clean"))
