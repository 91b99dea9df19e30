"""Paths that may be remote (megadoc_jax/storage.py): URL parsing, whole-file reads and writes, exclusive
creation and leases on object-store URLs, and the token store written and read through memory:// and file://
(tensorstore's memory and file kvstore drivers; nothing here reaches GCS)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from megadoc_jax import files, storage
from megadoc_jax.data.store import StoreError, StoreLayout, StoreReader, StoreWriter, finished_manifest
from tests.test_store import SMALL_CHUNKS, SMALL_SHARDS, TOKENIZER, flat_segments, flat_tokens, make_documents


def memory_url(name: str = "store") -> str:
    """A fresh memory:// URL (the in-memory store is shared by the whole test process)."""
    return f"memory://test-{uuid.uuid4().hex}/{name}"


# --------------------------------------------------------------------------------------------------
# URL parsing
# --------------------------------------------------------------------------------------------------


def test_urls_parse_to_their_kvstore_specs():
    gs = storage.location("gs://my-bucket/runs/a")
    assert (gs.scheme, gs.bucket, gs.path) == ("gs", "my-bucket", "runs/a")
    assert storage.kvstore_spec(gs / "input_ids/data") == {
        "driver": "gcs",
        "bucket": "my-bucket",
        "path": "runs/a/input_ids/data",
    }
    assert storage.kvstore_spec(storage.location("file:///tmp/s/")) == {"driver": "file", "path": "/tmp/s"}
    assert storage.kvstore_spec(storage.location("memory://t/s")) == {"driver": "memory", "path": "t/s"}
    # Round trips, names and parents behave like pathlib's.
    assert str(gs) == "gs://my-bucket/runs/a" and gs.name == "a" and str(gs.parent) == "gs://my-bucket/runs"
    assert str(storage.location("file:///tmp/s") / "manifest.json") == "file:///tmp/s/manifest.json"


def test_plain_paths_stay_pathlib_paths_with_the_file_driver_as_before():
    assert storage.location("runs/demo") == Path("runs/demo")
    assert storage.location(Path("/data/s")) == Path("/data/s")
    assert storage.kvstore_spec(Path("rel/store") / "input_ids/data") == {
        "driver": "file",
        "path": "rel/store/input_ids/data",
    }
    assert not storage.is_url("C:/not/a/scheme") and storage.is_url("gs://bucket/x")
    # A colon without '//' after an unknown word is part of a name (RUN_DIR:STEP, demo:NAME), not a URL.
    assert storage.location("runs/a:2000") == Path("runs/a:2000") and storage.location("run:2000") == Path("run:2000")
    assert storage.location("demo:real") == Path("demo:real")


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3://bucket/x", "unknown URL scheme s3://"),
        ("gs:/bucket/x", "the '//' is missing"),
        ("gs://Bad_Bucket/x", "is not a GCS bucket name"),
        ("gs://b/x", "is not a GCS bucket name"),
        ("file://host/x", "file:// URLs take an absolute path"),
        ("memory://a/../b", "path component '..'"),
        ("gs://bucket/a//b", "path component ''"),
    ],
)
def test_bad_urls_are_refused_naming_the_path_and_the_field(url, message):
    with pytest.raises(storage.StorageError, match=message) as raised:
        storage.location(url, "train.run_dir")
    assert str(raised.value).startswith(f"train.run_dir {url!r}")


def test_a_url_is_never_silently_used_as_a_local_path():
    with pytest.raises(TypeError, match="is a URL, not a local path"):
        open(storage.location("memory://x/y"))  # noqa: SIM115


def test_local_only_inputs_refuse_urls_naming_the_argument(tmp_path):
    assert storage.local_path(str(tmp_path), "RUNS_DIR") == tmp_path
    with pytest.raises(storage.StorageError, match="RUNS_DIR 'gs://bucket/runs': must be a local path here"):
        storage.local_path("gs://bucket/runs", "RUNS_DIR")
    from megadoc_jax.study.cli import parse_args

    with pytest.raises(SystemExit) as exited:  # argparse: the message on stderr, exit status 2
        parse_args(["gs://bucket/runs"])
    assert exited.value.code == 2


