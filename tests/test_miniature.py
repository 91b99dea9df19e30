"""The CPU miniature (megadoc_jax.miniature): its plan, its configs and its stage runner.

The whole miniature takes about 19 minutes on 2 cores: too slow for the suite. Its measured run is in
docs/miniature.md. Here: every config it writes composes and validates, the subsets are nested, the
commands it plans are ones our CLIs accept, and the runner's order, resume, failure and stale-directory
rules, with real (small) child processes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from test_study_report import study  # noqa: F401  (the fixture: a study report built from planted laws)

from megadoc_jax import config as config_lib
from megadoc_jax.miniature import summary
from megadoc_jax.miniature.plan import Plan, Settings, Stage, fraction_label, nested_subsets
from megadoc_jax.miniature.runner import StaleWorkDir, run_stages


def test_fraction_labels():
    assert [fraction_label(f) for f in (0.125, 0.25, 0.5, 1.0, 1 / 3)] == ["1of8", "1of4", "1of2", "1of1", "1of3"]


def test_subsets_are_nested_and_mix_the_corpus():
    documents = [{"id": f"doc-{i}", "text": f"text {i}"} for i in range(100)]
    subsets = nested_subsets(documents, [0.125, 0.25, 0.5])
    assert [len(subsets[f]) for f in (0.125, 0.25, 0.5)] == [12, 25, 50]
    ids = {f: [d["id"] for d in s] for f, s in subsets.items()}
    assert ids[0.25][:12] == ids[0.125] and ids[0.5][:25] == ids[0.25]
    assert ids[0.5] != [d["id"] for d in documents[:50]]  # hash order, not the corpus's order


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fractions", (0.5, 1.0), "needs 3 or more data sizes"),
        ("fractions", (0.25, 0.5, 1.5), "in (0, 1]"),
        ("methods", ("simple", "stiched"), "methods"),
        ("r", 0.4, "sweep_r"),
        ("jobs", 0, "jobs"),
    ],
)
def test_settings_refuse_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"miniature settings: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        Settings(work_dir=tmp_path, **{field: value})


def test_every_config_it_writes_composes_and_validates(tmp_path):
    plan = Plan(Settings(work_dir=tmp_path / "work"))
    plan.write_configs()
    written = sorted((tmp_path / "work" / "configs").glob("*.yaml"))
    names = {p.stem for p in written}
    assert names == {"generator", "sweep", *(f"real-{fraction_label(f)}" for f in plan.s.fractions)} | {
        f"{m}-g{g}" for m in plan.s.methods for g in plan.s.generations
    }
    for path in written:
        if path.stem == "sweep":
            continue
        config = config_lib.load(path, list(plan.s.overrides))
        assert config.data.tokenizer == str(plan.tokenizer)
        assert config.data.eval_stores == {"heldout": str(plan.demo / "heldout")}
        stores = {s.name: s.store for s in config.data.streams}
        if path.stem.startswith("real-") and path.stem != "real-1of1":
            assert stores == {"real": str(tmp_path / "work" / "data" / path.stem)}
        if path.stem.startswith(("simple-", "stitched-back-")):
            method, g = path.stem.rsplit("-g", 1)
            assert stores["synthetic"] == str(plan.stream_store(method, int(g)))
            assert config.experiment.method == method and config.experiment.generations == int(g)
            assert {s.name: s.weight for s in config.data.streams} == {"real": 0.5, "synthetic": 0.5}
    sweep = yaml.safe_load((tmp_path / "work" / "configs" / "sweep.yaml").read_text())
    assert sweep["config"] == "stitched-back-g2.yaml" and sweep["grids"] == {"r": [0.25, 0.5, 0.75]}


def test_the_full_data_baseline_gets_the_megadoc_runs_compute(tmp_path):
    """4 real epochs at weight 1 against 2 real epochs at weight 1/2: the same steps over the same split."""
    from megadoc_jax.data.mixture import steps_for_epochs

    plan = Plan(Settings(work_dir=tmp_path))
    plan.write_configs()
    baseline = config_lib.load(tmp_path / "configs" / "real-1of1.yaml")
    megadoc = config_lib.load(tmp_path / "configs" / "simple-g2.yaml")
    smaller = config_lib.load(tmp_path / "configs" / "real-1of8.yaml")
    assert baseline.data.real_epochs == smaller.data.real_epochs == 4 and megadoc.data.real_epochs == 2
    steps = [
        steps_for_epochs(1000, c.train.batch_size, c.data.real_epochs, c.data.streams[0].weight)
        for c in (baseline, megadoc)
    ]
    assert megadoc.data.streams[0].name == "real" and steps == [250, 250]


def test_the_sweep_file_is_one_the_sweep_accepts(tmp_path):
    from megadoc_jax.sweep.spec import load_spec

    plan = Plan(Settings(work_dir=tmp_path))
    plan.write_configs()
    loaded = load_spec(tmp_path / "configs" / "sweep.yaml")
    assert Path(loaded.sweep_dir) == tmp_path / "runs" / "sweep"
    assert Path(loaded.config) == tmp_path / "configs" / "stitched-back-g2.yaml"


def test_planned_runs_and_their_order(tmp_path):
    plan = Plan(Settings(work_dir=tmp_path))
    stages = {s.name: s for s in plan.stages()}
    assert plan.run_names() == [
        "real-1of8",
        "real-1of4",
        "real-1of2",
        "real-1of1",
        "simple-g2",
        "simple-g4",
        "stitched-back-g4",  # stitched-back at G=2 is the sweep's
    ]
    assert stages["sweep"].after == ("megadocs",) and stages["sweep"].slots == 2
    assert stages["report"].after == ("evaluate baselines", "evaluate megadocs", "evaluate sweep")
    evaluate = stages["evaluate megadocs"].command_list()[0]
    assert evaluate.count("--model") == 3 and "--no-progress" in evaluate
    generate = stages["generate"].command_list()[0]
    assert generate[generate.index("--samples") + 1] == "4"


def test_planned_commands_parse(tmp_path):
    """Every command of the plan is accepted by its CLI's argument parser (none runs)."""
    from generation.__main__ import build_parser as generation_parser
    from megadoc_jax.evaluate import parse_args as evaluate_parse_args

    for stage in Plan(Settings(work_dir=tmp_path)).stages():
        for command in stage.command_list() if not callable(stage.commands) else []:
            module, args = command[2], [str(a) for a in command[3:]]
            if module == "generation":
                generation_parser().parse_args(args)
            elif module == "megadoc_jax.evaluate" and args[0] != "report":
                evaluate_parse_args(args)


