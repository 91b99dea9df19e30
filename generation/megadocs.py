"""Megadoc builders: how source documents and their generations become the documents of one stream.

The paper's methods (docs/megadocs.md has a worked example of each):

    simple          each rephrase is its own document; one copy of each original joins them; the
                    stream is shuffled globally (plan_stream)
    stitched-back   original, rephrase 1, ..., rephrase G                      (one document)
    stitched-front  rephrase 1, ..., rephrase G, original                      (one document)
    stitched-nodoc  rephrase 1, ..., rephrase G                                (one document)
    stretched       chunk 0, rationale 1, chunk 1, ..., rationale G, chunk G   (one document)

Every piece is tokenized on its own (no special tokens) and the pieces are concatenated, so each segment
boundary is exact. Separators are text, tokenized on their own too: `between` joins the pieces of a
stitched document, `rationale_open` / `rationale_close` wrap each rationale of a stretched one; an empty
string means no separator. The EOS that ends every document belongs to a SEPARATOR segment.

Segments are maximal runs of (kind, index): ORIGINAL 0 for the original or its chunks, REPHRASE k /
RATIONALE k with k = the generation's 1-based sample number (for a rationale: its split point), and
SEPARATOR 0 for separators and EOS.

METHOD_TABLE holds one entry per method (its generation task, layout function, separators and planning
rule); everything else reads the table, so adding a method is one entry there. Planning (which
generations go into which document, in which order) is here too: `plan_stream` applies the
missing-generation policy and the simple stream's global shuffle to the numbers of the generations
that exist. This module is pure (token ids in, token ids and segments out): no files, no tokenizer;
megadoc_workers.py tokenizes, megadoc_export.py writes the stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from megadoc_jax.data.store import Segment, SegmentKind

MISSING_POLICIES = ("build", "skip", "error")
MAX_G = 32
REPHRASE, RATIONALE = "rephrase", "rationale"  # the generation tasks that feed the methods

# The paper's method names; each is one entry of METHOD_TABLE below.
SIMPLE = "simple"
BACK = "stitched-back"
FRONT = "stitched-front"
NODOC = "stitched-nodoc"
STRETCHED = "stretched"


@dataclasses.dataclass(frozen=True)
class Separators:
    """Separator texts, tokenized on their own; '' means none. Recorded in every megadoc's metadata."""

    between: str = "\n\n"  # between the pieces of a stitched megadoc
    rationale_open: str = "\n<thought>\n"  # before each rationale of a stretched megadoc
    rationale_close: str = "\n</thought>\n"  # after it

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def used_by(self, method: str) -> dict[str, str]:
        """The separators that appear in documents of `method` (simple documents have none)."""
        return {name: getattr(self, name) for name in method_spec(method).separators}


NO_SEPARATORS = Separators(between="", rationale_open="", rationale_close="")


class Piece(NamedTuple):
    kind: SegmentKind
    index: int
    tokens: np.ndarray  # int32 [n]; may be empty (then it adds nothing)


# --------------------------------------------------------------------------------------------------
# The chunk split of stretching
# --------------------------------------------------------------------------------------------------


def chunk_bounds(num_tokens: int, num_chunks: int) -> np.ndarray:
    """int64 [num_chunks + 1] boundaries of `num_chunks` near-equal consecutive chunks of `num_tokens`.

    Chunk c is tokens [bounds[c], bounds[c+1]); sizes differ by at most 1, the longer ones last
    (bounds[c] = floor(c * n / chunks)). A document shorter than num_chunks gets some empty chunks.
    The generation engine must split with this function so that rationale i sits at split point i.
    """
    if num_tokens < 0 or num_chunks < 1:
        raise ValueError(f"chunk_bounds: need num_tokens >= 0 and num_chunks >= 1, got {num_tokens}, {num_chunks}")
    return np.arange(num_chunks + 1, dtype=np.int64) * num_tokens // num_chunks


def split_characters(token_start: Callable[[int], int], num_tokens: int, text_chars: int, G: int) -> list[int]:
    """Character offset of split points 1..G of chunk_bounds, given where token i starts in the text.

    A split after the last token (a document of no tokens) lies at the text's end.
    """
    bounds = chunk_bounds(num_tokens, G + 1)[1:-1]
    return [token_start(int(b)) if b < num_tokens else text_chars for b in bounds]


def misplaced_rationales(split_chars: Sequence[int], recorded: Sequence[tuple[int, int]]) -> int:
    """How many rationales the generator made at another place than chunk_bounds puts them.

    split_chars: split_characters of the original with the store's tokenizer (index k-1 for point k).
    recorded: (split point k, character offset where the generator split the text; -1 unknown).
    They differ when the generator's tokenizer is not the store's, or when the generator saw a cut text.
    """
    return sum(1 for k, char in recorded if char >= 0 and split_chars[k - 1] != char)