# --------------------------------------------------------------------------------------------------
# Files, listing, exclusive creation, leases
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
def url_root(request, tmp_path):
    return storage.location(memory_url("root") if request.param == "memory" else f"file://{tmp_path}/root")


def test_files_and_listing_on_urls(url_root):
    assert not storage.exists(url_root)
    storage.write_json_atomic(url_root / "a.json", {"b": 1})
    storage.write_text(url_root / "sub/deeper/t.txt", "x")
    assert storage.read_json(url_root / "a.json") == {"b": 1}
    assert storage.list_names(url_root) == ["a.json", "sub"]
    assert storage.is_file(url_root / "a.json") and not storage.is_dir(url_root / "a.json")
    assert storage.is_dir(url_root / "sub") and not storage.is_file(url_root / "sub")
    assert not storage.exists(url_root / "a")  # a prefix of a name is not a name
    storage.delete(url_root / "a.json")
    assert storage.list_names(url_root) == ["sub"]
    with pytest.raises(ValueError, match="a.json does not exist"):
        storage.read_json(url_root / "a.json")
    storage.write_text(url_root / "bad.json", "[1")
    with pytest.raises(StoreError, match="bad.json: manifest.json is not valid JSON"):
        storage.read_json(url_root / "bad.json", "manifest.json", StoreError)


def test_exclusive_creation_is_one_conditional_put(url_root):
    assert storage.create_json_exclusive(url_root / "claim.json", {"worker": 1})
    assert not storage.create_json_exclusive(url_root / "claim.json", {"worker": 2})
    assert storage.read_json(url_root / "claim.json") == {"worker": 1}


def test_racing_exclusive_creations_have_one_winner(url_root):
    barrier = threading.Barrier(8)

    def claim(i: int) -> bool:
        barrier.wait()  # all eight puts issued together
        return storage.create_json_exclusive(url_root / "race.json", {"worker": i})

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(claim, range(8)))
    wins = [i for i, w in enumerate(won) if w]
    assert len(wins) == 1
    assert storage.read_json(url_root / "race.json") == {"worker": wins[0]}


def test_lease_refuses_a_second_holder_and_is_released(url_root):
    lock = storage.lock_exclusive(url_root / ".writer.lock", holder="another StoreWriter", error=StoreError)
    assert lock.held
    with pytest.raises(StoreError, match=r"another StoreWriter holds \.writer\.lock \(.* pid \d+, lease valid"):
        storage.lock_exclusive(url_root / ".writer.lock", holder="another StoreWriter", error=StoreError)
    lock.release()
    assert not lock.held and not storage.exists(url_root / ".writer.lock")
    storage.lock_exclusive(url_root / ".writer.lock").release()


def test_a_stale_lease_is_taken_over_and_its_old_holder_notices(url_root):
    old = storage.lock_exclusive(url_root / "lease", lease_seconds=0.3, renew_seconds=0.05)
    old._stop.set()  # the holder "dies": no more heartbeats
    old._thread.join()
    time.sleep(0.4)
    new = storage.lock_exclusive(url_root / "lease", lease_seconds=30, renew_seconds=0.05)
    assert new.held
    record = storage.read_json(url_root / "lease")
    assert record["expires"] > time.time() + 20
    new.release()


def test_heartbeat_keeps_a_lease_and_loses_it_to_a_takeover(url_root):
    lease = storage.lock_exclusive(url_root / "lease", lease_seconds=0.5, renew_seconds=0.05)
    time.sleep(0.8)  # longer than the lease: only the heartbeat keeps it
    with pytest.raises(files.LockHeldError):
        storage.lock_exclusive(url_root / "lease")
    storage.write_json_atomic(url_root / "lease", {"host": "elsewhere", "pid": 1, "expires": time.time() + 60})
    time.sleep(0.3)  # the next heartbeat finds the generation changed
    assert not lease.held
    lease.release()  # does not delete the other holder's lease
    assert storage.read_json(url_root / "lease")["host"] == "elsewhere"


