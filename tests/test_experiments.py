"""The paper's experiment configs (configs/experiments/, megadoc_jax/experiment_configs.py) and their check
command (megadoc_jax/experiments.py): files up to date, values as paper-notes.md states them, headers whose
commands parse with the real command lines, distinct run names, the complete grid, and every config
checked for its TPU slice (shapes, divisibility, attention mesh, fit); one compiled ahead of time.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from generation import __main__ as generation_cli
from megadoc_jax import config as config_lib
from megadoc_jax import evaluate, experiments, train
from megadoc_jax import experiment_configs as ec
from megadoc_jax.run_names import run_name

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install "megadoc-jax[tpu]")'
)
CONFIGS = Path("configs")
BY_PATH = {ec.config_path(e): e for e in ec.EXPERIMENTS}

# paper-notes.md, written out here independently of the module's table.
PAPER_BASELINES = {"150m": (16, 3e-3, 0.8), "300m": (16, 3e-3, 1.6), "600m": (8, 1e-3, 3.2), "1.5b": (8, 1e-3, 3.2)}
PAPER_CENTRES = {  # (method, G): (E, r, lr, wd), the tuned centres the notes state
    ("simple", 32): (16, 0.75, 3e-3, 0.4),
    ("stitched-back", 32): (32, 0.9, 1e-3, 0.4),
    ("stretched", 32): (32, 0.9, 1e-3, 0.4),
}
METHODS = ("simple", "stitched-back", "stitched-front", "stitched-nodoc", "stretched")
GRID_G = (2, 4, 8, 16, 32)


def load(e: ec.Experiment) -> config_lib.Config:
    return config_lib.load(ec.config_path(e))


def test_the_files_are_what_the_table_renders():
    # Fails after an edit of the table without `python -m megadoc_jax.experiments write`, or of a file by hand.
    assert ec.stale_files(CONFIGS) == []
    assert sorted(map(str, experiments.shipped_configs())) == sorted(
        str(Path(p).resolve()) for p in BY_PATH
    )  # the check's default set is every shipped file


def test_stale_files_are_found(tmp_path):
    ec.write_all(tmp_path)
    assert ec.stale_files(tmp_path) == []
    (tmp_path / "experiments" / "simple" / "g2.yaml").write_text("# edited by hand\n")
    (tmp_path / "experiments" / "simple" / "g3.yaml").write_text("{}\n")
    assert ec.stale_files(tmp_path) == [
        str(tmp_path / p) for p in ("experiments/simple/g2.yaml", "experiments/simple/g3.yaml")
    ]
    ec.write_all(tmp_path)  # rewrites the edited file and removes the one the table does not have
    assert ec.stale_files(tmp_path) == []


@pytest.mark.parametrize("e", ec.EXPERIMENTS, ids=lambda e: e.path)
def test_each_config_composes_to_its_row(e):
    config = load(e)
    x, d = config.experiment, config.data
    assert (x.name, x.data, x.method, x.generations) == (e.name, "dclm", e.method, e.generations)
    assert x.topology == "v4:2x2x2"
    assert run_name(config) == e.run_name and config.train.run_dir == f"runs/{e.run_name}"
    assert (d.real_epochs, config.optim.lr, config.optim.weight_decay, d.seq_len) == (e.epochs, e.lr, e.wd, e.seq_len)
    assert (config.model.size, config.train.seed, d.seed) == (e.size, e.seed, e.seed)
    weights = {s.name: (s.store, s.weight) for s in d.streams}
    if e.method == "real":
        assert weights == {"real": ("data/dclm/real", 1.0)}
    else:
        assert weights["synthetic"] == (f"data/dclm/megadocs/{e.method}-G{e.generations}", e.r)
        assert weights["real"] == ("data/dclm/real", pytest.approx(1 - e.r))
    assert config.data.tokenizer == "data/llama3-tokenizer" and config.data.eval_stores == {
        "iid": "data/dclm/heldout/iid"
    }
    assert config.model.remat == "full"  # measured: no 300m step fits a v4 chip without it
    # The recipe is the paper's: 64 x 4096 tokens, or the same 262,144 tokens in longer windows.
    assert config.train.batch_size * d.seq_len == 64 * 4096
    assert (config.optim.b1, config.optim.b2, config.optim.clip_norm, config.optim.warmup_fraction) == (
        0.9,
        0.95,
        1.0,
        0.01,
    )


def test_the_values_are_the_papers_or_marked_inferred():
    for e in ec.EXPERIMENTS:
        text = Path(ec.config_path(e)).read_text()
        if e.method == "real":
            assert (e.epochs, e.lr, e.wd) == PAPER_BASELINES[e.size], e.path
            size_file = config_lib.load(CONFIGS / f"{e.size}.yaml")  # the size configs state the same values
            assert (size_file.data.real_epochs, size_file.optim.lr, size_file.optim.weight_decay) == (
                e.epochs,
                e.lr,
                e.wd,
            )
        elif (e.method, e.generations) in PAPER_CENTRES:
            assert (e.epochs, e.r, e.lr, e.wd) == PAPER_CENTRES[e.method, e.generations], e.path
        else:  # not stated: the header says so, and the values lie in the stated typical ranges or grids
            assert "(inferred:" in text, e.path
            assert e.lr in (1e-3, 3e-3, 1e-2) and e.wd in (0.1, 0.4, 0.8, 1.6) and e.r in (0.5, 0.75, 0.9)
            assert e.epochs in (1, 2, 4, 8, 16, 32)


def test_the_grid_is_complete_and_the_run_names_distinct():
    grid = {(e.method, e.generations) for e in ec.EXPERIMENTS if e.seq_len == 4096 and not e.ensemble}
    assert grid == {("real", 0)} | set(itertools.product(METHODS, GRID_G))
    assert set(METHODS) | {"real"} == set(config_lib.EXPERIMENT_METHODS)
    baselines = [e for e in ec.EXPERIMENTS if e.method == "real" and not e.ensemble]
    assert sorted(e.size for e in baselines) == sorted(PAPER_BASELINES)
    assert all(e.size == "300m" for e in ec.EXPERIMENTS if e.method != "real")
    long = {(e.method, e.seq_len) for e in ec.EXPERIMENTS if e.seq_len != 4096}
    assert long == {("simple", 32768), ("stitched-back", 32768), ("stretched", 32768), ("stitched-back", 65536)}
    assert {(e.method, e.generations) for e in ec.EXPERIMENTS if e.ensemble} == {("real", 0), ("stitched-back", 32)}
    names = [e.run_name for e in ec.EXPERIMENTS]
    assert len(set(names)) == len(names) == 35
    assert len({e.name for e in ec.EXPERIMENTS}) == 35


def _header_commands(path: str) -> list[str]:
    """The shell commands of a file's header: `#   ` lines, continuations joined, comment lines left out."""
    lines = [line[4:] for line in Path(path).read_text().splitlines() if line.startswith("#   ")]
    commands, current = [], ""
    for line in lines:
        if line.startswith("#") and not current:
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
        else:
            commands.append(current)
            current = ""
    assert not current, f"{path}: a command ends in a continuation"
    return commands