# --------------------------------------------------------------------------------------------------
# Layouts: pieces in document order
# --------------------------------------------------------------------------------------------------


def _joined(pieces: Sequence[Piece], separator: np.ndarray) -> list[Piece]:
    out: list[Piece] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(Piece(SegmentKind.SEPARATOR, 0, separator))
        out.append(piece)
    return out


def _original(original: np.ndarray | None) -> list[Piece]:
    return [] if original is None else [Piece(SegmentKind.ORIGINAL, 0, original)]


def _rephrases(generations: Sequence[tuple[int, np.ndarray]]) -> list[Piece]:
    return [Piece(SegmentKind.REPHRASE, k, ids) for k, ids in generations]


def _simple_layout(
    original: np.ndarray | None, generations: Sequence[tuple[int, np.ndarray]], G: int, separator_ids: dict
) -> list[Piece]:
    source, rephrases = _original(original), _rephrases(generations)
    if len(source) + len(rephrases) != 1:
        raise ValueError(f"a simple document holds one piece, got {len(source)} original + {len(rephrases)}")
    return source + rephrases


def _original_then_rephrases(
    original: np.ndarray | None, generations: Sequence[tuple[int, np.ndarray]], G: int, separator_ids: dict
) -> list[Piece]:
    return _joined(_original(original) + _rephrases(generations), separator_ids["between"])


def _rephrases_then_original(
    original: np.ndarray | None, generations: Sequence[tuple[int, np.ndarray]], G: int, separator_ids: dict
) -> list[Piece]:
    return _joined(_rephrases(generations) + _original(original), separator_ids["between"])


def _stretched(
    original: np.ndarray, rationales: Sequence[tuple[int, np.ndarray]], G: int, separator_ids: dict[str, np.ndarray]
) -> list[Piece]:
    """Chunk 0, then for each split point k: (rationale k between its separators), chunk k."""
    bounds = chunk_bounds(original.size, G + 1)
    by_split = dict(rationales)
    if len(by_split) != len(rationales) or not all(1 <= k <= G for k in by_split):
        raise ValueError(f"stretched: rationale split points must be distinct and in [1, {G}], got {sorted(by_split)}")
    pieces = [Piece(SegmentKind.ORIGINAL, 0, original[bounds[0] : bounds[1]])]
    for k in range(1, G + 1):
        if k in by_split:
            pieces += [
                Piece(SegmentKind.SEPARATOR, 0, separator_ids["rationale_open"]),
                Piece(SegmentKind.RATIONALE, k, by_split[k]),
                Piece(SegmentKind.SEPARATOR, 0, separator_ids["rationale_close"]),
            ]
        pieces.append(Piece(SegmentKind.ORIGINAL, 0, original[bounds[k] : bounds[k + 1]]))
    return pieces


# --------------------------------------------------------------------------------------------------
# The methods: everything that differs between them, one entry each
# --------------------------------------------------------------------------------------------------

