"""Building the demo data: `python -m generation demo-data [--out DIR]` (`make demo` runs it).

Everything configs/demo.yaml names, into DIR (default $MEGADOC_DEMO_DIR, else ~/.cache/megadoc_jax/demo),
in the layout megadoc_jax/data/demo.py resolves `demo:NAME` paths to:

    DIR/train.jsonl, heldout.jsonl, tokenizer/   the embedded corpus (megadoc_jax.data.demo) and its BPE
    DIR/train, DIR/heldout                         token stores, written by generation/export.py
    DIR/demo.json                                  document and token counts, content hashes (written last)
    DIR/synthetic/                                 the synthetic stream (below), synthetic.json written last

Each of DIR and DIR/synthetic is built into a temporary directory next to it and renamed into place, so
an interrupted build leaves nothing half-made; a built one is not built again (idempotent).

The synthetic stream runs the same path as a real job, on CPU, with no torch:

    tiny Decoder, random init (seed 0), saved as a run directory      -> generator   (hf.prepare_run_dir)
    generate: rephrase (WRAP wikipedia template), G=2, 48 new tokens   -> generations (worker output)
    merge                                                              -> merged
    megadocs: stitched-back, G=2 (original, sep, rephrase 1, sep, 2)   -> megadocs/stitched-back-G2

A randomly initialised model cannot rephrase: its "rephrases" are random tokens. The demo shows the
machinery (generation, ledger, merge, megadoc layout with segments, mixture in training), not the effect
of synthetic data on the loss.

Every train document is rephrased; prompts longer than the generator's context are cut to fit
(`overlong="cut"`, counted in the generation summary), while the megadoc keeps the whole original.
One prompt width and one batch size, so the sampler compiles once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megadoc_jax.data import demo as demo_lib

GENERATOR_SEED = 0
GENERATION_SEED = 0
SAMPLES = 2  # G
MAX_NEW_TOKENS = 48
CONTEXT_LENGTH = 512  # the generator's data.seq_len: prompt (cut to fit) + MAX_NEW_TOKENS
BATCH_ROWS = 32  # (document, sample) rows per compiled sampler call
METHOD = "stitched-back"
# A plain chat template: the demo tokenizer has none, and rendering prompts needs one.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}<assistant>\n"

log = logging.getLogger(__name__)


class DemoDataError(RuntimeError):
    """The demo directory exists but is not a complete demo build."""


# --------------------------------------------------------------------------------------------------
# Building into place
# --------------------------------------------------------------------------------------------------


def _build_into_place(target: Path, build: Callable[[Path], None], marker: str) -> None:
    """Run build(tmp) into a temporary directory next to target, then rename it to target, unless target
    exists already. A failed build leaves nothing at target; a concurrent builder's rename may win."""
    if not target.exists():
        log.info("building %s", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            build(tmp / target.name)
            try:
                os.rename(tmp / target.name, target)
            except OSError:
                if not (target / marker).exists():  # not a concurrent builder that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / marker).exists():
        raise DemoDataError(
            f"{target} exists but has no {marker}: it is not a complete demo build; remove it to rebuild"
        )


def ensure_demo_stores(root: str | Path, workers: int = 0) -> dict[str, Path]:
    """The real data under root (demo_paths: tokenizer, JSONL splits, both stores), built if root does not exist."""
    root = Path(root)
    _build_into_place(root, functools.partial(build_demo_data, workers=workers), demo_lib.COMPLETE_MARKER)
    return demo_lib.demo_paths(root)


def ensure_demo_data(root: str | Path | None = None, workers: int = 0) -> dict[str, Path]:
    """Everything the demo config names under root (default demo_root(): $MEGADOC_DEMO_DIR): the real data
    of ensure_demo_stores plus the synthetic stream under root/synthetic, each built if it is not yet."""
    root = demo_lib.demo_root() if root is None else Path(root)
    paths = ensure_demo_stores(root, workers=workers)

    def build(out_dir: Path) -> None:
        summary = build_synthetic(paths["train_jsonl"], paths["tokenizer"], out_dir)
        (out_dir / demo_lib.SYNTHETIC_MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")

    synthetic_dir = root / demo_lib.SYNTHETIC_DIR
    _build_into_place(synthetic_dir, build, demo_lib.SYNTHETIC_MARKER)
    return {**paths, **demo_lib.synthetic_paths(synthetic_dir)}


# --------------------------------------------------------------------------------------------------
# The real data: corpus, tokenizer, stores
# --------------------------------------------------------------------------------------------------


def build_demo_data(out_dir: str | Path, workers: int = 0) -> dict[str, Path]:
    """Write tokenizer, JSONL splits and both stores into out_dir (which must not exist yet)."""
    from generation.export import export

    paths = demo_lib.demo_paths(out_dir)
    Path(out_dir).mkdir(parents=True)
    train, heldout = demo_lib.split_heldout(demo_lib.demo_documents())
    demo_lib.write_jsonl(train, paths["train_jsonl"])
    demo_lib.write_jsonl(heldout, paths["heldout_jsonl"])
    demo_lib.train_tokenizer((d["text"] for d in train), paths["tokenizer"])
    summary: dict[str, object] = {"format": demo_lib.DEMO_FORMAT, "heldout_percent": demo_lib.HELDOUT_PERCENT}
    for split in ("train", "heldout"):
        report = export([paths[f"{split}_jsonl"]], paths["tokenizer"], paths[split], workers=workers, progress=False)
        summary[split] = {key: report[key] for key in ("documents", "tokens", "content_hash")}
    (Path(out_dir) / demo_lib.COMPLETE_MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------
# The synthetic stream
# --------------------------------------------------------------------------------------------------


def write_random_generator(run_dir: Path, tokenizer_dir: Path) -> Path:
    """A megadoc_jax run directory holding a randomly initialised tiny Decoder (step 0), made a generator
    directory (config.json, tokenizer, chat template) for the jax backend."""
    import jax
    from flax import nnx

    from megadoc_jax import checkpoint, optim, sharding
    from megadoc_jax import config as config_lib
    from megadoc_jax import model as model_lib
    from megadoc_jax import step as step_lib
    from megadoc_jax.data.store import TokenizerInfo
    from megadoc_jax.hf import prepare_run_dir

    vocab_size = TokenizerInfo.from_directory(tokenizer_dir).vocab_size
    config = config_lib.load(
        None,
        [
            "model.size=tiny",
            f"model.vocab_size={vocab_size}",
            "model.compute_dtype=float32",
            f"data.tokenizer={tokenizer_dir}",
            f"data.seq_len={CONTEXT_LENGTH}",
            f"train.run_dir={run_dir}",
        ],
    )
    run_dir.mkdir(parents=True)
    config_lib.dump(config, run_dir / "config.yaml")
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = model_lib.create_sharded_model(config.model, mesh, seed=GENERATOR_SEED)
    params = nnx.to_pure_dict(nnx.state(model))
    tx, _ = optim.make_optimizer(config.optim, total_steps=1)
    with checkpoint.Checkpointer(run_dir / "checkpoints", config.train) as saver:  # waits for the save on exit
        saver.save(0, step_lib.init_state(params, tx))
    prepare_run_dir(run_dir, tokenizer_dir)
    (run_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return run_dir


def build_synthetic(train_jsonl: Path, tokenizer_dir: Path, out_dir: str | Path) -> dict[str, Any]:
    """Generator, generations, merge and the stitched store under out_dir; returns a summary of each stage."""
    from generation import generate, merge
    from generation.megadoc_export import StreamOptions, build_megadocs, stream_name

    paths = demo_lib.synthetic_paths(out_dir)
    if paths["stitched"].name != stream_name(METHOD, SAMPLES):  # the layout megadoc_jax resolves `demo:stitched` to
        raise DemoDataError(f"{paths['stitched']}: not the stream {stream_name(METHOD, SAMPLES)} built here")
    generator = write_random_generator(paths["generator"], Path(tokenizer_dir))
    settings = generate.GenerationSettings(
        task="rephrase",
        samples=SAMPLES,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=GENERATION_SEED,
        overlong="cut",
        chunk_documents=BATCH_ROWS,
    )
    backend_options = {"batch_size": BATCH_ROWS, "devices": 1, "prompt_bucket": CONTEXT_LENGTH - MAX_NEW_TOKENS}
    generated = generate.run(
        settings,
        [train_jsonl],
        generator,
        paths["generations"],
        backend="jax",
        backend_options=backend_options,
        chat_template=generator / "chat_template.jinja",
        progress=False,
    )
    merged = merge.merge(paths["generations"], paths["merged"])
    (report,) = build_megadocs(
        [train_jsonl],
        [paths["merged"]],
        tokenizer_dir,
        paths["stitched"].parent,
        [(METHOD, SAMPLES)],
        StreamOptions(progress=False),
        workers=0,
    )
    return {
        "generator": {"model": "tiny (random init)", "seed": GENERATOR_SEED, "context_length": CONTEXT_LENGTH},
        "generation": {
            key: generated[key] for key in ("documents", "samples", "kept", "dropped", "cut", "flags", "output_tokens")
        },
        "merged": {key: merged[key] for key in ("documents", "kept_samples", "dropped_samples", "sha256")},
        "stitched": {key: report[key] for key in ("documents", "tokens", "tokens_by_kind", "content_hash")},
    }
