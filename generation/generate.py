"""`python -m generation generate`: one worker of a generation job (rephrases or rationales).

    inputs (JSONL/Parquet) -> this worker's shard (hash of the document id mod N)
      -> prompts rendered with the generator's chat template, over-long ones cut or skipped (never sent)
      -> backend.generate (vllm | transformers | any registered backend)
      -> per-sample flags (truncated, empty, duplicate, copies_source, aborted) and the keep/drop policy
      -> chunks committed atomically: parts/part-NNNNNN.jsonl, then one ledger line (the commit point)

Output of worker i of N, in OUT/worker-0000i-of-0000N/ (docs/generation.md has every field):
    provenance.json   what made the output (model, backend, template, sampling, seed, inputs); a restart
                      refuses to continue a job whose identity differs, and appends its session
    parts/            one JSONL file per committed chunk, one line per document with all its G samples
    ledger.jsonl      one line per committed chunk: part name, sha256, (document, samples) keys, counts
    summary.json      written when the shard is done: counts, tokens, device-hours per billion tokens

Crash safety: a part is written to a temporary name, fsynced and renamed; then its ledger line is
appended and fsynced. On restart, temporary files and parts without a ledger line are deleted and a torn
last ledger line is cut off; generation resumes after the last committed chunk. Chunks are cut at fixed
document counts in input order and seeds are per (document, sample), so a resumed worker produces the
same chunks, prompts and seeds as an uninterrupted one, and never regenerates a committed sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import platform
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from generation import documents
from generation import prompts as P
from generation.backends import (
    FINISH_LENGTH,
    FINISH_STOP,
    Backend,
    Sampling,
    check_output_shape,
    create_backend,
    ensemble_identity,
    file_sha256,
    model_dirs,
)
from generation.merge import FORMAT_VERSION, SUMMARY, WorkerOutput, read_json, shard_of, worker_dir

FLAGS = ("truncated", "empty", "duplicate", "copies_source", "aborted")
DEFAULT_FLAG_POLICY = dict(truncated="keep", empty="drop", duplicate="drop", copies_source="drop", aborted="drop")
OVERLONG = ("skip", "cut")
DEFAULT_MAX_NEW_TOKENS = {"rephrase": 1024, "rationale": 512}
SKIP_REASONS = ("overlong", "too_short")  # too_short: fewer tokens than the G+1 rationale chunks
EXAMPLES = 5


class GenerationError(RuntimeError):
    """A job that cannot start or continue; the message names the directory, file or setting."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a job's output (the identity a restart must match), apart from the model."""

    task: str = "rephrase"
    template: str = ""  # "": the task's default (prompts.DEFAULT_TEMPLATE)
    samples: int = 4  # G: samples per document (rephrase) or split points per document (rationale)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 0  # 0: the task's default, 1024 (rephrase) or 512 (rationale)
    seed: int = 0
    overlong: str = "skip"  # prompt + max_new_tokens over the context: skip the document, or cut it to fit
    flag_policy: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FLAG_POLICY))
    chunk_documents: int = 64  # documents per committed part: work lost to a kill is at most one chunk
    num_workers: int = 1
    worker_index: int = 0
    text_field: str = "text"
    id_field: str = "id"
    on_error: dict[str, str] = dataclasses.field(default_factory=lambda: dict(documents.DEFAULT_POLICY))

    def resolved(self) -> GenerationSettings:
        """Defaults filled in and every field checked; errors name the command-line flag."""
        if self.task not in P.TASKS:
            raise GenerationError(f"--task {self.task!r}: expected one of {P.TASKS}")
        template = self.template or P.DEFAULT_TEMPLATE[self.task]
        P.get_template(template, self.task)
        checks = {
            "--samples": (self.samples, self.samples >= 1),
            "--chunk-documents": (self.chunk_documents, self.chunk_documents >= 1),
            "--num-workers": (self.num_workers, self.num_workers >= 1),
            "--worker-index": (self.worker_index, 0 <= self.worker_index < self.num_workers),
            "--overlong": (self.overlong, self.overlong in OVERLONG),
            "--flag-policy": (
                self.flag_policy,
                set(self.flag_policy) == set(FLAGS) and set(self.flag_policy.values()) <= {"keep", "drop"},
            ),
        }
        for flag, (value, ok) in checks.items():
            if not ok:
                raise GenerationError(f"{flag}: invalid value {value!r} (num_workers={self.num_workers})")
        max_new = self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]
        self.sampling_for(max_new)  # Sampling checks temperature, top_p, top_k
        return dataclasses.replace(self, template=template, max_new_tokens=max_new)

    def sampling_for(self, max_new_tokens: int) -> Sampling:
        try:
            return Sampling(self.temperature, self.top_p, self.top_k, max_new_tokens)
        except ValueError as e:
            raise GenerationError(str(e)) from None