# (original tokens or None, [(k, tokens)] with k ascending, G, separator ids) -> pieces before EOS
Layout = Callable[[np.ndarray | None, Sequence[tuple[int, np.ndarray]], int, dict[str, np.ndarray]], list[Piece]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One megadoc method. Adding a method is one entry of METHOD_TABLE; nothing else names methods.

    task: the generations that feed it: REPHRASE, or RATIONALE (made for G+1 chunks of the source: a
      stream at G reads the rationales made for that G, and the workers check their split points).
    layout: the document's pieces in order (Layout above); separators: the Separators fields it uses.
    with_original: the source document is part of the stream (when not, a source without generations
      leaves nothing to build and is skipped, counted as skipped_empty).
    one_per_generation: the planning rule. False: one document per source, in source order. True (simple):
      one document per generation, plus a copy of each original unless simple_originals is off, the
      whole stream shuffled with the seed.
    """

    name: str
    task: str
    layout: Layout
    separators: tuple[str, ...] = ()
    with_original: bool = True
    one_per_generation: bool = False

    @property
    def split_points(self) -> bool:
        """Its generations are rationales placed at split points of the source (chunk_bounds)."""
        return self.task == RATIONALE

    def splits(self, G: int) -> int:
        """The `splits` of the generations it reads at G: rationales are made for one G, rephrases serve any."""
        return G if self.split_points else 0

    def texts_per_document(self, G: int) -> int:
        """The most texts (original and generations) one of its documents holds."""
        return 1 if self.one_per_generation else G + 1


METHOD_TABLE: dict[str, Method] = {
    method.name: method
    for method in (
        Method(SIMPLE, REPHRASE, _simple_layout, one_per_generation=True),
        Method(BACK, REPHRASE, _original_then_rephrases, ("between",)),
        Method(FRONT, REPHRASE, _rephrases_then_original, ("between",)),
        Method(NODOC, REPHRASE, _rephrases_then_original, ("between",), with_original=False),  # no original to place
        Method(STRETCHED, RATIONALE, _stretched, ("rationale_open", "rationale_close")),
    )
}
METHODS = tuple(METHOD_TABLE)


def method_spec(method: str) -> Method:
    """The METHOD_TABLE entry of `method`; ValueError naming the known ones."""
    if method not in METHOD_TABLE:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    return METHOD_TABLE[method]


def check_method(method: str, G: int) -> None:
    method_spec(method)
    if not 1 <= G <= MAX_G:
        raise ValueError(f"G must be in [1, {MAX_G}], got {G}")


def layout_pieces(
    method: str,
    original: np.ndarray | None,
    generations: Sequence[tuple[int, np.ndarray]],
    G: int,
    separator_ids: dict[str, np.ndarray],
) -> list[Piece]:
    """The pieces of one document of `method`, before EOS.

    original: the source's tokens (None for a simple document made of one rephrase, and for nodoc).
    generations: (index k, tokens), k ascending; rephrase k for simple / stitched, rationale at split
    point k (1..G) for stretched. A missing k is simply absent (the missing policy decided to build).
    separator_ids: token ids of each separator name of Separators ('' -> empty array).
    """
    check_method(method, G)
    spec = METHOD_TABLE[method]
    if not spec.one_per_generation and spec.with_original != (original is not None):
        raise ValueError(f"{method}: original must be {'given' if spec.with_original else 'absent'}")
    return spec.layout(original, generations, G, separator_ids)


def assemble(pieces: Sequence[Piece], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n], runs int64 [R, 3] of (kind, index, length)) with EOS appended as a separator.

    Empty pieces vanish and neighbouring pieces of the same (kind, index) merge into one run, so the
    runs are maximal (e.g. a separator followed by EOS is one SEPARATOR run).
    """
    pieces = [*pieces, Piece(SegmentKind.SEPARATOR, 0, np.array([eos_id], dtype=np.int32))]
    runs: list[list[int]] = []
    for piece in pieces:
        if piece.tokens.size == 0:
            continue
        if runs and runs[-1][0] == piece.kind and runs[-1][1] == piece.index:
            runs[-1][2] += int(piece.tokens.size)
        else:
            runs.append([int(piece.kind), piece.index, int(piece.tokens.size)])
    tokens = np.concatenate([piece.tokens for piece in pieces]).astype(np.int32, copy=False)
    return tokens, np.array(runs, dtype=np.int64).reshape(-1, 3)


def segments_of(runs_Rx3: np.ndarray) -> tuple[Segment, ...]:
    return tuple(Segment(SegmentKind(int(kind)), int(index), int(length)) for kind, index, length in runs_Rx3)


def build_document(
    method: str,
    original: np.ndarray | None,
    generations: Sequence[tuple[int, np.ndarray]],
    G: int,
    separator_ids: dict[str, np.ndarray],
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """layout_pieces + assemble: (tokens int32 [n], runs int64 [R, 3])."""
    return assemble(layout_pieces(method, original, generations, G, separator_ids), eos_id)


# --------------------------------------------------------------------------------------------------
# Per-document metadata
# --------------------------------------------------------------------------------------------------


def summary_value(values: Sequence[str]) -> str | None:
    """One string for several generations' values: the distinct non-empty ones, sorted, joined by ','."""
    distinct = sorted(set(values) - {""})
    return ",".join(distinct) if distinct else None


def document_metadata(
    source_id: str,
    method: str,
    G: int,
    samples: Sequence[int],
    finish_reasons: Sequence[str],
    generators: Sequence[str],
    prompt_versions: Sequence[str],
    separators: Separators,
) -> dict[str, Any]:
    """The metadata of one output document (docs/megadocs.md, "Metadata").

    samples: 1-based sample numbers (= segment indices) of the generations it holds, in order.
    finish_reason / generator / prompt_version: summary_value of the per-generation values, so that
    e.g. `finish_reason == "stop"` means every generation stopped by itself; finish_reasons keeps each.
    """
    metadata: dict[str, Any] = {"source_id": source_id, "method": method, "G": G, "samples": list(samples)}
    for field, values in (("generator", generators), ("prompt_version", prompt_versions)):
        if summary_value(values) is not None:
            metadata[field] = summary_value(values)
    if finish_reasons:
        metadata["finish_reasons"] = list(finish_reasons)
        if summary_value(finish_reasons) is not None:
            metadata["finish_reason"] = summary_value(finish_reasons)
    used = separators.used_by(method)
    if used:
        metadata["separators"] = used
    return metadata


# --------------------------------------------------------------------------------------------------
# Planning a stream: which source documents, which generations, in which order
# --------------------------------------------------------------------------------------------------


class MissingGenerationsError(ValueError):
    """A source document has fewer than G generations and the policy is 'error'."""


@dataclasses.dataclass
class StreamPlan:
    """The output documents of one stream, in store order, as flat arrays (millions of documents fit).

    Document i is built from source document `sources[i]`, the original if `with_original[i]`, and the
    generations `numbers(i)` (1-based sample numbers / split points, ascending).
    """

    method: str
    G: int
    sources: np.ndarray  # int64 [D] source document positions
    with_original: np.ndarray  # bool [D]
    number_offsets: np.ndarray  # int64 [D + 1]: document i's numbers are number_values[off[i]:off[i+1]]
    number_values: np.ndarray  # int64 [total generations used]
    counts: dict[str, int]

    def __len__(self) -> int:
        return int(self.sources.size)

    def numbers(self, i: int) -> np.ndarray:
        return self.number_values[self.number_offsets[i] : self.number_offsets[i + 1]]


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))


