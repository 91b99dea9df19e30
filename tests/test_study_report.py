"""The study report (python -m megadoc_jax.evaluate report): on run directories made with the project's own
writers (config.dump, MetricsWriter, evaluation.report.record/write, real token stores) whose losses follow
planted laws, the report must find the best runs, recover the planted data law and efficiencies within their
intervals, draw every figure and list what it cannot use; and end to end on a tiny trained, evaluated run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from megadoc_jax import config as config_lib
from megadoc_jax import evaluate, metrics, model, scaling, train
from megadoc_jax.data.store import Document, Segment, SegmentKind, StoreWriter
from megadoc_jax.evaluation import report as evaluation_report
from megadoc_jax.study import runs as runs_lib
from megadoc_jax.study.runs import StudyError, discover, parameter_count
from tests.pipeline_stores import EOS, TOKENIZER, make_config, random_documents, write_store

REPO = Path(__file__).resolve().parent.parent
LAW = scaling.PowerLaw(A=30.0, B=0.5, C=2.0)  # the planted reference data law L(D), D in tokens
NOISE = [0.003, -0.002, 0.001, -0.003, 0.002]  # on the best real runs' losses
REAL_SIZES = [20, 40, 80, 160, 320]  # documents per real store: five values of D
METHOD_D = 2  # the synthetic methods use the third real store
EFFICIENCY = {"simple": {2: 1.2, 4: 1.3, 8: 1.4}, "stitched-back": {2: 1.5, 4: 2.0, 8: 2.5}}
SIZE_LAW_A, SIZE_LAW_B = 0.05, 0.3  # L(N) = A / N^B + c over model sizes (N in billions)
ENSEMBLE_A, ENSEMBLE_B, ENSEMBLE_DROP = 0.2, 0.8, 0.2  # L(K) = A / K^B + (L_best - A)
BUCKETS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, None)]
SEQ_LEN = 16


def megadoc_documents(count: int, seed: int) -> tuple[list[Document], int]:
    """Stitched-back megadocs (original, separator, rephrase 1) and the tokens of their originals."""
    rng = np.random.default_rng(seed)
    documents, originals = [], 0
    for _ in range(count):
        original, rephrase = rng.integers(1, 100, size=rng.integers(3, 30)), rng.integers(1, 100, size=20)
        tokens = np.concatenate([original, [EOS], rephrase, [EOS]]).astype(np.int32)
        segments = (
            Segment(SegmentKind.ORIGINAL, 0, original.size),
            Segment(SegmentKind.SEPARATOR, 0, 1),
            Segment(SegmentKind.REPHRASE, 1, rephrase.size),
            Segment(SegmentKind.SEPARATOR, 0, 1),
        )
        documents.append(Document(tokens, {}, segments))
        originals += original.size
    return documents, originals


def store_tokens(path: str) -> int:
    return int(json.loads((Path(path) / "manifest.json").read_text())["num_tokens"])


def result(store: str, loss: float, segments: dict[str, float] | None = None) -> dict:
    """One (store, concat) result as the evaluation writes it."""
    segments = segments or {"original": loss}
    kinds = {"original": "original", "separator": "separator"}
    return {
        "store": store,
        "recipe": "concat",
        "seq_len": SEQ_LEN,
        "stride": None,
        "windows": 10,
        "rows": 10,
        "tokens": 150,
        "bytes": None,
        "loss": loss,
        "bpb": None,
        "by_position": [{"from": a, "to": b, "tokens": 10, "loss": loss + 1.0 / (a + 1)} for a, b in BUCKETS],
        "by_segment": [
            {"segment": name, "kind": kinds.get(name, "rephrase"), "index": 0, "tokens": 10, "loss": value}
            for name, value in segments.items()
        ],
    }


def write_evaluation(
    run_dir: Path,
    config: config_lib.Config,
    step: int,
    results: list[dict],
    *,
    benchmark: float | None = None,
    members: int | None = None,
) -> Path:
    benchmarks = None
    if benchmark is not None:
        task = {
            "n": 100,
            "metrics": {"acc": benchmark, "acc_norm": benchmark},
            "stderr": {"acc": 0.01, "acc_norm": 0.01},
        }
        benchmarks = {
            "tasks": {"arc_easy": task, "piqa": task, "sciq": task},
            "paper_average": {"tasks": ["arc_easy", "piqa", "sciq"], "acc": benchmark, "acc_stderr": 0.006},
            "num_fewshot": 0,
            "fewshot_seed": 1234,
        }
    model_entry = {
        "spec": str(run_dir),
        "kind": "run",
        "path": str(run_dir),
        "checkpoint": None,
        "step": step,
        "context_length": SEQ_LEN,
        "tokenizer": None,
        "model": {},
    }
    value = evaluation_report.record(
        config=config_lib.to_dict(config),
        models=[model_entry] * (members or 1),
        ensemble="mean_logits" if members else None,
        stores={},
        results=results,
        bpb_note="no tokenizer",
        devices={"count": 1, "kind": "cpu", "mesh": {}},
        benchmarks=benchmarks,
    )
    name = f"ensemble_mean_logits_{members}_step_{step}.json" if members else f"run_step_{step}.json"
    path = run_dir / "eval" / name
    evaluation_report.write(path, value)
    return path


def write_run(root: Path, name: str, config: config_lib.Config, *, train_loss: float | None, step: int = 50) -> Path:
    """config.yaml and a metrics.jsonl whose final step logs eval/iid/loss (as training leaves a run)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config_lib.dump(config, run_dir / "config.yaml")
    with metrics.MetricsWriter(run_dir, enabled=True) as writer:
        writer.write(10, {"loss": 5.0})
        if train_loss is not None:
            writer.write(step, {"loss": 4.0, "eval/iid/loss": train_loss})
    return run_dir


