"""Store integrity: crc32c on every chunk (damage raises at read, naming store, array and chunk), the
checks of store_checks and the verify command, and format-1 stores (tests/data/store_v1)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from test_store import SMALL_CHUNKS, TOKENIZER, assert_same_documents, make_documents, write_store

from megadoc_jax.data import verify
from megadoc_jax.data.store import StoreError, StoreLayout, StoreReader, StoreWriter

# Written by the format-1 code (commit c0e9943) with make_documents(12, seed=11) and this layout.
V1_STORE = Path(__file__).parent / "data" / "store_v1"
V1_LAYOUT = StoreLayout(tokens_chunk=64, tokens_shard=256, aux_chunk=512)
SHARDS = StoreLayout(tokens_chunk=64, tokens_shard=256, aux_chunk=64)  # uncompressed, like the default


def token_file(store: Path, index: int) -> Path:
    return store / "input_ids" / "data" / "c" / str(index)


def xor_middle(path: Path, count: int) -> None:
    """What a bad disk or a cut copy does: `count` bytes in the middle of the file XOR-ed."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - count // 2
    data[middle : middle + count] = bytes(b ^ 0x5A for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def run_verify(capsys: pytest.CaptureFixture[str], *stores: Path) -> tuple[int, str, str]:
    code = verify.main([str(s) for s in stores] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path: Path) -> Path:
    write_store(tmp_path / "s", make_documents(60, seed=5), layout=SHARDS)
    return tmp_path / "s"


# --------------------------------------------------------------------------------------------------
# Reads: damage raises a StoreError naming the store, the array and the chunk
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20], ids=["streaming", "resident"])
@pytest.mark.parametrize("layout", [SHARDS, SMALL_CHUNKS], ids=["shards", "chunks"])
def test_xor_in_a_token_file_raises_at_read(tmp_path: Path, layout: StoreLayout, cache_bytes: int) -> None:
    write_store(tmp_path / "s", make_documents(60, seed=5), layout=layout)
    per_file = layout.tokens_shard or layout.tokens_chunk
    xor_middle(token_file(tmp_path / "s", 1), 300 if layout.tokens_shard else 100)
    reader = StoreReader.open(tmp_path / "s", cache_bytes=cache_bytes)
    assert reader.resident == bool(cache_bytes)
    far = reader.read_windows([0, 3 * per_file], 50)  # windows in undamaged files still read
    np.testing.assert_array_equal(far[0], np.concatenate([d.tokens for d in make_documents(60, seed=5)])[:50])
    pattern = rf"{tmp_path / 's'}: array input_ids/data, chunk \d+ \(elements \[\d+, \d+\) in file .*c/1\)"
    with pytest.raises(StoreError, match=pattern + " cannot be read: the store is damaged"):
        reader.read_windows([per_file + per_file // 2 - 20], 40)


def test_truncated_shard_file_raises_at_read(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = token_file(store, 1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    reader = StoreReader.open(store, cache_bytes=0)
    with pytest.raises(StoreError, match=rf"{store}: array input_ids/data, chunk \d+ .*c/1\) cannot be read"):
        reader.read_windows([SHARDS.tokens_shard + 10], 10)
    code, _, err = run_verify(capsys, store)
    assert code == 1 and "check 'content hash' failed" in err and "Digest mismatch" in err


def test_damaged_segment_runs_refuse_the_open(store: Path) -> None:
    xor_middle(store / "segments" / "length" / "c" / "1", 20)
    with pytest.raises(StoreError, match=rf"{store}: array segments/length, chunk 1 .* cannot be read"):
        StoreReader.open(store)


def test_every_array_of_a_new_store_has_chunk_checksums(store: Path) -> None:
    for key in json.loads((store / "manifest.json").read_text())["arrays"]:
        codecs = json.loads((store / key / "zarr.json").read_text())["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            assert codecs[0]["configuration"]["index_codecs"][-1] == {"name": "crc32c"}, key
            codecs = codecs[0]["configuration"]["codecs"]
        assert codecs[-1] == {"name": "crc32c"}, key


# --------------------------------------------------------------------------------------------------
# The verify command
# --------------------------------------------------------------------------------------------------


def test_verify_passes_a_good_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_verify(capsys, store)
    assert code == 0 and err == ""
    for check in ("manifest", "arrays", "offsets", "segments", "content hash", "token ids"):
        assert re.search(rf"^  {check} +ok +\S", out, re.MULTILINE), (check, out)
    assert "a crc32c on every chunk" in out and "1 of 1 stores pass every check" in out


def test_verify_names_the_damaged_chunk(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_store(tmp_path / "good", make_documents(5, seed=1))
    xor_middle(token_file(store, 0), 300)
    code, out, err = run_verify(capsys, tmp_path / "good", store)
    assert code == 1
    assert f"FAIL {store}: check 'content hash' failed: {store}: array input_ids/data, chunk" in err
    assert "1 of 2 stores pass every check" in out


def set_offset(store: Path, group: str, index: int, value: int) -> None:
    """Rewrite one cell through tensorstore: the chunk checksum stays valid, the content is wrong."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / group / "offsets")}}
    ts.open(spec, open=True, read=True, write=True).result()[index].write(value).result()


def test_verify_names_bad_offsets(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_offset(store, "input_ids", 4, 2)  # row 3 now ends before it starts
    code, out, err = run_verify(capsys, store)
    assert code == 1
    assert re.search(r"check 'offsets' failed: .*input_ids/offsets: row 3 ends at 2, not after its start", err)
    assert re.search(r"segments +skipped +needs offsets", out)  # what relies on the offsets is not run
    with pytest.raises(StoreError, match="verify: the offsets check failed"):
        StoreReader.open(store).verify()


def test_verify_names_segment_runs_that_miss_the_tokens(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ends = StoreReader.open(store)._document_runs
    set_offset(store, "segments", 2, int(ends[2]) - 1)  # document 1 (a megadoc) gives its last run to document 2
    code, _, err = run_verify(capsys, store)
    assert code == 1 and re.search(r"check 'segments' failed: .*document 1's segment runs end at token", err)


@pytest.mark.parametrize(
    "field, value, check, message",
    [
        ("vocab_size", 999, "manifest", r"vocab_size 999 / eos_id 999 differ from its tokenizer's \(1000 / 999\)"),
        ("num_tokens", 1000, "arrays", r"array input_ids/data has shape \[\d+\], manifest.json says \[1000\]"),
        ("format_version", 7, "manifest", r"format_version 7 is not one of 1..2"),
        ("content_hash", "sha256:" + "0" * 64, "content hash", r"content hash sha256:\w+ differs from manifest"),
        ("finished", False, "manifest", "finished is False: the store is unfinished"),
    ],
)
def test_verify_names_a_changed_manifest_field(
    store: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, check: str, message: str
) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest[field] = value
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_verify(capsys, store)
    assert code == 1 and re.search(rf"FAIL {store}: check '{check}' failed: .*{message}", err), err


def test_verify_command_exit_codes(store: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "megadoc_jax.data.verify", str(store)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    missing = subprocess.run([*command, str(tmp_path / "missing")], capture_output=True, text=True)
    assert missing.returncode == 1 and f"FAIL {tmp_path / 'missing'}: check 'manifest' failed" in missing.stderr


def test_progress_bar_only_when_asked(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    StoreReader.open(store).verify(progress=True)
    assert "block" in capsys.readouterr().err
    StoreReader.open(store).verify()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------------
# Format 1: read and verified; its content hash is the one a format-2 store of the same content has
# --------------------------------------------------------------------------------------------------


def test_format_1_store_reads_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = tmp_path / "v1"
    shutil.copytree(V1_STORE, v1)
    reader = StoreReader.open(v1, TOKENIZER)
    assert reader.manifest["format_version"] == 1 and "checksum" not in reader.manifest["layout"]
    documents = make_documents(12, seed=11)
    assert_same_documents(reader, documents)
    assert reader.verify() == reader.manifest["content_hash"]
    code, out, _ = run_verify(capsys, v1)
    assert code == 0 and "no chunk checksums" in out

    v2 = write_store(tmp_path / "v2", documents, layout=V1_LAYOUT)
    assert v2["format_version"] == 2 and v2["layout"]["checksum"] is True
    assert v2["content_hash"] == reader.manifest["content_hash"]  # the format bump changes no content hash


def test_format_1_damage_is_found_by_the_content_hash_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = tmp_path / "v1"
    shutil.copytree(V1_STORE, v1)
    data = bytearray(token_file(v1, 1).read_bytes())
    data[40] ^= 0x01  # inside chunk 0 of the shard: no checksum covers it
    token_file(v1, 1).write_bytes(bytes(data))
    StoreReader.open(v1).read_windows([256], 64)  # reads, silently wrong
    code, _, err = run_verify(capsys, v1)
    assert code == 1 and "check 'content hash' failed" in err and "differs from manifest.json" in err


def test_layout_without_checksums(tmp_path: Path) -> None:
    """checksum=False (what StoreLayout.levanter() uses) writes format 2 without chunk crc32c."""
    manifest = write_store(tmp_path / "s", make_documents(9, seed=2), layout=StoreLayout(checksum=False))
    codecs = json.loads((tmp_path / "s" / "input_ids" / "data" / "zarr.json").read_text())["codecs"]
    assert {"name": "crc32c"} not in codecs[0]["configuration"]["codecs"]
    assert manifest["layout"]["checksum"] is False and StoreLayout.levanter().checksum is False
    assert StoreReader.open(tmp_path / "s").verify() == manifest["content_hash"]


def test_an_unfinished_format_1_store_resumes_as_format_1(tmp_path: Path) -> None:
    """A format-1 store cut during its export: the new code finishes it without chunk checksums."""
    documents = make_documents(20, seed=3)
    writer = StoreWriter(tmp_path / "s", TOKENIZER, layout=dataclasses.replace(V1_LAYOUT, checksum=False))
    writer.append(documents[:10])
    writer.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["layout"]["checksum"]  # what the format-1 code wrote
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))

    resumed = StoreWriter(tmp_path / "s", TOKENIZER)
    assert resumed.num_committed == 10 and resumed.layout.checksum is False
    resumed.append(documents[10:])
    finished = resumed.finish()
    assert finished["format_version"] == 1 and "checksum" not in finished["layout"]
    reader = StoreReader.open(tmp_path / "s", TOKENIZER)
    assert_same_documents(reader, documents)
    assert reader.verify() == write_store(tmp_path / "fresh", documents, layout=V1_LAYOUT)["content_hash"]