def test_local_paths_keep_fcntl_locks(tmp_path):
    lock = storage.lock_exclusive(tmp_path / ".writer.lock")
    assert isinstance(lock, files.FileLock)
    lock.release()


# --------------------------------------------------------------------------------------------------
# The token store on URLs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [SMALL_CHUNKS, SMALL_SHARDS], ids=["chunks", "shards"])
def test_token_store_round_trip_on_urls(url_root, layout):
    documents = make_documents(40, seed=3)
    url = url_root / "store"
    writer = StoreWriter(str(url), TOKENIZER, layout=layout, flush_tokens=300)
    writer.append(documents[:25])
    writer.close()  # an interrupted writer: resumes from its commit record
    writer = StoreWriter(str(url), TOKENIZER, layout=layout, flush_tokens=300)
    assert writer.num_committed == 25
    writer.append(documents[25:])
    manifest = writer.finish()
    assert finished_manifest(str(url))["content_hash"] == manifest["content_hash"]
    assert not storage.exists(url / ".writer.lock")

    reader = StoreReader.open(str(url), TOKENIZER)
    assert reader.path == url and reader.num_documents == 40
    tokens = flat_tokens(documents)
    starts = [0, 63, 64, 100, tokens.size - 50]
    np.testing.assert_array_equal(reader.read_windows(starts, 50), np.stack([tokens[s : s + 50] for s in starts]))
    kinds, indices = flat_segments(documents)
    got_kinds, got_indices = reader.read_segments(starts, 50)
    np.testing.assert_array_equal(got_kinds, np.stack([kinds[s : s + 50] for s in starts]))
    np.testing.assert_array_equal(got_indices, np.stack([indices[s : s + 50] for s in starts]))
    assert reader.document(7).metadata == documents[7].metadata
    assert reader.verify() == manifest["content_hash"]


def test_store_content_hash_is_the_same_on_a_path_and_on_urls(tmp_path):
    documents = make_documents(12, seed=5)
    hashes = set()
    for target in (tmp_path / "local", f"file://{tmp_path}/url", memory_url()):
        writer = StoreWriter(target, TOKENIZER, layout=SMALL_CHUNKS)
        writer.append(documents)
        hashes.add(writer.finish()["content_hash"])
    assert len(hashes) == 1


def test_streaming_reads_on_memory_url():
    documents = make_documents(30, seed=9)
    url = memory_url()
    writer = StoreWriter(url, TOKENIZER, layout=StoreLayout(tokens_chunk=64, tokens_shard=0, aux_chunk=32))
    writer.append(documents)
    writer.finish()
    reader = StoreReader.open(url, TOKENIZER, cache_bytes=16)  # too small: every window is a tensorstore read
    assert not reader.resident
    tokens = flat_tokens(documents)
    np.testing.assert_array_equal(reader.read_windows([5, 70], 100), np.stack([tokens[5:105], tokens[70:170]]))


def test_a_second_writer_on_a_url_store_is_refused():
    url = memory_url()
    writer = StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    with pytest.raises(StoreError, match="another StoreWriter holds .writer.lock"):
        StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    writer.close()


def test_an_unfinished_url_store_is_refused_by_the_reader_until_its_manifest_commit():
    url = memory_url()
    writer = StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    writer.append(make_documents(5, seed=1))
    writer.flush()
    with pytest.raises(StoreError, match="finished is false"):
        StoreReader.open(url, TOKENIZER)
    assert finished_manifest(url) is None
    writer.finish()
    assert StoreReader.open(url, TOKENIZER).num_documents == 5


def test_a_url_that_is_not_a_store_is_named():
    url = memory_url()
    storage.write_text(storage.location(url) / "notes.txt", "x")
    with pytest.raises(StoreError, match=f"{url}: exists, is not a token store"):
        StoreWriter(url, TOKENIZER)
    with pytest.raises(StoreError, match=f"{url}: not a token store"):
        StoreReader.open(url)
    assert json.loads(json.dumps(storage.kvstore_spec(storage.location(url))))["driver"] == "memory"