# -- the runner -----------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _touch(path: Path, exit_code: int = 0) -> list[str]:
    return _python(f"import pathlib, sys; pathlib.Path({str(path)!r}).write_text('x'); sys.exit({exit_code})")


def test_runner_runs_in_order_and_a_rerun_skips_finished_stages(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stages = [
        Stage("a", [_touch(out / "a")]),
        Stage(
            "b",
            [_python(f"import pathlib; assert pathlib.Path({str(out / 'a')!r}).exists()"), _touch(out / "b")],
            after=("a",),
        ),
        Stage("c", [_touch(out / "c")], after=("a",)),
    ]
    outcomes = run_stages(stages, tmp_path / "work", jobs=2, echo=lambda line: None)
    assert [o.status for o in outcomes] == ["done", "done", "done"]
    assert {p.name for p in out.iterdir()} == {"a", "b", "c"}
    marker = json.loads((tmp_path / "work" / "stages" / "b.json").read_text())
    assert len(marker["commands"]) == 2 and marker["seconds"] >= 0
    assert "$ " in (tmp_path / "work" / "logs" / "b.log").read_text()

    (out / "a").unlink()
    again = run_stages(stages, tmp_path / "work", jobs=2, echo=lambda line: None)
    assert [o.status for o in again] == ["earlier"] * 3 and not (out / "a").exists()


def test_a_wide_stage_is_not_overtaken_by_narrow_ones_planned_after_it(tmp_path):
    """jobs=2: while `a` runs, the 2-slot `wide` waits, and `c` (1 slot, planned later) waits behind it."""
    stages = [
        Stage("a", [_python("import time; time.sleep(0.5)")]),
        Stage("wide", [_python("pass")], slots=2),
        Stage("c", [_python("pass")]),
    ]
    lines: list[str] = []
    run_stages(stages, tmp_path, jobs=2, echo=lines.append)
    starts = [line.split()[-1] for line in lines if " start " in line]
    assert starts == ["a", "wide", "c"]


def test_a_failed_stage_blocks_what_needs_it_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stages = [
        Stage("a", [_python("print('boom'); raise SystemExit(3)")]),
        Stage("b", [_touch(out / "b")], after=("a",)),
        Stage("c", [_touch(out / "c")], after=("b",)),
        Stage("d", [_touch(out / "d")]),
    ]
    lines: list[str] = []
    outcomes = {o.name: o for o in run_stages(stages, tmp_path / "work", jobs=1, echo=lines.append)}
    assert outcomes["a"].status == "failed" and "exit code 3" in outcomes["a"].reason and "boom" in outcomes["a"].reason
    assert outcomes["b"].status == "blocked" and outcomes["c"].status == "blocked"
    assert outcomes["d"].status == "done" and (out / "d").exists() and not (out / "b").exists()
    assert not (tmp_path / "work" / "stages" / "a.json").exists()  # it runs again next time
    assert any("skipped b" in line for line in lines)


def test_a_failing_action_fails_its_stage_with_the_reason(tmp_path):
    def action():
        raise ValueError("no train.jsonl in the demo directory")

    (outcome,) = run_stages([Stage("a", [], action=action)], tmp_path, jobs=1, echo=lambda line: None)
    assert outcome.status == "failed" and "no train.jsonl" in outcome.reason


def test_other_settings_in_the_same_work_directory_are_refused(tmp_path):
    run_stages([Stage("a", [_python("pass")])], tmp_path, jobs=1, echo=lambda line: None)
    with pytest.raises(StaleWorkDir, match="stage 'a' ran other commands"):
        run_stages([Stage("a", [_python("print(1)")])], tmp_path, jobs=1, echo=lambda line: None)


def test_a_rerun_with_another_resolved_config_is_refused(tmp_path):
    """Same commands, other config contents (here: another learning rate for every run)."""
    plan = Plan(Settings(work_dir=tmp_path))
    plan.write_configs()

    def baseline(plan: Plan) -> Stage:  # its real fingerprint, a quick command, nothing before it
        stage = next(s for s in plan.stages() if s.name == "train real-1of8")
        return dataclasses.replace(stage, commands=[_python("pass")], after=())

    quick = baseline(plan)
    run_stages([quick], tmp_path, jobs=1, echo=lambda line: None)
    assert run_stages([quick], tmp_path, jobs=1, echo=lambda line: None)[0].status == "earlier"
    other = Plan(Settings(work_dir=tmp_path, overrides=("optim.lr=0.001",)))
    with pytest.raises(StaleWorkDir, match="stage 'train real-1of8' ran with another config"):
        run_stages([baseline(other)], tmp_path, jobs=1)


def test_a_refused_rerun_leaves_the_work_directory_as_it_was(tmp_path, capsys):
    from megadoc_jax.miniature.__main__ import main
    from megadoc_jax.miniature.runner import _as_text

    plan = Plan(Settings(work_dir=tmp_path))
    plan.write_configs()
    stage = next(s for s in plan.stages() if s.name == "train real-1of8")
    marker = {"stage": stage.name, "commands": _as_text(stage.command_list()), "fingerprint": stage.fingerprint()}
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train-real-1of8.json").write_text(json.dumps(marker | {"seconds": 1.0}))
    before = {p.name: p.read_text() for p in (tmp_path / "configs").iterdir()}
    assert main(["--work-dir", str(tmp_path), "optim.lr=0.001"]) == 2
    assert "stage 'train real-1of8' ran other commands" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in (tmp_path / "configs").iterdir()} == before


def test_a_stage_listed_after_what_it_needs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="comes after"):
        run_stages([Stage("b", [], after=("a",)), Stage("a", [])], tmp_path, jobs=1, echo=lambda line: None)


def test_summary_reads_the_study_report(study):  # noqa: F811  (the imported fixture)
    """The summary of the report the study report tests build from planted laws (their fixture)."""
    lines, figures = summary.report_summary(study["out"] / "report.json")
    value = study["value"]
    assert lines[0].startswith("best loss per configuration")
    assert len(figures["best"]) == len(value["best"]) and figures["counts"] == value["counts"]
    law = value["reference_laws"]["tiny"]["fit"]["law"]
    assert figures["reference_laws"]["tiny"] == law
    assert any(f"A = {law['A']:.4f}" in line for line in lines)
    for row in value["data_efficiency"]:
        text = f"{row['method']} G={row['generations']} D={row['real_tokens']:,}: "
        assert any(line.strip().startswith(text) for line in lines), text
