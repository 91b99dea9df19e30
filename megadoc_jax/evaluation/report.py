"""What an evaluation writes: the JSON record, the scalars for a run's metrics, the console summary.

Metric names: the concat recipe (the paper's) gives `eval/<store>/loss` and `eval/<store>/bpb`, the names
of the paper's stack; the document recipe `eval/<store>/document/loss` and `.../bpb`; loss by position
`<prefix>/position_<from>_<to>/loss` (`_inf` for the last bucket) and by segment
`<prefix>/segment/<label>/loss` (label original, rephrase_k, rationale_k, separator).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import platform
import time
from typing import Any

import flax
import jax

import megadoc_jax
from megadoc_jax import metrics, storage
from megadoc_jax.evaluation.loss_windows import metric_prefix

log = logging.getLogger(__name__)

FORMAT = "megadoc-evaluation"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    try:
        ours = importlib.metadata.version("megadoc-jax")
    except importlib.metadata.PackageNotFoundError:
        ours = megadoc_jax.__version__
    return {"megadoc_jax": ours, "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()}


def metric_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The scalars of one (store, recipe) result, by metric name (module docstring)."""
    prefix = metric_prefix(result["store"], result["recipe"])
    scalars = {f"{prefix}/loss": result["loss"]}
    if result["bpb"] is not None:
        scalars[f"{prefix}/bpb"] = result["bpb"]
    for bucket in result["by_position"]:
        end = "inf" if bucket["to"] is None else bucket["to"]
        scalars[f"{prefix}/position_{bucket['from']}_{end}/loss"] = bucket["loss"]
    for segment in result["by_segment"]:
        scalars[f"{prefix}/segment/{segment['segment']}/loss"] = segment["loss"]
    return {key: value for key, value in scalars.items() if math.isfinite(value)}


def record(
    *,
    config: dict[str, Any],
    models: list[dict[str, Any]],
    ensemble: str | None,
    stores: dict[str, dict[str, Any]],
    results: list[dict[str, Any]],
    bpb_note: str | None,
    devices: dict[str, Any],
    benchmarks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    for result in results:
        result["metrics"] = metric_scalars(result)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "models": models,
        "ensemble": None if ensemble is None else {"mode": ensemble, "members": len(models)},
        "config": config,
        "devices": devices,
        "stores": stores,
        "bpb_note": bpb_note,
        "results": results,
        "benchmarks": benchmarks,
    }


def benchmark_scalars(benchmarks: dict[str, Any] | None) -> dict[str, float]:
    """eval/benchmarks/<task>/<acc|acc_norm> and eval/benchmarks/paper_average/acc."""
    if not benchmarks:
        return {}
    scalars = {
        f"eval/benchmarks/{task}/{metric}": value
        for task, result in benchmarks["tasks"].items()
        for metric, value in result["metrics"].items()
    }
    if benchmarks.get("paper_average"):
        scalars["eval/benchmarks/paper_average/acc"] = benchmarks["paper_average"]["acc"]
    return scalars


def write(path: storage.AnyPath, value: dict[str, Any]) -> None:
    storage.makedirs(path.parent)
    storage.write_json_atomic(path, value)


def append_to_run_metrics(run_dir: storage.AnyPath, step: int, scalars: dict[str, float]) -> dict[str, float]:
    """Adds the scalars at `step` to the run's metrics.jsonl and TensorBoard files (process 0 only), but
    for those already logged at `step` with the same value (relative 1e-6: fp32 scores on another mesh):
    the training loop's final figures over the whole store, or an earlier identical evaluation. Returns
    what it wrote. A figure logged before with another value is written again (the later record wins)
    and a warning names both values.

    The writer is opened at the last step already logged, so that reading the log keeps every earlier
    record (MetricsWriter's resume marker drops records past the step it is opened at)."""
    has_log = storage.is_file(run_dir / metrics.JSONL_NAME)
    records = metrics.read_metrics(run_dir).records if has_log else []
    logged = {key: value for r in records if r["step"] == step for key, value in r.items()}
    new = {}
    for key, value in scalars.items():
        if key in logged and math.isclose(value, logged[key], rel_tol=1e-6, abs_tol=1e-9):
            continue
        if key in logged:
            log.warning("%s at step %d: %.6g replaces %.6g logged before", key, step, value, logged[key])
        new[key] = value
    if new:
        with metrics.MetricsWriter(run_dir, start_step=max([step, *(r["step"] for r in records)])) as writer:
            writer.write(step, new)
    return new


def summary_lines(value: dict[str, Any]) -> list[str]:
    """The console summary: one line per (store, recipe), then its position and segment figures."""
    ensemble = value["ensemble"]
    models = ", ".join(
        f"{m['spec']} (step {m['step']})" if m["step"] is not None else m["spec"] for m in value["models"]
    )
    head = f"ensemble of {ensemble['members']} ({ensemble['mode']}): {models}" if ensemble else f"model: {models}"
    lines = [head]
    for r in value["results"]:
        prefix = metric_prefix(r["store"], r["recipe"])
        bpb = f" | {prefix}/bpb {r['bpb']:.4f} ({r['bytes']:,} bytes)" if r["bpb"] is not None else ""
        stride = f", stride {r['stride']}" if r["stride"] else ""
        recipe = f"[{r['recipe']}, windows of {r['seq_len']}{stride}]"
        lines.append(f"{prefix}/loss {r['loss']:.4f} ({r['tokens']:,} tokens){bpb} {recipe}")
        positions = "  ".join(
            f"[{b['from']},{'inf' if b['to'] is None else b['to']}) {b['loss']:.3f}" for b in r["by_position"]
        )
        lines.append(f"    by position: {positions}")
        if len(r["by_segment"]) > 1 or any(s["kind"] != "original" for s in r["by_segment"]):
            segments = "  ".join(f"{s['segment']} {s['loss']:.3f} ({s['tokens']:,})" for s in r["by_segment"])
            lines.append(f"    by segment: {segments}")
    if value["bpb_note"]:
        lines.append(f"bpb: {value['bpb_note']}")
    benchmarks = value.get("benchmarks")
    if benchmarks:
        shots = benchmarks["num_fewshot"]
        for task, r in benchmarks["tasks"].items():
            figures = "  ".join(f"{m} {v:.4f} +- {r['stderr'][m]:.4f}" for m, v in r["metrics"].items())
            lines.append(f"{task} ({r['n']} items, {shots}-shot): {figures}  (chance {r['chance']:.4f})")
        average = benchmarks.get("paper_average")
        if average:
            tasks = ", ".join(average["tasks"])
            chance = sum(benchmarks["tasks"][t]["chance"] for t in average["tasks"]) / len(average["tasks"])
            figure = f"{average['acc']:.4f} +- {average['acc_stderr']:.4f}"
            lines.append(f"paper average acc ({tasks}): {figure}  (chance {chance:.4f})")
    return lines