def parse_flag_policy(spec: str | None) -> dict[str, str]:
    """DEFAULT_FLAG_POLICY updated by 'flag=keep|drop,...'; 'all=keep' sets every flag."""
    policy = dict(DEFAULT_FLAG_POLICY)
    for part in filter(None, (spec or "").split(",")):
        flag, _, action = (s.strip() for s in part.partition("="))
        if action not in ("keep", "drop") or flag not in FLAGS + ("all",):
            raise GenerationError(f"--flag-policy {part!r}: expected FLAG=keep|drop with FLAG in {FLAGS} or all")
        policy.update(dict.fromkeys(FLAGS, action) if flag == "all" else {flag: action})
    return policy


# --------------------------------------------------------------------------------------------------
# Inputs: this worker's shard, in input order, cut into chunks
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InputPlan:
    files: list[Path]
    owned: set[int]  # input positions (over all records of all files) of this worker's documents
    bad: dict[int, tuple[str, str, str]]  # position -> (reason, where, detail) of bad records it reports
    total: int  # this worker's documents, for the progress bar


def plan_inputs(files: list[Path], s: GenerationSettings) -> InputPlan:
    """First pass over all records: ids, the bad-input policy (stops here on 'error'), this shard."""
    seen: set[str] = set()
    owned: set[int] = set()
    bad: dict[int, tuple[str, str, str]] = {}
    stopper = documents.BadInputReport(s.on_error)  # raises InputError for reasons set to 'error'
    for position, record in enumerate(documents.read_records(files, s.text_field, s.id_field)):
        parsed = documents.parse_record(record.payload, s.text_field, s.id_field)
        reason, detail = parsed.reason, parsed.detail
        if reason is None and parsed.doc_id in seen:
            reason, detail = "duplicate_id", f"id {parsed.doc_id!r} seen before"
        if reason is None:
            seen.add(parsed.doc_id)
            if shard_of(parsed.doc_id, s.num_workers) == s.worker_index:
                owned.add(position)
            continue
        where = documents.location(files, record.file_index, record.position)
        if s.on_error[reason] == "error":
            stopper.reject(reason, where, detail)
        # A bad record is counted by one worker only: by its id's shard if it has one, else by position.
        owner = shard_of(parsed.doc_id, s.num_workers) if reason == "duplicate_id" else position % s.num_workers
        if owner == s.worker_index:
            bad[position] = (reason, where, detail)
    return InputPlan(files, owned, bad, len(owned))


@dataclasses.dataclass(frozen=True)
class InputDocument:
    position: int  # over all input records: the merge orders documents by it
    doc_id: str
    text: str


def shard_events(plan: InputPlan, s: GenerationSettings, after: int) -> Iterator[tuple[int, InputDocument | None]]:
    """(position, document) for this worker's documents and (position, None) for its bad records."""
    for position, record in enumerate(documents.read_records(plan.files, s.text_field, s.id_field)):
        if position <= after:
            continue
        if position in plan.owned:
            parsed = documents.parse_record(record.payload, s.text_field, s.id_field)
            yield position, InputDocument(position, parsed.doc_id, parsed.text)
        elif position in plan.bad:
            yield position, None