def _parse_generation(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m generation", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in generation_cli._commands():
        add_command(subparsers)
    return parser.parse_args(argv)


@pytest.mark.parametrize("e", ec.EXPERIMENTS, ids=lambda e: e.path)
def test_each_header_says_how_to_run_it_with_real_commands(e):
    path = ec.config_path(e)
    text = Path(path).read_text()
    assert text.startswith("# ") and "# The paper reports: " in text
    assert all(len(line) <= 120 for line in text.splitlines()), path
    seen = set()
    for command in _header_commands(path):
        if command.startswith("for s in"):  # the ensemble's seed loop: check it for one seed
            command = command.split("; do ", 1)[1].removesuffix("; done").replace("$s", "3")
        words = shlex.split(command)
        assert words[:2] == ["python", "-m"], command
        module, argv = words[2], words[3:]
        seen.add(module if module != "generation" else f"generation {argv[0]}")
        if module == "generation":
            args = _parse_generation(argv)  # an unknown flag or a missing one fails here
            if args.command == "megadocs":
                assert (args.methods, args.G, args.out) == (e.method, str(e.generations), "data/dclm/megadocs")
        elif module == "megadoc_jax.train":
            args = train.parse_args(argv)
            config = config_lib.load(args.config, args.overrides)
            assert args.config == path and config.train.run_dir == f"runs/{run_name(config)}"
            if e.ensemble:  # the loop's overrides give seed 3 its own, correctly named run
                assert config.train.seed == config.data.seed == 3 and config.train.run_dir.endswith("-s3")
        elif module == "megadoc_jax.evaluate":
            options = evaluate.parse_args(argv)
            assert set(options.stores) == {"iid", "short", "long", "arxiv", "wikipedia", "github"}
            assert options.tasks == ("arc_easy", "piqa", "sciq")
            if e.ensemble:
                assert options.ensemble == "mean_logits" and len(options.models) == ec.ENSEMBLE_MEMBERS
                assert options.models[0] == f"runs/{e.run_name.removesuffix('-s1')}-s0"
                assert f"runs/{e.run_name}" in options.models
            else:
                assert options.models == [f"runs/{e.run_name}"]
        else:
            assert module == "megadoc_jax.experiments" and argv == ["check", path, "--compile"], command
    expected = {"megadoc_jax.experiments", "megadoc_jax.train", "megadoc_jax.evaluate"}
    if e.method != "real":
        expected |= {"generation generate", "generation merge", "generation megadocs"}
    assert seen == expected


def test_the_docs_table_is_the_tables():
    assert ec.markdown_table() in Path("docs/experiments.md").read_text()


def test_the_table_imports_no_jax():
    code = "import sys, megadoc_jax.experiment_configs; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_topology_of_the_wrong_form_is_named():
    with pytest.raises(config_lib.ConfigError, match=r"experiment.topology: 'v4-16' is not of the form"):
        config_lib.from_dict({"experiment": {"topology": "v4-16"}})


@needs_libtpu
def test_check_passes_every_shipped_config(capsys):
    assert experiments.main(["check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "all 35 configs pass"
    by_file = {line.split(": ", 1)[0]: line for line in lines[:-1]}
    assert sorted(by_file) == sorted(BY_PATH)
    assert (
        "| mesh data=1 fsdp=8 tensor=1 context=1 on 8 x TPU v4 | 299,649,792 parameters |"
        in by_file["configs/experiments/simple/g2.yaml"]
    )
    assert (
        "mesh data=1 fsdp=1 tensor=1 context=8"
        in by_file["configs/experiments/long-context/stitched-back-g32-64k.yaml"]
    )
    assert "1,540,732,416 parameters | state 2.15 GiB/device" in by_file["configs/experiments/baselines/1.5b.yaml"]


def _variant(tmp_path: Path, name: str, own: str) -> Path:
    """A config file that extends the 2-generation simple experiment with `own` YAML below the base."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base: {Path('configs/experiments/simple/g2.yaml').resolve()}\n{own}")
    return path


@needs_libtpu
def test_check_names_the_file_and_key_of_each_problem(tmp_path, capsys):
    run_dir = "train: {run_dir: runs/300m-dclm-simple-g2-e4-r0.75-lr3e-3-wd0.8-s0}\n"
    bad = [
        _variant(tmp_path, "a_name", "optim: {lr: 1.0e-2}\n"),  # run_dir no longer its run name
        _variant(tmp_path, "b_batch", "train: {batch_size: 12}\n" + run_dir.replace("}", ", batch_size: 12}")),
        _variant(tmp_path, "c_context", "mesh: {context: 3}\n"),
        _variant(tmp_path, "d_topology", "experiment: {topology: ''}\n"),
        _variant(tmp_path, "e_key", "optim: {learning_rate: 1.0}\n"),
        _variant(  # 80 layers, replicated: 33 GiB of state on a 32 GiB chip
            tmp_path,
            "f_state",
            "mesh: {fsdp: 1, data: -1}\nmodel: {size: 1.5b, layers: 80}\n"
            "train: {run_dir: runs/1.5b-dclm-simple-g2-e4-r0.75-lr3e-3-wd0.8-s0}\n",
        ),
    ]
    good = _variant(tmp_path, "z_good", "")
    assert experiments.main(["check", *map(str, bad), str(good)]) == 1
    captured = capsys.readouterr()
    fails = [line for line in captured.out.splitlines() if line.startswith("FAIL ")]
    expected = [
        (
            "a_name",
            "train.run_dir: 'runs/300m-dclm-simple-g2-e4-r0.75-lr3e-3-wd0.8-s0' is not runs/<its run name> = "
            "runs/300m-dclm-simple-g2-e4-r0.75-lr0.01-wd0.8-s0",
        ),
        ("b_batch", "train.batch_size: the microbatch of 12 sequences"),
        ("c_context", "mesh: 8 devices are not divisible by 3"),
        ("d_topology", "experiment.topology: not set"),
        ("e_key", "unknown key optim.learning_rate"),
        ("f_state", "mesh.fsdp: the train state alone"),
    ]
    assert len(fails) == len(expected)
    for line, (name, message) in zip(fails, expected):
        assert f"{name}.yaml: " in line and message in line, line
    assert (
        sum(
            line.startswith(str(good)) or line.startswith(good.name) or "z_good.yaml:" in line
            for line in captured.out.splitlines()
        )
        == 1
    )
    assert captured.err.splitlines()[-1].startswith("6 of 7 configs fail; the first: ")
    assert "a_name.yaml: train.run_dir" in captured.err.splitlines()[-1]


@needs_libtpu
@pytest.mark.slow
def test_check_compiles_a_representative_train_step(capsys):
    # The 150m baseline: the shape of every 4096-token experiment (fsdp over 8 v4 chips, full remat), smallest.
    assert experiments.main(["check", "configs/experiments/baselines/150m.yaml", "--compile"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "| step " in line and "of 32.00 GiB per device" in line and ": fits |" in line
    assert "FLOPs/device/step" in line


@needs_libtpu
def test_check_compile_names_a_step_the_compiler_refuses(tmp_path, capsys):
    # Without remat the 300m step needs about 143 GiB of temporaries per v4 chip: refused within seconds.
    no_remat = _variant(tmp_path, "no_remat", "model: {remat: none}\n")
    assert experiments.main(["check", str(no_remat), "--compile"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("FAIL ") and "no_remat.yaml: model.remat / train.microbatches / mesh: " in line
    assert "the TPU compiler refused the step: RESOURCE_EXHAUSTED" in line


@needs_libtpu
def test_check_applies_overrides_to_every_file(capsys):
    files = ["configs/experiments/simple/g2.yaml", "configs/experiments/stretched/g2.yaml"]
    assert experiments.main(["check", *files, "train.microbatches=2"]) == 0
    assert experiments.main(["check", *files, "train.microbatches=3"]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert [line.split(": ", 1)[0] for line in fails] == [f"FAIL {f}" for f in files]
    assert all("train.microbatches: 3 does not divide train.batch_size=64" in line for line in fails)