# --------------------------------------------------------------------------------------------------
# A whole training run with its run directory and stores on URLs
# --------------------------------------------------------------------------------------------------


def copy_store(source: str, target: str) -> str:
    """A finished store rewritten document by document at `target` (a URL)."""
    reader = StoreReader.open(source)
    writer = StoreWriter(target, reader.tokenizer, layout=StoreLayout.from_dict(reader.manifest["layout"]))
    writer.append(reader.document(i) for i in range(reader.num_documents))
    manifest = writer.finish()
    assert manifest["content_hash"] == reader.manifest["content_hash"]
    return target


@pytest.fixture(scope="module")
def url_training(tmp_path_factory):
    """The tiny run of test_train.py with its stores copied to memory:// and its run directory on file://,
    and the same run on local paths."""
    from generation import demo
    from megadoc_jax import train
    from tests.test_train import tiny_config

    root = tmp_path_factory.mktemp("url-run")
    local = {k: str(v) for k, v in demo.ensure_demo_stores(root / "data").items()}
    stores = {
        "tokenizer": local["tokenizer"],
        "train": copy_store(local["train"], memory_url("train")),
        "heldout": copy_store(local["heldout"], memory_url("heldout")),
    }
    run_dir = f"file://{root}/run"
    url_config = tiny_config(stores, run_dir, "train.checkpoint_every=6")
    local_config = tiny_config(local, root / "local-run", "train.checkpoint_every=6")
    devices = jax.devices()[:1]
    return {
        "root": root,
        "local_data": local,
        "run_dir": run_dir,
        "config": url_config,
        "url": train.run(url_config, devices),
        "local": train.run(local_config, devices),
    }


def test_a_run_on_urls_trains_as_on_local_paths(url_training):
    from tests.test_train import train_losses

    assert url_training["url"].exit_code == 0
    assert train_losses(url_training["url"]) == train_losses(url_training["local"])
    final = [run.history[-1]["eval/heldout/loss"] for run in (url_training["url"], url_training["local"])]
    assert final[0] == final[1]


def test_the_url_run_directory_holds_orbax_commit_file_checkpoints_and_the_logs(url_training):
    from megadoc_jax import checkpoint, metrics

    run = storage.location(url_training["run_dir"])
    assert {"checkpoints", "config.yaml", "metrics.jsonl", "tensorboard"} <= set(storage.list_names(run))
    # The commit-file protocol (orbax's on GCS): steps under their final names, commit_success.txt last.
    for step in ("6", "12"):
        assert storage.is_file(run / "checkpoints" / step / checkpoint.COMMIT_SUCCESS)
    assert checkpoint.committed_steps(run / "checkpoints") == [6, 12]
    logged = metrics.read_metrics(url_training["run_dir"]).records
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 13))
    assert storage.list_names(run / "tensorboard")[0].startswith("events.out.tfevents")
    assert checkpoint.read_run_config(run / "config.yaml") == url_training["config"]


def test_evaluate_a_url_run_on_memory_stores_writing_to_urls(url_training):
    from megadoc_jax import evaluate, metrics

    run = storage.location(url_training["run_dir"])
    out = memory_url("eval")
    options = evaluate.Options(models=[f"{run}:6"], out=out, progress=False, recipes=("concat",))
    value = evaluate.evaluate(options, jax.devices()[:1])
    (name,) = storage.list_names(storage.location(out))
    assert name.startswith("run_step_6_") and storage.read_json(storage.location(out) / name) == value
    assert value["models"][0]["path"] == str(run) and value["models"][0]["step"] == 6
    assert value["stores"]["heldout"]["path"] == url_training["config"].data.eval_stores["heldout"]
    # The figures went into the run's metrics.jsonl on file:// as well, at step 6.
    logged = [r for r in metrics.read_metrics(run).records if r["step"] == 6 and "eval/heldout/loss" in r]
    assert logged[-1]["eval/heldout/loss"] == value["results"][0]["loss"]
    # Without --out: RUN_DIR/eval/ on the URL.
    evaluate.evaluate(evaluate.Options(models=[str(run)], progress=False, recipes=("concat",)), jax.devices()[:1])
    assert storage.list_names(run / "eval") == ["run_step_12.json"]