def chunked(events: Iterator[tuple[int, InputDocument | None]], size: int) -> Iterator[tuple[list, int]]:
    """(events, last position) per chunk of `size` documents; the last chunk may be smaller."""
    chunk: list[tuple[int, InputDocument | None]] = []
    documents_in_chunk = 0
    for event in events:
        chunk.append(event)
        documents_in_chunk += event[1] is not None
        if documents_in_chunk == size:
            yield chunk, event[0]
            chunk, documents_in_chunk = [], 0
    if chunk:
        yield chunk, chunk[-1][0]


# --------------------------------------------------------------------------------------------------
# One chunk: requests, generation, flags, counts
# --------------------------------------------------------------------------------------------------


def flag_samples(texts: Sequence[str], finish_reasons: Sequence[str], source: str) -> list[list[str]]:
    """Flags of each sample of one document; a duplicate is a repeat of an earlier sample's text."""
    seen: set[str] = set()
    source_body = source.strip()
    all_flags = []
    for text, reason in zip(texts, finish_reasons):
        flags = ["truncated"] if reason == FINISH_LENGTH else [] if reason == FINISH_STOP else ["aborted"]
        body = text.strip()
        if not body:
            flags.append("empty")
        else:
            flags += ["duplicate"] if body in seen else []
            flags += ["copies_source"] if body == source_body else []
            seen.add(body)
        all_flags.append(flags)
    return all_flags


def new_stats() -> dict[str, Any]:
    return {
        "documents": 0,
        "samples": 0,
        "kept": 0,
        "dropped": 0,
        "flags": dict.fromkeys(FLAGS, 0),
        "skipped": dict.fromkeys(SKIP_REASONS, 0),
        "skipped_examples": {},
        "cut": 0,
        "prompt_tokens": 0,
        "output_tokens": 0,
    }


def run_chunk(events: list, builder: P.RequestBuilder, backend: Backend, s: GenerationSettings, plan: InputPlan):
    """(document records, stats) of one chunk; over-long and too-short documents are never sent."""
    stats, bad = new_stats(), documents.BadInputReport(s.on_error)
    prepared: list[tuple[InputDocument, P.DocumentRequests]] = []
    for position, doc in events:
        if doc is None:
            bad.reject(*plan.bad[position])
            continue
        built = builder.build(doc.doc_id, doc.text)
        if isinstance(built, str):
            stats["skipped"][built] += 1
            examples = stats["skipped_examples"].setdefault(built, [])
            examples += [doc.doc_id] if len(examples) < EXAMPLES else []
        else:
            prepared.append((doc, built))
            stats["cut"] += len(built.text) < len(doc.text)
    stats["bad_input"] = bad.to_dict()
    requests = [r for _, built in prepared for r in built.requests]
    outputs = backend.generate(requests, s.sampling_for(s.max_new_tokens)) if requests else []
    check_output_shape(requests, outputs, backend.name)  # before any output is split between documents
    records, cursor = [], 0
    for doc, built in prepared:
        completions = [c for per_request in outputs[cursor : cursor + len(built.requests)] for c in per_request]
        cursor += len(built.requests)
        records.append(document_record(doc, built, completions, builder.tokenizer, s, stats))
    return records, stats