def plan_stream(
    method: str,
    G: int,
    available: Sequence[np.ndarray],
    *,
    missing: str = "build",
    seed: int = 0,
    simple_originals: bool = True,
    source_ids: Sequence[str] | None = None,
) -> StreamPlan:
    """Plan the stream of `method` at `G` from the generation numbers that exist per source document.

    available[d]: the distinct 1-based numbers of source d's generations of the method's task (for
    stretched: rationales made for G+1 chunks); only numbers 1..G are used, so a stream at G=4 takes
    samples 1-4 of a G=32 run, and a missing sample is not replaced by a later one.
    missing: a source with fewer than G is built with what exists ('build'), left out of the stream
    ('skip'), or stops the build ('error', naming the source). Either way it is counted.
    Stitched and stretched documents follow the source order; simple documents (each generation, plus
    the original when simple_originals) are shuffled globally with `seed`.
    """
    check_method(method, G)
    spec = METHOD_TABLE[method]
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing policy {missing!r} is not one of {MISSING_POLICIES}")
    counts = dict.fromkeys(
        (
            "sources",
            "sources_complete",
            "sources_incomplete",
            "generations_missing",
            "generations_used",
            "skipped_incomplete",
            "skipped_empty",
        ),
        0,
    )
    kept_sources: list[int] = []
    kept_numbers: list[np.ndarray] = []
    for d, numbers in enumerate(available):
        numbers = np.asarray(numbers, dtype=np.int64)
        numbers = numbers[(numbers >= 1) & (numbers <= G)]
        counts["sources"] += 1
        shortfall = G - numbers.size
        if shortfall == 0:
            counts["sources_complete"] += 1
        else:
            counts["sources_incomplete"] += 1
            counts["generations_missing"] += shortfall
            if missing == "error":
                name = source_ids[d] if source_ids is not None else f"#{d}"
                raise MissingGenerationsError(
                    f"source document {name!r}: {numbers.size} of {G} generations for {method}; "
                    "pass --missing build (use what exists) or --missing skip (leave it out)"
                )
            if missing == "skip":
                counts["skipped_incomplete"] += 1
                continue
        if not spec.with_original and numbers.size == 0:  # nothing to build
            counts["skipped_empty"] += 1
            continue
        counts["generations_used"] += int(numbers.size)
        kept_sources.append(d)
        kept_numbers.append(np.sort(numbers))
    if spec.one_per_generation:
        return _shuffled_plan(method, G, kept_sources, kept_numbers, seed, simple_originals, counts)
    sources = np.array(kept_sources, dtype=np.int64)
    offsets = _offsets(np.array([n.size for n in kept_numbers], dtype=np.int64))
    values = np.concatenate(kept_numbers) if kept_numbers else np.zeros(0, np.int64)
    return StreamPlan(method, G, sources, np.full(sources.size, spec.with_original), offsets, values, counts)


def _shuffled_plan(
    method: str,
    G: int,
    kept_sources: list[int],
    kept_numbers: list[np.ndarray],
    seed: int,
    originals: bool,
    counts: dict,
) -> StreamPlan:
    """One document per generation (number k) and per original (number 0), in a seeded global permutation."""
    per_source = [np.concatenate(([0], n)) if originals else n for n in kept_numbers]
    sizes = np.array([n.size for n in per_source], dtype=np.int64)
    sources_U = np.repeat(np.array(kept_sources, dtype=np.int64), sizes)
    numbers_U = np.concatenate(per_source).astype(np.int64) if per_source else np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(sources_U.size)
    sources_U, numbers_U = sources_U[order], numbers_U[order]
    is_original = numbers_U == 0
    offsets = _offsets((~is_original).astype(np.int64))
    return StreamPlan(method, G, sources_U, is_original, offsets, numbers_U[~is_original], counts)
