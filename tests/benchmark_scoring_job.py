"""The lm-eval fixture scored by our JAX model on a mesh: in-process, or as one process of a jax.distributed job.

    python tests/benchmark_scoring_job.py OUT_DIR data=4,tensor=2     # with MEGADOC_COORDINATOR etc. set

writes OUT_DIR/process-<i>.json: `fixture_figures` of this process (every process gets all figures).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
MODEL_DIR = DATA / "lm_eval_model"
BENCHMARKS = DATA / "benchmarks"
FIXTURE = json.loads((DATA / "lm_eval_fixture.json").read_text(encoding="utf-8"))


def fixture_requests() -> list[tuple[list[int], list[int]]]:
    """Every distinct (context ids, continuation ids) lm-eval scored for the fixture, in fixture order."""
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], None] = {}
    for record in [*FIXTURE["zero_shot"].values(), *FIXTURE["few_shot"]["tasks"].values()]:
        for item in record["items"]:
            for r in item["requests"]:
                seen.setdefault((tuple(r["context_ids"]), tuple(r["continuation_ids"])), None)
    return [(list(c), list(k)) for c, k in seen]


def fixture_figures(mesh) -> dict:
    """{'requests': [[loglikelihood, is_greedy], ...] (fixture_requests order), 'zero_shot': run_benchmarks on
    every fixture task, 'few_shot': run_benchmarks 2-shot on the few-shot tasks}, from our decoder on `mesh`."""
    from megadoc_jax import hf
    from megadoc_jax.evaluation import benchmark_scoring as bs

    model, _, max_length = hf.import_llama(MODEL_DIR, mesh, compute_dtype="float32")
    assert max_length == FIXTURE["max_length"]
    scorer = bs.decoder_batch_scorer(model, mesh)
    tokenizer = hf.load_tokenizer(MODEL_DIR)
    few = FIXTURE["few_shot"]
    loglikelihoods = bs.BatchedLoglikelihoods(scorer, mesh, max_length=max_length)
    return {
        "requests": [list(x) for x in loglikelihoods(fixture_requests())],
        "zero_shot": bs.run_benchmarks(
            scorer, tokenizer, BENCHMARKS, list(FIXTURE["splits"]), max_length=max_length, mesh=mesh
        ),
        "few_shot": bs.run_benchmarks(
            scorer,
            tokenizer,
            BENCHMARKS,
            list(few["tasks"]),
            max_length=max_length,
            mesh=mesh,
            num_fewshot=few["num_fewshot"],
            seed=few["seed"],
        ),
    }


def main(out_dir: str, mesh_sizes: str) -> None:
    from megadoc_jax import distributed

    distributed.initialize_from_environment()
    import jax

    from megadoc_jax import sharding

    sizes = {axis: int(n) for axis, n in (part.split("=") for part in mesh_sizes.split(","))}
    figures = fixture_figures(sharding.make_mesh(sizes))
    figures["process"] = {"index": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count()}
    path = Path(out_dir) / f"process-{jax.process_index()}.json"
    path.write_text(json.dumps(figures), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's megadoc_jax, as `-m` would
    main(*sys.argv[1:])