def document_record(
    doc: InputDocument, built: P.DocumentRequests, completions: list, tokenizer: Any, s: GenerationSettings, stats: dict
) -> dict:
    """One output line: the document's G samples with text, finish reason, token counts, flags, kept."""
    texts = tokenizer.batch_decode([list(c.token_ids) for c in completions], skip_special_tokens=True)
    flags = flag_samples(texts, [c.finish_reason for c in completions], built.text)
    seed = P.document_seed(s.seed, doc.doc_id)
    samples = []
    for k, (completion, text, sample_flags) in enumerate(zip(completions, texts, flags)):
        request = built.requests[0 if s.task == "rephrase" else k]
        kept = all(s.flag_policy[f] == "keep" for f in sample_flags)
        sample = {
            "sample": k,
            "seed": seed + k,
            "text": text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": len(request.prompt_token_ids),
            "output_tokens": len(completion.token_ids),
            "flags": sample_flags,
            "kept": kept,
        }
        if built.splits is not None:
            sample["split_token"], sample["split_char"] = built.splits[k]
        samples.append(sample)
        stats["kept" if kept else "dropped"] += 1
        stats["output_tokens"] += len(completion.token_ids)
        for flag in sample_flags:
            stats["flags"][flag] += 1
    stats["documents"] += 1
    stats["samples"] += len(samples)
    stats["prompt_tokens"] += sum(len(r.prompt_token_ids) for r in built.requests)
    return {
        "doc_id": doc.doc_id,
        "position": doc.position,
        "task": s.task,
        "source_chars": len(doc.text),
        "used_chars": len(built.text),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def job_identity(s: GenerationSettings, files: list[Path], dirs: list[Path], tokenizer: Any, backend: str) -> dict:
    """What decides the output; a restart and the merge compare it (worker_index apart). dirs: the model
    directory, or an ensemble's (the tokenizer is the first one's)."""
    model_dir = dirs[0]
    tokenizer_files = sorted(p for p in model_dir.glob("*token*") if p.is_file())
    settings = dataclasses.asdict(s)
    settings.pop("worker_index")
    return {
        "format": FORMAT_VERSION,
        "worker_index": s.worker_index,
        "settings": settings,
        "template": P.get_template(s.template, s.task).provenance(),
        "model": ensemble_identity(dirs),
        "tokenizer": {
            "files_sha256": {p.name: file_sha256(p) for p in tokenizer_files},
            "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
        },
        "backend": backend,
        "inputs": [{"name": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files],
    }


def session_info(backend: Backend, options: dict | None, dirs: list[Path], devices: dict) -> dict:
    """One run of the worker (a job resumed after a kill has several); not part of the identity."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "model_path": str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs],
        "backend_version": backend.version(),
        "backend_options": options or {},
        "devices": devices,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run(
    settings: GenerationSettings,
    inputs: Sequence[str | Path],
    model: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    backend: str | Backend = "transformers",
    backend_options: dict | None = None,
    chat_template: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or resume) one worker to the end of its shard; returns its summary. `model`: a directory, or
    several (an ensemble whose averaged logits are sampled; backends with supports_ensembles)."""
    started = time.monotonic()
    s = settings.resolved()
    files = documents.expand_inputs(inputs)
    dirs = model_dirs(model)
    model_dir = dirs[0]
    tokenizer = P.generator_tokenizer(model_dir, chat_template=chat_template, trust_remote_code=trust_remote_code)
    plan = plan_inputs(files, s)  # bad input stops the job here, before a model is loaded
    identity = job_identity(s, files, dirs, tokenizer, backend if isinstance(backend, str) else backend.name)
    out = WorkerOutput(worker_dir(output, s.worker_index, s.num_workers), identity)
    owned_backend = isinstance(backend, str)  # created here, so closed here
    try:
        if out.finished:
            return read_json(out.dir / SUMMARY)
        if isinstance(backend, str):
            backend = create_backend(backend, dirs, backend_options, trust_remote_code=trust_remote_code)
        devices = dataclasses.asdict(backend.devices())
        out.add_session(session_info(backend, backend_options, dirs, devices))
        builder = P.RequestBuilder(
            tokenizer,
            P.get_template(s.template, s.task),
            s.samples,
            s.seed,
            context_length=backend.context_length,
            max_new_tokens=s.max_new_tokens,
            cut=s.overlong == "cut",
        )
        consumed = lambda stats: stats["documents"] + sum(stats["skipped"].values())  # noqa: E731
        bar = tqdm(
            total=plan.total,
            initial=sum(consumed(e["stats"]) for e in out.entries),
            unit="doc",
            desc=f"worker {s.worker_index}/{s.num_workers}",
            disable=not progress,
            smoothing=0.1,
        )
        # Ledger wall time includes loading (it is part of the cost); the displayed rate does not.
        last_commit, generating_since, session_tokens = started, time.monotonic(), 0
        for events, last_position in chunked(shard_events(plan, s, after=out.last_position), s.chunk_documents):
            records, stats = run_chunk(events, builder, backend, s, plan)
            now = time.monotonic()
            out.commit(records, stats, last_position, now - last_commit, devices)
            last_commit, session_tokens = now, session_tokens + stats["output_tokens"]
            bar.set_postfix_str(f"{session_tokens / (now - generating_since):,.0f} output tok/s", refresh=False)
            bar.update(consumed(stats))
        bar.close()
        summary = out.finish()
    finally:
        out.close()
        if owned_backend and not isinstance(backend, str):
            backend.close()
    if progress:
        print(format_summary(summary, out.dir))
    return summary


def format_summary(summary: dict, directory: Path) -> str:
    flags = ", ".join(f"{k} {v}" for k, v in summary.get("flags", {}).items())
    skipped = ", ".join(f"{k} {v}" for k, v in summary.get("skipped", {}).items())
    lines = [
        f"{directory}: {summary.get('documents', 0)} documents, {summary.get('samples', 0)} samples "
        f"({summary.get('kept', 0)} kept, {summary.get('dropped', 0)} dropped)",
        f"  flags: {flags}",
        f"  documents not sent: {skipped}; cut to fit: {summary.get('cut', 0)}; bad input skipped: "
        f"{summary.get('bad_input', {}).get('skipped_total', 0)}",
        f"  tokens: {summary.get('prompt_tokens', 0):,} prompt, {summary.get('output_tokens', 0):,} output "
        f"in {summary['wall_seconds']:.1f} s of committed work",
    ]
    cost = summary["cost"].items()
    lines += [f"  {name.replace('_', ' ')}: {value:.4g}" for name, value in cost if value is not None]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate rephrases or rationales (one worker of a job)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL or Parquet files (globs allowed)")
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="local directory of the generator (no hub access); repeat it for an ensemble whose "
        "averaged logits are sampled (--backend jax)",
    )
    p.add_argument("--output", required=True, help="job directory; this worker writes OUTPUT/worker-I-of-N")
    p.add_argument("--backend", default="transformers", help="vllm | transformers | module:Class")
    p.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable, e.g. max_num_seqs=256, tensor_parallel_size=2 (vllm); batch_size=8",
    )
    p.add_argument("--task", default="rephrase", choices=P.TASKS)
    p.add_argument("--template", default="", help=f"one of {', '.join(P.TEMPLATES)}; default per task")
    p.add_argument("--samples", "-G", type=int, default=GenerationSettings.samples)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: 1024 (rephrase) or 512 (rationale)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlong", choices=OVERLONG, default="skip", help="documents whose prompt does not fit")
    p.add_argument("--flag-policy", default="", help=f"FLAG=keep|drop,... over {', '.join(FLAGS)}")
    p.add_argument("--chunk-documents", type=int, default=GenerationSettings.chunk_documents)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--worker-index", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--on-error", default="", help="bad input policy, e.g. malformed=skip (see docs/export.md)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file, if the tokenizer has none")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped in the model directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=main)
    return p


def parse_backend_options(items: Sequence[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GenerationError(f"--backend-option {item!r} is not of the form KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options


def main(args: argparse.Namespace) -> int:
    settings = GenerationSettings(
        task=args.task,
        template=args.template,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overlong=args.overlong,
        flag_policy=parse_flag_policy(args.flag_policy),
        chunk_documents=args.chunk_documents,
        num_workers=args.num_workers,
        worker_index=args.worker_index,
        text_field=args.text_field,
        id_field=args.id_field,
        on_error=documents.parse_policy(args.on_error),
    )
    run(
        settings,
        args.input,
        args.model,
        args.output,
        backend=args.backend,
        backend_options=parse_backend_options(args.backend_option),
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    return 0
