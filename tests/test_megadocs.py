"""Megadoc builders: layouts token by token, the stretched chunk split, planning and the missing policy,
the spool's input checks, and megadoc streams written to token stores, resumed after a crash or kill -9."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_when

from generation import __main__ as cli
from generation import megadoc_export, megadocs
from generation.documents import InputError
from generation.megadoc_export import PROGRESS_FILE, MegadocExportError, StreamOptions, build_megadocs
from generation.megadoc_spool import SPOOL_DIR, ensure_spool
from generation.megadocs import BACK, FRONT, NODOC, SIMPLE, STRETCHED, Separators
from megadoc_jax.data.store import SegmentKind, StoreReader, TokenizerInfo

REPO = Path(__file__).resolve().parents[1]
O, R, T, S = SegmentKind.ORIGINAL, SegmentKind.REPHRASE, SegmentKind.RATIONALE, SegmentKind.SEPARATOR
EOS = 0
SEP_IDS = {
    "between": np.array([5], np.int32),
    "rationale_open": np.array([6], np.int32),
    "rationale_close": np.array([7], np.int32),
}
NO_SEP_IDS = {name: np.zeros(0, np.int32) for name in SEP_IDS}


def arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def build(method, original, generations, G, separators=SEP_IDS):
    tokens, runs = megadocs.build_document(method, original, generations, G, separators, EOS)
    return tokens.tolist(), [(SegmentKind(k), i, n) for k, i, n in runs.tolist()]


# --------------------------------------------------------------------------------------------------
# Layouts on token ids, checked token by token
# --------------------------------------------------------------------------------------------------

ORIGINAL = arr(10, 11, 12)
REPHRASES = [(1, arr(20, 21)), (2, arr(30))]

STITCHED_CASES = {
    # (method, separators, G): (tokens, runs)
    (BACK, True, 2): (
        [10, 11, 12, 5, 20, 21, 5, 30, EOS],
        [(O, 0, 3), (S, 0, 1), (R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1)],
    ),
    (FRONT, True, 2): (
        [20, 21, 5, 30, 5, 10, 11, 12, EOS],
        [(R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1), (O, 0, 3), (S, 0, 1)],
    ),
    (NODOC, True, 2): ([20, 21, 5, 30, EOS], [(R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1)]),
    (BACK, False, 2): ([10, 11, 12, 20, 21, 30, EOS], [(O, 0, 3), (R, 1, 2), (R, 2, 1), (S, 0, 1)]),
    (FRONT, False, 2): ([20, 21, 30, 10, 11, 12, EOS], [(R, 1, 2), (R, 2, 1), (O, 0, 3), (S, 0, 1)]),
    (NODOC, False, 2): ([20, 21, 30, EOS], [(R, 1, 2), (R, 2, 1), (S, 0, 1)]),
    (BACK, True, 1): ([10, 11, 12, 5, 20, 21, EOS], [(O, 0, 3), (S, 0, 1), (R, 1, 2), (S, 0, 1)]),
    (FRONT, True, 1): ([20, 21, 5, 10, 11, 12, EOS], [(R, 1, 2), (S, 0, 1), (O, 0, 3), (S, 0, 1)]),
    (NODOC, False, 1): ([20, 21, EOS], [(R, 1, 2), (S, 0, 1)]),
}


@pytest.mark.parametrize("method, with_separators, G", list(STITCHED_CASES))
def test_stitched_layouts_token_by_token(method, with_separators, G):
    original = None if method == NODOC else ORIGINAL
    got = build(method, original, REPHRASES[:G], G, SEP_IDS if with_separators else NO_SEP_IDS)
    assert got == STITCHED_CASES[method, with_separators, G]


def test_stitched_with_a_missing_rephrase_keeps_sample_numbers():
    tokens, runs = build(BACK, ORIGINAL, [(1, arr(20, 21)), (3, arr(40))], 3)
    assert tokens == [10, 11, 12, 5, 20, 21, 5, 40, EOS]
    assert runs == [(O, 0, 3), (S, 0, 1), (R, 1, 2), (S, 0, 1), (R, 3, 1), (S, 0, 1)]


def test_simple_documents_are_one_piece_and_eos():
    assert build(SIMPLE, None, [(4, arr(20, 21))], 8) == ([20, 21, EOS], [(R, 4, 2), (S, 0, 1)])
    assert build(SIMPLE, ORIGINAL, [], 8) == ([10, 11, 12, EOS], [(O, 0, 3), (S, 0, 1)])
    with pytest.raises(ValueError, match="one piece"):
        build(SIMPLE, ORIGINAL, REPHRASES, 2)


def test_stretched_layout_token_by_token():
    original = arr(10, 11, 12, 13, 14, 15, 16)  # 7 tokens, G=2: chunks of 2, 2, 3
    rationales = [(1, arr(40, 41)), (2, arr(50))]
    tokens, runs = build(STRETCHED, original, rationales, 2)
    assert tokens == [10, 11, 6, 40, 41, 7, 12, 13, 6, 50, 7, 14, 15, 16, EOS]
    assert runs == [
        (O, 0, 2),
        (S, 0, 1),
        (T, 1, 2),
        (S, 0, 1),
        (O, 0, 2),
        (S, 0, 1),
        (T, 2, 1),
        (S, 0, 1),
        (O, 0, 3),
        (S, 0, 1),
    ]
    tokens, runs = build(STRETCHED, original, rationales, 2, NO_SEP_IDS)
    assert tokens == [10, 11, 40, 41, 12, 13, 50, 14, 15, 16, EOS]
    assert runs == [(O, 0, 2), (T, 1, 2), (O, 0, 2), (T, 2, 1), (O, 0, 3), (S, 0, 1)]


def test_stretched_missing_rationale_joins_its_chunks():
    tokens, runs = build(STRETCHED, arr(10, 11, 12, 13, 14, 15, 16), [(2, arr(50))], 2)
    assert tokens == [10, 11, 12, 13, 6, 50, 7, 14, 15, 16, EOS]
    assert runs == [(O, 0, 4), (S, 0, 1), (T, 2, 1), (S, 0, 1), (O, 0, 3), (S, 0, 1)]


def test_stretched_short_original_has_empty_chunks_and_merged_separators():
    # 2 tokens in G+1 = 4 chunks: bounds 0, 0, 1, 1, 2 -> chunks [], [10], [], [11]
    tokens, runs = build(STRETCHED, arr(10, 11), [(1, arr(40)), (2, arr(50)), (3, arr(60))], 3)
    assert tokens == [6, 40, 7, 10, 6, 50, 7, 6, 60, 7, 11, EOS]
    assert runs == [
        (S, 0, 1),
        (T, 1, 1),
        (S, 0, 1),
        (O, 0, 1),
        (S, 0, 1),
        (T, 2, 1),
        (S, 0, 2),
        (T, 3, 1),
        (S, 0, 1),
        (O, 0, 1),
        (S, 0, 1),
    ]


def test_layout_refusals():
    with pytest.raises(ValueError, match="split points"):
        build(STRETCHED, ORIGINAL, [(3, arr(40))], 2)
    with pytest.raises(ValueError, match="original must be absent"):
        build(NODOC, ORIGINAL, REPHRASES, 2)
    with pytest.raises(ValueError, match="G must be"):
        build(BACK, ORIGINAL, REPHRASES, 33)
    with pytest.raises(ValueError, match="method"):
        build("stitched", ORIGINAL, REPHRASES, 2)


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 5, 31, 32, 33, 100, 1243])
@pytest.mark.parametrize("G", [1, 2, 3, 7, 16, 32])
def test_chunk_split_is_exact(num_tokens, G):
    bounds = megadocs.chunk_bounds(num_tokens, G + 1)
    sizes = np.diff(bounds)
    assert bounds.size == G + 2 and bounds[0] == 0 and bounds[-1] == num_tokens
    assert np.all(sizes >= 0) and sizes.max() - sizes.min() <= 1
    tokens = np.arange(num_tokens)
    chunks = [tokens[bounds[c] : bounds[c + 1]] for c in range(G + 1)]
    assert np.array_equal(np.concatenate(chunks), tokens)  # in order, nothing lost or repeated
    # The stretched document holds exactly the original's tokens as ORIGINAL segments, in order.
    original = np.arange(100, 100 + num_tokens, dtype=np.int32)
    doc, runs = megadocs.build_document(STRETCHED, original, [(k, arr(1, 2)) for k in range(1, G + 1)], G, SEP_IDS, EOS)
    kinds = np.repeat(runs[:, 0], runs[:, 2])
    assert np.array_equal(doc[kinds == O], original)
    assert np.sum(kinds == T) == 2 * G


def test_misplaced_rationales_compares_character_splits():
    starts = [0, 3, 7, 10, 14]  # 5 tokens of a 17-character text
    assert megadocs.split_characters(starts.__getitem__, 5, 17, 1) == [7]  # G=1: 2 + 3 tokens
    assert megadocs.split_characters(starts.__getitem__, 5, 17, 2) == [3, 10]  # G=2: 1 + 2 + 2 tokens
    assert megadocs.split_characters([0].__getitem__, 1, 4, 2) == [0, 0]  # chunks [], [], [t0]
    assert megadocs.split_characters([].__getitem__, 0, 3, 1) == [3]  # no tokens: the split lies at the end
    assert megadocs.misplaced_rationales([3, 10], [(1, 3), (2, 10)]) == 0
    assert megadocs.misplaced_rationales([3, 10], [(1, 3), (2, 7)]) == 1
    assert megadocs.misplaced_rationales([3, 10], [(1, -1), (2, -1)]) == 0  # unknown: not counted


def test_metadata_summarises_generations_and_records_separators():
    meta = megadocs.document_metadata(
        "d1", BACK, 3, [1, 3], ["stop", "length"], ["m", "m"], ["wiki-v1", ""], Separators()
    )
    assert meta == {
        "source_id": "d1",
        "method": BACK,
        "G": 3,
        "samples": [1, 3],
        "finish_reason": "length,stop",
        "finish_reasons": ["stop", "length"],
        "generator": "m",
        "prompt_version": "wiki-v1",
        "separators": {"between": "\n\n"},
    }
    simple = megadocs.document_metadata("d1", SIMPLE, 3, [], [], [], [], Separators())
    assert simple == {"source_id": "d1", "method": SIMPLE, "G": 3, "samples": []}


# --------------------------------------------------------------------------------------------------
# Planning: missing generations, order, shuffle
# --------------------------------------------------------------------------------------------------

AVAILABLE = [np.array([1, 2, 3, 4]), np.array([1, 3]), np.array([], np.int64), np.array([2, 5, 6])]


def test_plan_build_uses_what_exists_and_counts_the_missing():
    plan = megadocs.plan_stream(BACK, 3, AVAILABLE, missing="build")
    assert plan.sources.tolist() == [0, 1, 2, 3]
    assert [plan.numbers(i).tolist() for i in range(4)] == [[1, 2, 3], [1, 3], [], [2]]  # never beyond G
    assert plan.with_original.tolist() == [True] * 4
    assert plan.counts == {
        "sources": 4,
        "sources_complete": 1,
        "sources_incomplete": 3,
        "generations_missing": 6,
        "generations_used": 6,
        "skipped_incomplete": 0,
        "skipped_empty": 0,
    }


def test_plan_skip_leaves_incomplete_sources_out_and_nodoc_skips_empty():
    plan = megadocs.plan_stream(FRONT, 3, AVAILABLE, missing="skip")
    assert plan.sources.tolist() == [0] and plan.counts["skipped_incomplete"] == 3
    nodoc = megadocs.plan_stream(NODOC, 3, AVAILABLE, missing="build")
    assert nodoc.sources.tolist() == [0, 1, 3] and nodoc.counts["skipped_empty"] == 1
    assert not nodoc.with_original.any()


def test_plan_error_names_the_source():
    with pytest.raises(megadocs.MissingGenerationsError, match="'web-1'.*2 of 3"):
        megadocs.plan_stream(STRETCHED, 3, AVAILABLE, missing="error", source_ids=["web-0", "web-1", "web-2", "web-3"])
    with pytest.raises(ValueError, match="missing policy"):
        megadocs.plan_stream(BACK, 3, AVAILABLE, missing="ignore")


def test_simple_plan_is_a_seeded_permutation_of_every_piece():
    plan = megadocs.plan_stream(SIMPLE, 3, AVAILABLE, seed=7)
    units = sorted(
        (int(plan.sources[i]), int(plan.numbers(i)[0]) if plan.numbers(i).size else 0) for i in range(len(plan))
    )
    assert units == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3), (2, 0), (3, 0), (3, 2)]
    assert all(plan.with_original[i] == (plan.numbers(i).size == 0) for i in range(len(plan)))
    again = megadocs.plan_stream(SIMPLE, 3, AVAILABLE, seed=7)
    other = megadocs.plan_stream(SIMPLE, 3, AVAILABLE, seed=8)
    assert np.array_equal(plan.sources, again.sources) and np.array_equal(plan.number_values, again.number_values)
    assert not (np.array_equal(plan.sources, other.sources) and np.array_equal(plan.number_values, other.number_values))
    no_originals = megadocs.plan_stream(SIMPLE, 3, AVAILABLE, seed=7, simple_originals=False)
    assert len(no_originals) == 6 and not no_originals.with_original.any()


# --------------------------------------------------------------------------------------------------
# Streams written to token stores, with a word-level tokenizer so that tokens read as words
# --------------------------------------------------------------------------------------------------

WORDS = ["<eos>", "<unk>", "||", "<t>", "</t>"] + [f"{p}{i}" for p in "oabcdxyz" for i in range(1, 10)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("words")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(out))
    return out


def words(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


SOURCES = [{"id": "d1", "text": "o1 o2 o3 o4 o5"}, {"id": "d2", "text": "o6 o7 o8"}, {"id": 3, "text": "o9 o1"}]


def generation(doc_id, task, sample, text, G=2, **extra):
    return {
        "doc_id": doc_id,
        "task": task,
        "sample": sample,
        "G": G,
        "text": text,
        "finish_reason": "stop",
        "generator": "tiny",
        "prompt_version": f"{task}-v1",
        **extra,
    }


GENERATIONS = [
    generation("d1", "rephrase", 0, "a1 a2"),
    generation("d1", "rephrase", 1, "a3"),
    generation("d2", "rephrase", 1, "b1 b2 b3"),
    generation("d2", "rephrase", 0, "b4", finish_reason="length"),
    generation(3, "rephrase", 0, "c1"),  # sample 1 missing
    # d1 "o1 o2 o3 o4 o5": 3 chunks o1 | o2 o3 | o4 o5; split characters 3 and 9
    generation("d1", "rationale", 0, "x1 x2", split_char=3),
    generation("d1", "rationale", 1, "y1", split_char=9),
    generation("d2", "rationale", 0, "x3", split_char=0),
    generation("d2", "rationale", 1, "y2", split_char=6),
    generation(3, "rationale", 0, "x4"),
    generation(3, "rationale", 1, "y3"),
]
SEPARATORS = Separators(between=" || ", rationale_open="<t>", rationale_close="</t>")
ALL_STREAMS = [(m, 2) for m in megadocs.METHODS]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture()
def inputs(tmp_path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "sources.jsonl", SOURCES), write_jsonl(tmp_path / "gen.jsonl", GENERATIONS)


def read_store(path: Path, tokenizer_dir: Path) -> list:
    reader = StoreReader.open(path, TokenizerInfo.from_directory(tokenizer_dir))
    return [reader.document(i) for i in range(reader.num_documents)]


def as_words(document) -> tuple[str, list]:
    text = " ".join(WORDS[t] for t in document.tokens)
    return text, [(s.kind, s.index, s.length) for s in document.segments]


EXPECTED_D1 = {
    BACK: ("o1 o2 o3 o4 o5 || a1 a2 || a3 <eos>", [(O, 0, 5), (S, 0, 1), (R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1)]),
    FRONT: ("a1 a2 || a3 || o1 o2 o3 o4 o5 <eos>", [(R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1), (O, 0, 5), (S, 0, 1)]),
    NODOC: ("a1 a2 || a3 <eos>", [(R, 1, 2), (S, 0, 1), (R, 2, 1), (S, 0, 1)]),
    STRETCHED: (
        "o1 <t> x1 x2 </t> o2 o3 <t> y1 </t> o4 o5 <eos>",
        [(O, 0, 1), (S, 0, 1), (T, 1, 2), (S, 0, 1), (O, 0, 2), (S, 0, 1), (T, 2, 1), (S, 0, 1), (O, 0, 2), (S, 0, 1)],
    ),
}


def test_streams_round_trip_through_stores(tmp_path, inputs, tokenizer_dir):
    sources, gens = inputs
    options = StreamOptions(separators=SEPARATORS, flush_tokens=30, progress=False)
    reports = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", ALL_STREAMS, options, workers=0)
    stores = {r["method"]: read_store(Path(r["store"]), tokenizer_dir) for r in reports}
    for method, expected in EXPECTED_D1.items():
        assert as_words(stores[method][0]) == expected, method
        assert stores[method][0].metadata["source_id"] == "d1"
    assert as_words(stores[BACK][2]) == ("o9 o1 || c1 <eos>", [(O, 0, 2), (S, 0, 1), (R, 1, 1), (S, 0, 1)])
    assert stores[BACK][1].metadata == {
        "source_id": "d2",
        "method": BACK,
        "G": 2,
        "samples": [1, 2],
        "finish_reason": "length,stop",
        "finish_reasons": ["length", "stop"],
        "generator": "tiny",
        "prompt_version": "rephrase-v1",
        "separators": {"between": " || "},
    }
    assert stores[STRETCHED][0].metadata["separators"] == {"rationale_open": "<t>", "rationale_close": "</t>"}
    simple = sorted(as_words(d)[0] for d in stores[SIMPLE])
    assert simple == sorted(
        [
            "o1 o2 o3 o4 o5 <eos>",
            "o6 o7 o8 <eos>",
            "o9 o1 <eos>",
            "a1 a2 <eos>",
            "a3 <eos>",
            "b4 <eos>",
            "b1 b2 b3 <eos>",
            "c1 <eos>",
        ]
    )
    by_method = {r["method"]: r for r in reports}
    assert by_method[BACK]["plan"]["sources_incomplete"] == 1 and by_method[BACK]["plan"]["generations_missing"] == 1
    assert by_method[BACK]["tokens_by_kind"] == {"original": 10, "rephrase": 8, "rationale": 0, "separator": 8}
    # d2's first rationale was split at character 0, not where the store tokenizer's chunks put it (3).
    assert by_method[STRETCHED]["rationales_misplaced"] == 1
    assert by_method[STRETCHED]["misplaced_examples"] == ["source 'd2': 1 rationales"]
    assert not (tmp_path / "out" / SPOOL_DIR).exists()


def test_one_megadocs_run_per_out_directory(tmp_path, inputs, tokenizer_dir):
    from megadoc_jax.files import lock_exclusive

    sources, gens = inputs
    (tmp_path / "out").mkdir()
    with lock_exclusive(tmp_path / "out" / megadoc_export.LOCK_FILE):  # held as by another run
        with pytest.raises(MegadocExportError, match=rf"{tmp_path}/out: another megadocs run holds .megadocs.lock"):
            build_megadocs(
                [sources],
                [gens],
                tokenizer_dir,
                tmp_path / "out",
                [(BACK, 2)],
                StreamOptions(progress=False),
                workers=0,
            )
    assert not (tmp_path / "out" / f"{BACK}-G2").exists()


def test_a_new_method_is_one_table_entry(tmp_path, inputs, tokenizer_dir, monkeypatch):
    """A toy method (rephrases last to first, then the original) needs one METHOD_TABLE entry, nothing else."""

    def reversed_then_original(original, generations, G, separator_ids):
        return megadocs._rephrases_then_original(original, list(generations)[::-1], G, separator_ids)

    toy = megadocs.Method("stitched-reversed", megadocs.REPHRASE, reversed_then_original, ("between",))
    monkeypatch.setitem(megadocs.METHOD_TABLE, toy.name, toy)
    sources, gens = inputs
    options = StreamOptions(separators=SEPARATORS, progress=False)
    (report,) = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", [(toy.name, 2)], options, workers=0)
    documents = read_store(Path(report["store"]), tokenizer_dir)
    assert report["stream"] == "stitched-reversed-G2" and len(documents) == len(SOURCES)
    assert as_words(documents[0]) == (
        "a3 || a1 a2 || o1 o2 o3 o4 o5 <eos>",
        [(R, 2, 1), (S, 0, 1), (R, 1, 2), (S, 0, 1), (O, 0, 5), (S, 0, 1)],
    )
    assert documents[0].metadata["separators"] == {"between": " || "}
    assert documents[0].metadata["method"] == toy.name


def test_worker_processes_and_no_separators_give_the_expected_stores(tmp_path, inputs, tokenizer_dir):
    sources, gens = inputs
    streams = [(BACK, 2), (STRETCHED, 2)]
    options = StreamOptions(separators=megadocs.NO_SEPARATORS, batch_texts=3, progress=False)
    in_process = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "a", streams, options, workers=0)
    pooled = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "b", streams, options, workers=2)
    assert [r["content_hash"] for r in pooled] == [r["content_hash"] for r in in_process]
    back, stretched = (read_store(Path(r["store"]), tokenizer_dir) for r in pooled)
    assert as_words(back[0]) == ("o1 o2 o3 o4 o5 a1 a2 a3 <eos>", [(O, 0, 5), (R, 1, 2), (R, 2, 1), (S, 0, 1)])
    assert as_words(stretched[0])[0] == "o1 x1 x2 o2 o3 y1 o4 o5 <eos>"
    assert back[0].metadata["separators"] == {"between": ""}


def test_missing_policy_skip_and_error_through_the_builder(tmp_path, inputs, tokenizer_dir):
    sources, gens = inputs
    skip = StreamOptions(separators=SEPARATORS, missing="skip", progress=False)
    (report,) = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "skip", [(BACK, 2)], skip, workers=0)
    assert report["documents"] == 2 and report["plan"]["skipped_incomplete"] == 1
    assert [d.metadata["source_id"] for d in read_store(Path(report["store"]), tokenizer_dir)] == ["d1", "d2"]
    with pytest.raises(megadocs.MissingGenerationsError, match="'3'"):
        build_megadocs(
            [sources],
            [gens],
            tokenizer_dir,
            tmp_path / "err",
            [(BACK, 2)],
            StreamOptions(separators=SEPARATORS, missing="error", progress=False),
            workers=0,
        )
    with pytest.raises(MegadocExportError, match="rationale generations made for G=4.*G in \\[2\\]"):
        build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "g4", [(STRETCHED, 4)], skip, workers=0)


# --------------------------------------------------------------------------------------------------
# Input checks of the spool
# --------------------------------------------------------------------------------------------------


def test_generation_problems_are_counted_with_locations(tmp_path, inputs):
    sources, _ = inputs
    gens = write_jsonl(
        tmp_path / "problems.jsonl",
        [
            generation("d1", "rephrase", 0, "a1"),
            generation("nope", "rephrase", 0, "a2"),
            generation("d1", "rephrase", 0, "a3"),
            generation("d2", "rephrase", 0, "  "),
            "",
            json.dumps(generation("d2", "rephrase", 2, "x")).replace('"x"', '"\\ud800"'),
        ],
    )
    table = pa.Table.from_pylist([generation("d2", "rephrase", 1, "b1"), generation("d1", "rephrase", 0, "a4")])
    pq.write_table(table, tmp_path / "more.parquet")
    spool = ensure_spool(tmp_path / "out", [sources], [gens, tmp_path / "more.parquet"])
    report = spool.report
    assert report["generations"] == 2
    assert report["generation_problems"] == {"orphan": 1, "duplicate": 2, "empty": 1, "invalid_utf8": 1}
    assert report["generation_examples"]["invalid_utf8"] == [f"{gens}:6: character 0"]
    assert report["generation_examples"]["orphan"] == [f"{gens}:2: id 'nope'"]
    assert sorted(report["generation_examples"]["duplicate"]) == sorted(
        [f"{gens}:3", f"{tmp_path / 'more.parquet'} row 1"]
    )
    group = spool.group("rephrase", 0)
    assert [n.tolist() for n in group.available()] == [[1], [2], []]
    assert spool.generation_text(int(group.entries(0, np.array([1]))[0])) == b"a1"  # the first read is kept


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", r"gen.jsonl:1: not a JSON record"),
        ([1, 2], r"gen.jsonl:1: a JSON list"),
        (
            {"doc_id": "d1", "task": "rephrase", "sample": 0, "finish_reason": "stop"},
            r"gen.jsonl:1: field 'text' is None",
        ),
        ({"doc_id": "d1", "task": "summary", "sample": 0}, r"field 'task' is 'summary'"),
        (
            {"doc_id": "d1", "task": "rationale", "sample": 2, "G": 2, "text": "x", "finish_reason": "stop"},
            r"sample 2 out of range for G=2",
        ),
        (
            {"doc_id": None, "task": "rephrase", "sample": 0, "text": "x", "finish_reason": "stop"},
            r"field 'doc_id' is None",
        ),
    ],
)
def test_bad_generation_records_stop_with_their_location(tmp_path, inputs, record, message):
    sources, _ = inputs
    gens = write_jsonl(tmp_path / "gen.jsonl", [record if isinstance(record, str) else json.dumps(record)])
    with pytest.raises(InputError, match=message):
        ensure_spool(tmp_path / "out", [sources], [gens])
    assert not (tmp_path / "out" / SPOOL_DIR).exists()


def test_bad_sources_follow_the_export_policy_and_merge_directories_are_read(tmp_path, inputs):
    _, gens = inputs
    sources = write_jsonl(tmp_path / "s.jsonl", [*SOURCES, {"id": "d1", "text": "o2"}, {"id": "e", "text": ""}])
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "generations.jsonl").write_text(gens.read_text())
    (merged / "manifest.json").write_text(json.dumps({"finished": True}))
    spool = ensure_spool(tmp_path / "out", [sources], [merged])
    assert spool.report["sources_bad"]["skipped"]["duplicate_id"] == 1
    assert spool.report["sources_bad"]["skipped"]["empty"] == 1
    assert spool.source_ids == ["d1", "d2", "3"] and spool.report["generations"] == len(GENERATIONS)
    (merged / "manifest.json").write_text(json.dumps({"finished": False}))
    with pytest.raises(InputError, match="not a finished merge"):
        ensure_spool(tmp_path / "out2", [sources], [merged])
    with pytest.raises(InputError, match="malformed"):
        ensure_spool(tmp_path / "out3", [write_jsonl(tmp_path / "bad.jsonl", ["{oops"])], [gens])


def test_separator_without_tokens_is_refused(tmp_path, inputs, tokenizer_dir):
    sources, gens = inputs
    options = StreamOptions(separators=Separators(between="\n\n"), progress=False)  # whitespace: no word tokens
    for workers in (0, 1):  # refused before any worker starts (a failing pool initializer would restart forever)
        with pytest.raises(ValueError, match="between='\\\\n\\\\n' gives no tokens"):
            build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", [(BACK, 2)], options, workers=workers)


# --------------------------------------------------------------------------------------------------
# Resume: an interrupted build, kill -9, finished stores
# --------------------------------------------------------------------------------------------------


def many_inputs(tmp_path: Path, count: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    vocab = [w for w in WORDS if w[0] in "oab"]
    sources = [{"id": f"s{i}", "text": " ".join(rng.choice(vocab, int(rng.integers(3, 30))))} for i in range(count)]
    gens = [
        generation(s["id"], "rephrase", k, " ".join(rng.choice(vocab, int(rng.integers(1, 20)))), G=4)
        for s in sources
        for k in range(4)
        if int(s["id"][1:]) % 7 or k < 2
    ]
    return write_jsonl(tmp_path / "many.jsonl", sources), write_jsonl(tmp_path / "many_gen.jsonl", gens)


@pytest.mark.parametrize("crash", ["while_building", "between_commit_and_progress"])
def test_interrupted_build_resumes_to_the_same_store(tmp_path, tokenizer_dir, monkeypatch, crash):
    sources, gens = many_inputs(tmp_path, 120)
    options = StreamOptions(separators=SEPARATORS, batch_texts=10, flush_tokens=300, progress=False)
    streams = [(SIMPLE, 4), (BACK, 4)]
    calls = {"n": 0}

    def fail_on_call(real, n):
        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError("simulated crash")
            return real(*args, **kwargs)

        return failing

    if crash == "while_building":  # a batch half built: its documents are not in the store
        monkeypatch.setattr(megadocs, "build_document", fail_on_call(megadocs.build_document, 163))
    else:  # the store committed documents that the progress record does not count yet
        monkeypatch.setattr(megadoc_export, "write_json_atomic", fail_on_call(megadoc_export.write_json_atomic, 5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", streams, options, workers=0)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "out" / "simple-G4" / PROGRESS_FILE).read_text())
    resumed = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", streams, options, workers=0)
    fresh = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "fresh", streams, options, workers=0)
    if crash == "while_building":
        assert resumed[0]["resumed_at_document"] == progress["documents"] > 0
    else:
        assert resumed[0]["resumed_at_document"] > progress["documents"] > 0
    for a, b in zip(resumed, fresh):
        assert (a["content_hash"], a["documents"], a["tokens"], a["tokens_by_kind"]) == (
            b["content_hash"],
            b["documents"],
            b["tokens"],
            b["tokens_by_kind"],
        )
    again = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", streams, options, workers=0)
    assert [r["content_hash"] for r in again] == [r["content_hash"] for r in fresh]  # finished: nothing rebuilt
    with pytest.raises(MegadocExportError, match="already finished, with other inputs or settings"):
        build_megadocs(
            [sources],
            [gens],
            tokenizer_dir,
            tmp_path / "out",
            streams[:1],
            StreamOptions(separators=SEPARATORS, seed=1, progress=False),
            workers=0,
        )


def test_unfinished_build_refuses_other_settings(tmp_path, tokenizer_dir, monkeypatch):
    sources, gens = many_inputs(tmp_path, 40)
    monkeypatch.setattr(megadocs, "build_document", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        build_megadocs(
            [sources],
            [gens],
            tokenizer_dir,
            tmp_path / "out",
            [(BACK, 4)],
            StreamOptions(separators=SEPARATORS, progress=False),
            workers=0,
        )
    monkeypatch.undo()
    other = StreamOptions(separators=Separators(between=" a1 "), progress=False)
    with pytest.raises(MegadocExportError, match=r"other settings \(separators\)"):
        build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", [(BACK, 4)], other, workers=0)


@pytest.mark.slow
def test_kill_9_mid_build_then_rerun_matches_uninterrupted(tmp_path, tokenizer_dir):
    sources, gens = many_inputs(tmp_path, 800)
    args = [
        "--sources",
        str(sources),
        "--generations",
        str(gens),
        "--tokenizer",
        str(tokenizer_dir),
        "--methods",
        "stitched-back",
        "--G",
        "4",
        "--workers",
        "0",
        "--batch-texts",
        "20",
        "--separator",
        " || ",
        "--flush-tokens",
        "2000",
        "--no-progress",
    ]
    store = tmp_path / "out" / "stitched-back-G4"
    command = [sys.executable, "-m", "generation", "megadocs", *args, "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = store / PROGRESS_FILE
    started = lambda: progress.exists() and json.loads(progress.read_text())["documents"] > 0  # noqa: E731
    kill_when(process, started, timeout=120, what="the megadoc build")
    assert json.loads((store / "manifest.json").read_text())["finished"] is False
    assert cli.main(["megadocs", *args, "--out", str(tmp_path / "out")]) == 0
    assert cli.main(["megadocs", *args, "--out", str(tmp_path / "fresh")]) == 0
    resumed = json.loads((store / megadoc_export.REPORT_FILE).read_text())
    fresh = json.loads((tmp_path / "fresh" / "stitched-back-G4" / megadoc_export.REPORT_FILE).read_text())
    assert resumed["resumed_at_document"] > 0 and resumed["content_hash"] == fresh["content_hash"]
    assert resumed["documents"] == fresh["documents"] == 800
    assert StoreReader.open(store).verify() == fresh["content_hash"]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_separators_summary_and_errors(tmp_path, inputs, tokenizer_dir, capsys):
    sources, gens = inputs
    base = [
        "--sources",
        str(sources),
        "--generations",
        str(gens),
        "--tokenizer",
        str(tokenizer_dir),
        "--workers",
        "0",
        "--no-progress",
        "--G",
        "2",
        "--rationale-open",
        "<t>",
        "--rationale-close",
        "</t>",
    ]
    code = cli.main(
        [
            "megadocs",
            *base,
            "--out",
            str(tmp_path / "a"),
            "--methods",
            "stitched-front",
            "--separator",
            "\\n||\\n",
            "--keep-spool",
        ]
    )
    assert code == 0
    assert "stitched-front-G2: 3 documents" in capsys.readouterr().out
    (front,) = [read_store(tmp_path / "a" / "stitched-front-G2", tokenizer_dir)[0]]
    assert front.metadata["separators"] == {"between": "\n||\n"}
    assert as_words(front)[0] == "a1 a2 || a3 || o1 o2 o3 o4 o5 <eos>"
    assert (tmp_path / "a" / SPOOL_DIR / "spool.json").exists()
    assert cli.main(["megadocs", *base, "--out", str(tmp_path / "b"), "--methods", "stretched", "--G", "3"]) == 2
    assert "needs rationale generations made for G=3" in capsys.readouterr().err
    assert cli.main(["megadocs", *base, "--out", str(tmp_path / "c"), "--methods", "stitched"]) == 2
    assert "method 'stitched'" in capsys.readouterr().err


def test_streams_built_on_a_url_match_the_local_ones(tmp_path, inputs, tokenizer_dir):
    """OUT as a memory:// URL: the stores and reports go through megadoc_jax/storage.py, the lock is a lease
    object and the spool is built in a local scratch directory (removed at the end)."""
    import uuid

    from megadoc_jax import storage

    sources, gens = inputs
    options = StreamOptions(separators=SEPARATORS, flush_tokens=30, progress=False)
    streams = [(BACK, 2), (STRETCHED, 2)]
    url = f"memory://megadocs-{uuid.uuid4().hex}/out"
    remote = build_megadocs([sources], [gens], tokenizer_dir, url, streams, options, workers=0)
    local = build_megadocs([sources], [gens], tokenizer_dir, tmp_path / "out", streams, options, workers=0)
    for r, l in zip(remote, local):
        assert r["content_hash"] == l["content_hash"] and r["store"].startswith(url)
        assert [as_words(d) for d in read_store(r["store"], tokenizer_dir)] == [
            as_words(d) for d in read_store(l["store"], tokenizer_dir)
        ]
    assert sorted(storage.list_names(storage.location(url))) == [f"{BACK}-G2", f"{STRETCHED}-G2"]
    assert not megadoc_export.spool_parent(storage.location(url)).joinpath(SPOOL_DIR).exists()
