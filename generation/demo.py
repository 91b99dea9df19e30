"""The demo's synthetic stream: a tiny random generator, rephrases with the jax backend, stitched megadocs.

Called by megadoc_jax.data.demo.ensure_demo_megadocs on first use, into a directory that is renamed into
place only when complete. It runs the same path as a real job, on CPU, with no torch:

    tiny Decoder, random init (seed 0), saved as a run directory      -> OUT/generator   (hf.prepare_run_dir)
    generate: rephrase (WRAP wikipedia template), G=2, 48 new tokens   -> OUT/generations (worker output)
    merge                                                              -> OUT/merged
    megadocs: stitched-back, G=2 (original, sep, rephrase 1, sep, 2)   -> OUT/megadocs/stitched-back-G2

A randomly initialised model cannot rephrase: its "rephrases" are random tokens. The demo shows the
machinery (generation, ledger, merge, megadoc layout with segments, mixture in training), not the effect
of synthetic data on the loss.

Every train document is rephrased; prompts longer than the generator's context are cut to fit
(`overlong="cut"`, counted in the generation summary), while the megadoc keeps the whole original.
One prompt width and one batch size, so the sampler compiles once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GENERATOR_SEED = 0
GENERATION_SEED = 0
SAMPLES = 2  # G
MAX_NEW_TOKENS = 48
CONTEXT_LENGTH = 512  # the generator's data.seq_len: prompt (cut to fit) + MAX_NEW_TOKENS
BATCH_ROWS = 32  # (document, sample) rows per compiled sampler call
METHOD = "stitched-back"
# A plain chat template: the demo tokenizer has none, and rendering prompts needs one.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}<assistant>\n"


def synthetic_paths(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "generator": out_dir / "generator",
        "generations": out_dir / "generations",
        "merged": out_dir / "merged",
        "stitched": out_dir / "megadocs" / f"{METHOD}-G{SAMPLES}",
    }


def write_random_generator(run_dir: Path, tokenizer_dir: Path) -> Path:
    """A megadoc_jax run directory holding a randomly initialised tiny Decoder (step 0), made a generator
    directory (config.json, tokenizer, chat template) for the jax backend."""
    import jax
    from flax import nnx

    from megadoc_jax import checkpoint, optim, sharding
    from megadoc_jax import config as config_lib
    from megadoc_jax import step as step_lib
    from megadoc_jax.data.store import TokenizerInfo
    from megadoc_jax.hf import prepare_run_dir

    vocab_size = TokenizerInfo.from_directory(tokenizer_dir).vocab_size
    config = config_lib.load(None, [
        "model.size=tiny", f"model.vocab_size={vocab_size}", "model.compute_dtype=float32",
        f"data.tokenizer={tokenizer_dir}", f"data.seq_len={CONTEXT_LENGTH}", f"train.run_dir={run_dir}",
    ])  # fmt: skip
    run_dir.mkdir(parents=True)
    config_lib.dump(config, run_dir / "config.yaml")
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = sharding.create_sharded_model(config.model, mesh, seed=GENERATOR_SEED)
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
    from generation.megadoc_export import StreamOptions, build_megadocs

    paths = synthetic_paths(out_dir)
    generator = write_random_generator(paths["generator"], Path(tokenizer_dir))
    settings = generate.GenerationSettings(
        task="rephrase", samples=SAMPLES, max_new_tokens=MAX_NEW_TOKENS, seed=GENERATION_SEED, overlong="cut",
        chunk_documents=BATCH_ROWS,
    )  # fmt: skip
    backend_options = {"batch_size": BATCH_ROWS, "devices": 1, "prompt_bucket": CONTEXT_LENGTH - MAX_NEW_TOKENS}
    generated = generate.run(settings, [train_jsonl], generator, paths["generations"], backend="jax",
                             backend_options=backend_options, chat_template=generator / "chat_template.jinja",
                             progress=False)  # fmt: skip
    merged = merge.merge(paths["generations"], paths["merged"])
    (report,) = build_megadocs([train_jsonl], [paths["merged"]], tokenizer_dir, paths["stitched"].parent,
                               [(METHOD, SAMPLES)], StreamOptions(progress=False), workers=0)  # fmt: skip
    return {
        "generator": {"model": "tiny (random init)", "seed": GENERATOR_SEED, "context_length": CONTEXT_LENGTH},
        "generation": {key: generated[key] for key in ("documents", "samples", "kept", "dropped", "cut",
                                                       "flags", "output_tokens")},
        "merged": {key: merged[key] for key in ("documents", "kept_samples", "dropped_samples", "sha256")},
        "stitched": {key: report[key] for key in ("documents", "tokens", "tokens_by_kind", "content_hash")},
    }  # fmt: skip