def test_a_step_without_its_commit_file_is_not_resumed_from(url_training):
    """As after a kill during a save on GCS: step 12's commit_success.txt never arrived. The run resumes from
    step 6 and reaches the same step-12 parameters."""
    from megadoc_jax import checkpoint, train
    from tests.test_train import assert_trees_equal

    run = storage.location(url_training["run_dir"])
    before = checkpoint.load_run_params(url_training["run_dir"]).params
    storage.delete(run / "checkpoints/12" / checkpoint.COMMIT_SUCCESS)
    assert checkpoint.committed_steps(run / "checkpoints") == [6]
    assert checkpoint.step_dir(url_training["run_dir"]) == run / "checkpoints/6"
    with pytest.raises(checkpoint.CheckpointError, match="12: not a committed checkpoint"):
        checkpoint.step_dir(run / "checkpoints/12")
    resumed = train.run(url_training["config"], jax.devices()[:1])
    assert resumed.step == 12 and [h["step"] for h in resumed.history if "loss" in h] == list(range(7, 13))
    after = checkpoint.load_run_params(url_training["run_dir"])
    assert after.step == 12
    assert_trees_equal(before, after.params)


def test_checkpoints_refuse_memory_urls_naming_the_directory():
    from megadoc_jax import checkpoint

    with pytest.raises(checkpoint.CheckpointError, match="memory://x/run/checkpoints: orbax cannot write"):
        checkpoint.orbax_path("memory://x/run/checkpoints")


def test_a_tokenizer_directory_url_is_refused_with_what_to_do():
    from megadoc_jax.data.store import TokenizerInfo

    with pytest.raises(StoreError, match=r"gs://bucket/tok: a tokenizer directory must be local .* gcloud storage cp"):
        TokenizerInfo.from_directory("gs://bucket/tok")


def test_metrics_writer_on_a_memory_url_puts_the_log_and_tensorboard_events():
    from megadoc_jax import metrics

    url = storage.location(memory_url("run"))
    with metrics.MetricsWriter(url, enabled=True) as writer:
        writer.write(1, {"loss": 2.5})
        writer.write(2, {"loss": 2.0})
    assert [r["loss"] for r in metrics.read_metrics(url).records] == [2.5, 2.0]
    (events,) = storage.list_names(url / metrics.TENSORBOARD_DIR)
    assert events.startswith("events.out.tfevents") and storage.read_bytes(url / metrics.TENSORBOARD_DIR / events)
    # Resumed at step 1: the earlier attempt's step 2 is dropped, as on a local run directory.
    with metrics.MetricsWriter(url, start_step=1, enabled=True) as writer:
        writer.write(2, {"loss": 1.5})
    assert [r["loss"] for r in metrics.read_metrics(url).records] == [2.5, 1.5]


def test_append_log_on_a_url_puts_at_most_every_interval_and_ends_a_cut_line(url_root):
    path = url_root / "log.jsonl"
    storage.write_text(path, '{"a": 1}\n{"cut')  # a line cut by a kill
    log = storage.AppendLog(path, put_seconds=3600)
    log.write('{"b": 2}\n')  # the first write puts at once (no put yet)
    log.write('{"c": 3}\n')  # within the interval: kept in memory
    assert storage.read_text(path) == '{"a": 1}\n{"cut\n{"b": 2}\n'
    log.close()
    assert storage.read_text(path) == '{"a": 1}\n{"cut\n{"b": 2}\n{"c": 3}\n' and log.closed