def run_config(
    streams: dict,
    *,
    method: str,
    generations: int = 0,
    size: str = "tiny",
    epochs: float = 4.0,
    lr: float = 1e-3,
    seed: int = 0,
    heldout: str,
) -> config_lib.Config:
    return make_config(
        streams,
        experiment={"method": method, "generations": generations, "data": "toy", "name": f"{method}-g{generations}"},
        model={"size": size},
        optim={"lr": lr, "weight_decay": 0.4},
        data={"real_epochs": epochs, "seq_len": SEQ_LEN, "eval_stores": {"iid": heldout}},
        train={"batch_size": 4, "seed": seed},
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """RUNS_DIR with real runs at five D (two lr each), simple and stitched-back at G = 2, 4, 8 (two r each),
    real runs at three more model sizes, ensembles of 1..4, a run without a method and two non-run dirs."""
    root = tmp_path_factory.mktemp("study")
    stores_dir, runs_dir = root / "stores", root / "runs"
    real = [write_store(stores_dir / f"real{n}", random_documents(n, seed=n)) for n in REAL_SIZES]
    heldout = write_store(runs_dir / "shared" / "heldout", random_documents(10, seed=99))  # a store, not a run
    megadocs, originals = megadoc_documents(30, seed=7)
    with StoreWriter(stores_dir / "stitched", TOKENIZER) as writer:
        writer.append(megadocs)
        writer.finish()
    synthetic = str(stores_dir / "stitched")
    (runs_dir / "notes").mkdir()
    (runs_dir / "notes" / "README.txt").write_text("not a run")
    D = [store_tokens(p) for p in real]
    planted: dict = {"D": D, "best": {}, "efficiency": {}, "originals": originals, "synthetic": synthetic}
    count = 0

    def name() -> str:
        nonlocal count
        count += 1
        return f"sweep/run-{count:03d}"  # names say nothing: the report reads configs

    for i, (store, d) in enumerate(zip(real, D)):
        best = float(LAW(d)) + NOISE[i]
        for lr, loss in ((1e-3, best), (3e-3, best + 0.15)):
            config = run_config({"real": (store, 1.0)}, method="real", lr=lr, heldout=heldout)
            if i < 2:  # losses from the training log only
                run_dir = write_run(runs_dir, name(), config, train_loss=loss)
            else:  # an evaluation JSON; the training log's figure (another recipe) must not be used
                run_dir = write_run(runs_dir, name(), config, train_loss=loss + 0.5)
                write_evaluation(run_dir, config, 50, [result("iid", loss)], benchmark=0.30 if i == METHOD_D else None)
            if lr == 1e-3:
                planted["best"][("real", 0, "tiny", d)] = (run_dir, loss)
    for method, by_g in EFFICIENCY.items():
        for g, efficiency in by_g.items():
            best = float(LAW(efficiency * D[METHOD_D]))
            for r, loss in ((0.75, best + 0.05), (0.9, best)):
                streams = {"real": (real[METHOD_D], 1 - r), "synthetic": (synthetic, r)}
                config = run_config(streams, method=method, generations=g, epochs=8.0, heldout=heldout)
                run_dir = write_run(runs_dir, name(), config, train_loss=None)
                segments = {"original": loss, "separator": loss + 1, "rephrase_1": loss - 0.5}
                results = [result("iid", loss), result("stitched", loss - 0.3, segments)]
                write_evaluation(run_dir, config, 40, [result("iid", loss + 1.0)])  # an older evaluation
                write_evaluation(run_dir, config, 50, results, benchmark=0.3 + 0.01 * g)
                if r == 0.9:
                    planted["best"][(method, g, "tiny", D[METHOD_D])] = (run_dir, loss)
                    planted["efficiency"][(method, g)] = efficiency
    # Model sizes: the reference method at D[METHOD_D]; the tiny point is the data law's best run.
    tiny_run, tiny_loss = planted["best"][("real", 0, "tiny", D[METHOD_D])]
    n_tiny = parameter_count(config_lib.load(tiny_run / "config.yaml").model) / 1e9
    size_c = tiny_loss - SIZE_LAW_A / n_tiny**SIZE_LAW_B
    planted["size_c"] = size_c
    for size in ("demo", "150m", "300m"):
        config = run_config({"real": (real[METHOD_D], 1.0)}, method="real", size=size, heldout=heldout)
        n = parameter_count(config.model) / 1e9
        write_run(runs_dir, name(), config, train_loss=SIZE_LAW_A / n**SIZE_LAW_B + size_c)
    # Ensembles of the best stitched-back G=8 run (their JSONs sit in its eval directory).
    first, best8 = planted["best"][("stitched-back", 8, "tiny", D[METHOD_D])]
    first_config = config_lib.load(first / "config.yaml")
    planted["ensemble_c"] = best8 - ENSEMBLE_A
    for k in (1, 2, 3, 4):
        loss = ENSEMBLE_A / k**ENSEMBLE_B + planted["ensemble_c"]
        write_evaluation(first, first_config, 50, [result("iid", loss)], members=k)
    (first / "eval" / "notes.json").write_text('{"format": "something else"}')
    # A run without experiment.method.
    write_run(runs_dir, "demo-run", run_config({"real": (real[0], 1.0)}, method="", heldout=heldout), train_loss=4.2)

    out = root / "report"
    assert evaluate.main(["report", str(runs_dir), "--out", str(out), "--bootstrap", "300"]) == 0
    value = json.loads((out / "report.json").read_text())
    return {"runs_dir": runs_dir, "out": out, "value": value, "planted": planted, "heldout": heldout, "real": real}


def test_the_best_run_of_each_configuration_and_where_its_loss_comes_from(study):
    value, planted, runs_dir = study["value"], study["planted"], study["runs_dir"]
    assert value["counts"]["runs"] == 10 + 12 + 3 and value["counts"]["unstated_runs"] == 1
    assert [r["path"] for r in value["unstated_runs"]] == ["demo-run"]
    best = {(b["method"], b["generations"], b["size"], b["real_tokens"]): b for b in value["best"]}
    assert len(best) == 5 + 6 + 3
    for key, (run_dir, loss) in planted["best"].items():
        assert best[key]["run"] == str(run_dir.relative_to(runs_dir))
        assert best[key]["loss"] == pytest.approx(loss, abs=1e-12)
        assert best[key]["swept_runs"] == 2
    d = planted["D"]
    assert best[("real", 0, "tiny", d[0])]["row"]["loss_source"]["source"] == "training"
    evaluated = best[("real", 0, "tiny", d[3])]["row"]["loss_source"]
    assert evaluated["source"] == "evaluation" and evaluated["file"] == "run_step_50.json"
    method_row = best[("stitched-back", 4, "tiny", d[METHOD_D])]["row"]
    assert method_row["synthetic_weight"] == 0.9 and method_row["real_epochs"] == 8.0
    assert method_row["losses"]["stitched"] == pytest.approx(method_row["loss"] - 0.3)
    assert method_row["paper_average"] == pytest.approx(0.34)


def test_the_reference_law_and_the_efficiencies_recover_the_planted_ones(study):
    value, planted = study["value"], study["planted"]
    law = value["reference_laws"]["tiny"]["fit"]
    for name, planted_value in (("A", LAW.A), ("B", LAW.B), ("C", LAW.C)):
        low, high = law["intervals"][name]
        assert low <= planted_value <= high, (name, low, planted_value, high)
    assert law["law"]["C"] == pytest.approx(LAW.C, abs=0.1) and law["law"]["B"] == pytest.approx(LAW.B, rel=0.1)
    rows = {(e["method"], e["generations"]): e for e in value["data_efficiency"]}
    assert set(rows) == set(planted["efficiency"])
    for key, efficiency in planted["efficiency"].items():
        found = rows[key]["efficiency"]
        assert found["value"] == pytest.approx(efficiency, rel=0.05), key
        assert found["interval"][0] <= efficiency <= found["interval"][1], (key, found["interval"])
    # The other sizes have one real point each: a line saying so, not a crash.
    assert value["reference_laws"]["demo"]["fit"] is None
    assert "needs at least 3 points" in value["reference_laws"]["demo"]["message"]


def test_model_size_and_ensemble_asymptotes(study):
    value, planted = study["value"], study["planted"]
    (size_fit,) = [o for o in value["model_size_fits"] if o["fit"] and o["what"].startswith("model-size law, real")]
    assert len(size_fit["points"]) == 4
    assert size_fit["fit"]["law"]["C"] == pytest.approx(planted["size_c"], abs=0.02)
    (ensemble_fit,) = value["ensemble_fits"]
    assert [p["x"] for p in ensemble_fit["points"]] == [1, 2, 3, 4]
    assert ensemble_fit["fit"]["law"]["C"] == pytest.approx(planted["ensemble_c"], abs=1e-6)
    assert ensemble_fit["fit"]["law"]["B"] == pytest.approx(ENSEMBLE_B, abs=1e-4)


def test_real_token_accounting_follows_the_plan(study):
    value, planted = study["value"], study["planted"]
    rows = {(b["method"], b["generations"], b["real_tokens"]): b["row"] for b in value["best"]}
    d = planted["D"][METHOD_D]
    real_row, stitched = rows[("real", 0, d)], rows[("stitched-back", 2, d)]
    assert real_row["real_tokens_seen"] == pytest.approx(real_row["real_epochs_planned"] * d)
    # E = 8 real epochs at weight 0.1: the plan runs ceil(S_epoch * 8 / 0.1) steps.
    windows = (d - 1) // SEQ_LEN
    assert stitched["total_steps"] == math.ceil(windows / 4 * 8 / 0.1 - 1e-9)
    assert stitched["real_epochs_planned"] == pytest.approx(8.0, rel=0.01)
    synthetic_windows = (store_tokens(planted["synthetic"]) - 1) // SEQ_LEN
    assert stitched["synthetic_passes"] == pytest.approx(
        stitched["total_steps"] * 4 * 0.9 / synthetic_windows, rel=0.01
    )
    expected = stitched["real_epochs_planned"] * d + stitched["synthetic_passes"] * planted["originals"]
    assert stitched["real_tokens_seen"] == pytest.approx(expected)


def test_every_figure_is_drawn_and_its_data_is_in_the_json(study):
    value, out = study["value"], study["out"]
    expected = {
        "loss_vs_generations",
        "loss_vs_epochs",
        "loss_by_position",
        "loss_by_segment",
        "fit_data",
        "fit_model_size",
        "fit_ensemble",
        "benchmarks_vs_generations",
        "data_efficiency_vs_generations",
    }
    assert set(value["figures"]) == expected and value["figures_not_drawn"] == {}
    for name, spec in value["figures"].items():
        image = matplotlib.image.imread(out / spec["file"])
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, name
        for panel in spec["panels"]:
            assert panel["x_label"] and panel["y_label"] and panel["title"]
    (panel,) = value["figures"]["loss_vs_generations"]["panels"]
    stitched = next(s for s in panel["series"] if s["label"] == "stitched-back")
    assert stitched["x"] == [2, 4, 8]
    assert stitched["y"] == [pytest.approx(float(LAW(e * study["planted"]["D"][METHOD_D]))) for e in (1.5, 2.0, 2.5)]
    (panel,) = value["figures"]["data_efficiency_vs_generations"]["panels"]
    simple = next(s for s in panel["series"] if s["label"] == "simple")
    assert simple["y"] == pytest.approx([1.2, 1.3, 1.4], rel=0.05)
    assert all(lo <= y <= hi for lo, y, hi in zip(simple["y_lo"], simple["y"], simple["y_hi"]))
    segments = value["figures"]["loss_by_segment"]["panels"][0]
    assert segments["title"] == "store stitched" and segments["categories"] == ["original", "separator", "rephrase_1"]


def test_the_markdown_has_the_tables_and_says_what_could_not_be_fitted(study):
    text = (study["out"] / "report.md").read_text()
    for heading in (
        "## Best runs",
        "## Reference data scaling law",
        "## Data efficiency",
        "## Asymptotes",
        "## Benchmarks",
        "## Figures",
        "## Runs without experiment.method",
        "## All runs",
    ):
        assert heading in text
    assert "| method | G | size | D (tokens) | loss |" in text
    assert "reference data law (real), size demo: no fit" in text
    assert "![Data efficiency vs generations per document](data_efficiency_vs_generations.png)" in text
    assert text.count("| stitched-back |") >= 3


def test_discovery_ignores_non_run_directories_and_names_a_broken_config(tmp_path, study):
    found = discover(study["runs_dir"])
    paths = {str(r.path.relative_to(study["runs_dir"])) for r in found.runs}
    assert len(paths) == 26 and not any(p.startswith(("notes", "shared")) for p in paths)
    broken = tmp_path / "runs" / "x"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("optim:\n  lr: fast\n")
    with pytest.raises(StudyError, match=r"runs/x/config.yaml: .*optim.lr"):
        discover(tmp_path / "runs")
    assert discover(tmp_path / "runs", skip_broken=True).broken[0][0] == broken / "config.yaml"
    assert evaluate.main(["report", str(tmp_path / "runs"), "--skip-broken", "--no-plots"]) == 0
    value = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    assert value["broken_configs"][0]["file"].endswith("x/config.yaml")
    assert "optim.lr" in value["broken_configs"][0]["error"]


def test_an_unreachable_real_store_is_named_or_given_on_the_command_line(tmp_path, capsys, study):
    run_dir = tmp_path / "runs" / "moved"
    config = run_config({"real": ("/nowhere/real", 1.0)}, method="real", heldout=study["heldout"])
    write_run(tmp_path / "runs", "moved", config, train_loss=3.0)
    assert evaluate.main(["report", str(tmp_path / "runs"), "--no-plots"]) == 2
    error = capsys.readouterr().err
    assert str(run_dir) in error and "/nowhere/real" in error and "--real-tokens" in error
    assert evaluate.main(["report", str(tmp_path / "runs"), "--no-plots", "--real-tokens", "/nowhere/real=5000"]) == 0
    value = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    (row,) = value["runs"]
    assert row["real_tokens"] == 5000 and row["real_tokens_source"] == "--real-tokens" and row["loss"] == 3.0
    assert "no fit" in value["reference_laws"]["tiny"]["message"]


def test_the_package_imports_no_jax_and_reads_the_evaluation_format():
    assert runs_lib.EVALUATION_FORMAT == evaluation_report.FORMAT
    code = (
        "import sys; import megadoc_jax.study.cli, megadoc_jax.study.plots, megadoc_jax.study.report; "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize(
    "shape",
    [
        {"size": "tiny"},
        {
            "size": "custom",
            "vocab_size": 96,
            "hidden": 48,
            "mlp": 80,
            "layers": 3,
            "heads": 6,
            "kv_heads": 2,
            "head_dim": 16,
        },
    ],
)
def test_parameter_count_is_the_models(shape):
    cfg = config_lib.from_dict({"model": shape}).model
    decoder = nnx.eval_shape(lambda: model.Decoder(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing computed
    assert parameter_count(cfg) == sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))


def test_end_to_end_on_a_tiny_trained_and_evaluated_run(tmp_path):
    real = write_store(tmp_path / "real", random_documents(60, seed=1))
    heldout = write_store(tmp_path / "heldout", random_documents(20, seed=2))
    run_dir = tmp_path / "runs" / "tiny"
    config = run_config({"real": (real, 1.0)}, method="real", heldout=heldout)
    config = config_lib.from_dict(
        {
            **config_lib.to_dict(config),
            "train": {"batch_size": 4, "steps": 6, "run_dir": str(run_dir), "eval_batches": 2, "checkpoints": True},
        }
    )
    config = config_lib.from_dict(
        {**config_lib.to_dict(config), "model": {**config_lib.to_dict(config)["model"], "compute_dtype": "float32"}}
    )
    assert train.run(config, devices=jax.devices()[:1]).exit_code == 0
    options = evaluate.Options(
        models=[str(run_dir)], progress=False, recipes=("concat",), overrides=["mesh.data=-1", "train.batch_size=4"]
    )
    evaluation = evaluate.evaluate(options, jax.devices()[:1])
    assert evaluate.main(["report", str(tmp_path / "runs"), "--no-plots"]) == 0
    value = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    (row,) = value["runs"]
    (iid,) = [r for r in evaluation["results"] if r["store"] == "iid"]
    assert row["loss"] == iid["loss"] and row["loss_source"]["source"] == "evaluation"
    assert row["loss_source"]["step"] == 6 and row["real_tokens"] == store_tokens(real)
    assert row["total_steps"] == 6 and row["training_tokens"] == 6 * 4 * SEQ_LEN