def test_a_writer_killed_between_its_array_writes_and_its_commit_put_resumes_from_the_last_commit(
    url_root, monkeypatch
):
    """On an object store the commit record is one put after every chunk put of the flush returned; a writer
    dying between the two leaves chunks past the record, which the next writer overwrites. The result is the
    store of an uninterrupted writer."""
    documents = make_documents(30, seed=11)
    url = url_root / "store"
    writer = StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    writer.append(documents[:10])
    writer.flush()

    def killed(self):
        raise KeyboardInterrupt("killed before the commit put")

    monkeypatch.setattr(StoreWriter, "_write_commit", killed)
    writer.append(documents[10:20])
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    writer._lock.release()  # the process is gone: its lease ends (a real one would expire)
    monkeypatch.undo()

    resumed = StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    assert resumed.num_committed == 10
    resumed.append(documents[10:])
    interrupted = resumed.finish()
    whole = StoreWriter(url_root / "whole", TOKENIZER, layout=SMALL_CHUNKS)
    whole.append(documents)
    assert interrupted["content_hash"] == whole.finish()["content_hash"]
    assert StoreReader.open(url).verify() == interrupted["content_hash"]


def test_a_store_writer_that_lost_its_lease_refuses_to_write(monkeypatch):
    monkeypatch.setattr(storage, "RENEW_SECONDS", 0.05)
    url = storage.location(memory_url())
    writer = StoreWriter(url, TOKENIZER, layout=SMALL_CHUNKS)
    storage.write_json_atomic(url / ".writer.lock", {"host": "elsewhere", "pid": 1, "expires": time.time() + 60})
    deadline = time.time() + 5
    while writer._lock.held and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="lost its lease on the store to another writer"):
        writer.append(make_documents(2, seed=1))


def test_a_bad_run_dir_or_model_url_exits_2_naming_it(url_training, capsys):
    from megadoc_jax import evaluate, train
    from tests.test_train import tiny_overrides

    assert train.main(tiny_overrides(url_training["local_data"], "gs:/bucket/run")) == 2
    expected = "config error: train.run_dir 'gs:/bucket/run': expected gs://..., the '//' is missing"
    assert expected in capsys.readouterr().err
    assert evaluate.main(["--model", "s3://bucket/run", "--no-progress"]) == 2
    assert "evaluate: --model 's3://bucket/run': unknown URL scheme s3://" in capsys.readouterr().err


def test_gs_checkpoints_get_orbax_s_own_gcs_protocol():
    """What runs on GCS, checked on our side: orbax is handed an epath of the gs:// URL, with the commit-file
    protocol, the one orbax itself chooses for a GCS path."""
    from etils import epath
    from orbax.checkpoint._src.path import atomicity, atomicity_defaults

    from megadoc_jax import checkpoint

    directory = checkpoint.orbax_path("gs://my-bucket/runs/a/checkpoints")
    assert isinstance(directory, epath.Path) and str(directory) == "gs://my-bucket/runs/a/checkpoints"
    assert atomicity_defaults.get_default_temporary_path_class(directory) is atomicity.CommitFileTemporaryPath
    chosen = checkpoint._atomicity(storage.location("gs://my-bucket/runs/a/checkpoints"))
    assert chosen.mode == "commit_file"
    assert checkpoint._atomicity(Path("runs/a/checkpoints")) is None  # local: orbax's rename, as before
    assert checkpoint.orbax_path("file:///tmp/run/checkpoints") == Path("/tmp/run/checkpoints")


def test_hf_export_reads_a_url_run_into_a_local_llama_directory(url_training, tmp_path):
    from megadoc_jax import checkpoint, hf, sharding

    out = hf.export_run(url_training["run_dir"], tmp_path / "llama")
    assert (out / hf.CONFIG_JSON).is_file() and sorted(out.glob("*.safetensors"))
    model, _, _ = hf.import_llama(out, sharding.make_mesh({}, jax.devices()[:1]))
    run = checkpoint.load_run_params(url_training["run_dir"])
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), np.asarray(run.params["embed"], np.float32))
