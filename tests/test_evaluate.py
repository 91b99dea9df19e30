"""python -m megadoc_jax.evaluate: the two recipes against transformers' PyTorch Llama, bits per byte, loss by
position and by segment, ensembles against full logits, 1 vs 8 devices, a rerun, the run's metrics, bad input.

The models are tiny: the Llama of tests/data/lm_eval_model (a Hugging Face directory with a byte-level BPE
tokenizer) and random runs of other sizes with the same tokenizer."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from processes import distributed_env, free_port, start_python
from test_benchmarks import lm_evals_float_sum
from tokenizers import Tokenizer

from megadoc_jax import checkpoint, hf, metrics, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import evaluate as cli
from megadoc_jax import model as model_lib
from megadoc_jax.data.store import Document, Segment, SegmentKind, StoreReader, StoreWriter, TokenizerInfo
from megadoc_jax.evaluation import loss_windows, report
from megadoc_jax.evaluation.token_bytes import token_byte_lengths

REPO = Path(__file__).resolve().parent.parent
HF_DIR = REPO / "tests" / "data" / "lm_eval_model"
SEQ_LEN = 32
WORDS = [
    "the",
    "a",
    "model",
    "token",
    "window",
    "loss",
    "café",
    "naïve",
    "日本",
    "données",
    "über",
    "ecosystem",
    "of",
    "to",
    "and",
    "in",
    "is",
    "evaluation",
]


def texts(count: int, seed: int, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def info() -> TokenizerInfo:
    return TokenizerInfo.from_directory(HF_DIR)


def encode(tokenizer: Tokenizer, text: str, eos: int) -> np.ndarray:
    return np.array(tokenizer.encode(text, add_special_tokens=False).ids + [eos], np.int32)


def write(path: Path, documents: list[Document], info: TokenizerInfo) -> str:
    with StoreWriter(path, info) as writer:
        writer.append(documents)
        writer.finish()
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer, info) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    plain = [Document(encode(tokenizer, t, info.eos_id), {}) for t in texts(40, seed=0)]
    # Megadocs: original, separator, rephrase 1, separator, rephrase 2 (the separator is the EOS token).
    megadocs = []
    for i, (original, one, two) in enumerate(zip(texts(12, 1), texts(12, 2), texts(12, 3))):
        parts = [encode(tokenizer, t, info.eos_id)[:-1] for t in (original, one, two)]
        sep = np.array([info.eos_id], np.int32)
        tokens = np.concatenate([parts[0], sep, parts[1], sep, parts[2], sep])
        segments = (
            Segment(SegmentKind.ORIGINAL, 0, parts[0].size),
            Segment(SegmentKind.SEPARATOR, 0, 1),
            Segment(SegmentKind.REPHRASE, 1, parts[1].size),
            Segment(SegmentKind.SEPARATOR, 0, 1),
            Segment(SegmentKind.REPHRASE, 2, parts[2].size),
            Segment(SegmentKind.SEPARATOR, 0, 1),
        )
        megadocs.append(Document(tokens, {"source_id": i}, segments))
    other = TokenizerInfo(name="other", hash="sha256:other", vocab_size=512, eos_id=1)
    return {
        "plain": write(root / "plain", plain, info),
        "mega": write(root / "mega", megadocs, info),
        "other": write(root / "other", plain[:5], other),
    }


def make_run(root: Path, model: dict, *, seed: int, seq_len: int = 64, eval_stores: dict | None = None) -> Path:
    """A run directory as training leaves one: config.yaml and checkpoints/7 (random, sharp weights)."""
    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        "model.compute_dtype=float32",
        "model.init_std=0.2",
        f"data.tokenizer={HF_DIR}",
        f"data.seq_len={seq_len}",
        f"data.eval_stores={json.dumps(eval_stores or {})}",
        "train.batch_size=4",
        f"train.run_dir={root}",
    ]
    config = config_lib.load(None, overrides)
    root.mkdir(parents=True)
    config_lib.dump(config, root / "config.yaml")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model_lib.create_sharded_model(config.model, mesh, seed))))
    with checkpoint.Checkpointer(root / "checkpoints", config.train) as saver:
        saver.save(7, {"step": np.int32(7), "params": params})
    return root


SMALL = {"size": "custom", "vocab_size": 512, "hidden": 32, "mlp": 64, "layers": 1, "heads": 2, "kv_heads": 1}
WIDE = {"size": "custom", "vocab_size": 512, "hidden": 48, "mlp": 96, "layers": 2, "heads": 4, "kv_heads": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stores) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "small": make_run(root / "small", SMALL, seed=1, eval_stores={"heldout": stores["plain"]}),
        "wide": make_run(root / "wide", WIDE, seed=2),
    }


def run_eval(tmp_path: Path, models: list[str], *overrides: str, devices: int = 1, **options) -> dict:
    options.setdefault("run_metrics", False)  # the module's runs stay as they are
    opts = cli.Options(
        models=models,
        out=str(tmp_path),
        progress=False,
        overrides=[f"data.seq_len={SEQ_LEN}", "train.batch_size=4", "mesh.data=-1", *overrides],
        **options,
    )
    return cli.evaluate(opts, jax.devices()[:devices])


def written_file(directory: Path, stem: str) -> Path:
    """The one JSON an evaluation wrote into a shared --out directory: STEM_<hash of the model path>.json."""
    (path,) = directory.glob(f"{stem}_*.json")
    assert len(path.stem) == len(stem) + 9
    return path


def test_two_models_of_the_same_directory_name_write_two_files(tmp_path, stores):
    for parent in ("a", "b"):
        shutil.copytree(HF_DIR, tmp_path / parent / "llama")
        model = [str(tmp_path / parent / "llama")]
        value = run_eval(tmp_path / "out", model, recipes=["concat"], stores={"plain": stores["plain"]})
        assert value["models"][0]["kind"] == "hf"
    assert len(list((tmp_path / "out").glob("llama_*.json"))) == 2


def result(value: dict, store: str, recipe: str) -> dict:
    (found,) = [r for r in value["results"] if r["store"] == store and r["recipe"] == recipe]
    return found


# --------------------------------------------------------------------------------------------------
# References: transformers' LlamaForCausalLM and full logits of our Decoder
# --------------------------------------------------------------------------------------------------


def reference_windows(store: StoreReader, recipe: str, stride: int) -> list[tuple[list[int], list[int], int]]:
    """(inputs, targets, first scored index) of every window, written out directly from the recipe's text."""
    tokens = store.read_windows([0], store.num_tokens)[0].tolist()
    windows = []
    if recipe == "concat":
        for i in range(store.num_tokens // SEQ_LEN):
            chunk = tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN]
            windows.append((chunk[:-1], chunk[1:], 0))
        return windows
    for d in range(store.num_documents):
        doc = tokens[store.offsets[d] : store.offsets[d + 1]]
        extended = [store.eos_id] + doc  # target j of the document is extended[j + 1]
        scored = 0
        while scored < len(doc):
            end = min(scored + stride, len(doc)) if scored else min(SEQ_LEN, len(doc))
            start = max(end - SEQ_LEN, 0)
            windows.append((extended[start:end], extended[start + 1 : end + 1], scored - start))
            scored = end
    return windows


def torch_loss(model_dir: Path, windows) -> tuple[float, int, list[int]]:
    """(summed loss, scored tokens, the scored target ids) of LlamaForCausalLM on each window alone."""
    import torch
    import transformers

    llama = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count, targets_seen = 0.0, 0, []
    with torch.no_grad():
        for inputs, targets, first in windows:
            logits = llama(torch.tensor([inputs])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs[torch.arange(len(targets)), torch.tensor(targets)]
            total -= float(picked[first:].sum())
            count += len(targets) - first
            targets_seen += targets[first:]
    return total, count, targets_seen


@pytest.mark.parametrize("recipe", loss_windows.RECIPES)
def test_both_recipes_give_the_loss_of_transformers_llama_on_the_recipe_windows(tmp_path, stores, recipe):
    pytest.importorskip("torch", reason="the reference loss is transformers' PyTorch Llama")
    value = run_eval(tmp_path, [str(HF_DIR)], stores={"plain": stores["plain"]}, recipes=(recipe,), stride=8)
    got = result(value, "plain", recipe)
    store = StoreReader.open(stores["plain"])
    windows = reference_windows(store, recipe, stride=8)
    assert recipe == "concat" or any(len(t) == SEQ_LEN for _, t, first in windows if first)  # long documents
    want_sum, want_tokens, targets = torch_loss(HF_DIR, windows)
    assert got["tokens"] == want_tokens
    np.testing.assert_allclose(got["loss"], want_sum / want_tokens, rtol=2e-6)
    table = token_byte_lengths(HF_DIR, 512)
    assert got["bytes"] == int(table[targets].sum())
    np.testing.assert_allclose(got["bpb"], want_sum / math.log(2) / got["bytes"], rtol=2e-6)
    assert got["stride"] == (8 if recipe == "document" else None) and got["seq_len"] == SEQ_LEN
    assert value["models"][0]["kind"] == "hf" and value["ensemble"] is None
    prefix = "eval/plain" if recipe == "concat" else "eval/plain/document"
    assert got["metrics"][f"{prefix}/loss"] == got["loss"] and got["metrics"][f"{prefix}/bpb"] == got["bpb"]
    # The JSON on disk is what was returned; versions and the resolved config are in it.
    on_disk = json.loads(written_file(tmp_path, "lm_eval_model").read_text())
    assert on_disk["results"] == json.loads(json.dumps(value["results"]))
    assert (
        set(on_disk["versions"]) >= {"jax", "flax", "megadoc_jax"} and on_disk["config"]["data"]["seq_len"] == SEQ_LEN
    )


def test_token_bytes_add_up_to_the_utf8_length_of_the_text(tokenizer):
    table = token_byte_lengths(HF_DIR, 512)
    for text in texts(20, seed=9) + ["ß€𝄞 mixed  spaces\n\ttabs", "日本語のテキスト"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    assert table[1] == 0 and table[0] == 0  # </s> and <s>: special, no bytes


def test_document_recipe_scores_every_token_once_with_the_stated_context(stores):
    store = StoreReader.open(stores["plain"])
    stride = 8
    plan = loss_windows.document_plan(store, SEQ_LEN, stride)
    assert np.diff(store.offsets).max() > 2 * SEQ_LEN  # documents that need several windows
    tokens = store.read_windows([0], store.num_tokens)[0]
    seen = np.zeros(store.num_tokens, np.int64)
    for b in range(plan.num_batches(4)):
        rows = plan.read_batch(store, b, 4)
        scored = rows.batch["loss_mask"] > 0
        target = rows.target_index_BxL[scored]
        np.add.at(seen, target, 1)
        np.testing.assert_array_equal(rows.batch["targets"][scored], tokens[target])
        document = np.searchsorted(store.offsets, target, side="right") - 1
        position = target - store.offsets[document]
        np.testing.assert_array_equal(rows.document_position_BxL[scored], position)
        # Left context in the window (the EOS separator included): all there is, or seq_len - stride at least.
        context = rows.batch["positions"][scored]
        assert np.all((context == position) | (context >= SEQ_LEN - stride))
        # The input before each target is the token before it in its document, or the EOS separator.
        inputs = rows.batch["inputs"][scored]
        np.testing.assert_array_equal(inputs, np.where(position == 0, store.eos_id, tokens[np.maximum(target - 1, 0)]))
    np.testing.assert_array_equal(seen, 1)  # every token of every document, exactly once


def test_loss_by_position_and_by_segment_on_a_megadoc_store(tmp_path, stores, runs):
    value = run_eval(tmp_path, [str(runs["small"])], stores={"mega": stores["mega"]}, recipes=("document",))
    got = result(value, "mega", "document")
    store = StoreReader.open(stores["mega"])
    # Every token is scored once (document recipe): segment token counts are the segment lengths.
    want = {}
    for d in range(store.num_documents):
        for seg in store.document(d).segments:
            label = seg.kind.name.lower() + (f"_{seg.index}" if seg.kind == SegmentKind.REPHRASE else "")
            want[label] = want.get(label, 0) + seg.length
    assert {s["segment"]: s["tokens"] for s in got["by_segment"]} == want
    assert got["tokens"] == store.num_tokens
    edges = [b["from"] for b in got["by_position"]]
    assert edges[:4] == [0, 1, 2, 4] and all(b["to"] is None or b["to"] <= SEQ_LEN for b in got["by_position"])
    lengths = np.diff(store.offsets)
    assert got["by_position"][0]["tokens"] == store.num_documents  # position 0: one per document
    assert sum(b["tokens"] for b in got["by_position"]) == lengths.sum()
    assert (got["by_position"][-1]["to"] is None) == bool((lengths > SEQ_LEN).any())
    # The figures are token-weighted parts of the loss.
    for parts in (got["by_position"], got["by_segment"]):
        np.testing.assert_allclose(sum(p["loss"] * p["tokens"] for p in parts) / got["tokens"], got["loss"], rtol=1e-12)
    assert "eval/mega/document/segment/rephrase_2/loss" in got["metrics"]


# --------------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------------


def full_logits_loss(run_dirs: list[Path], store_path: str, mode: str) -> float:
    """The concat loss of an ensemble from each member's full [B, L, V] fp32 logits."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])
    store = StoreReader.open(store_path)
    windows = reference_windows(store, "concat", SEQ_LEN)
    inputs = np.array([w[0] for w in windows], np.int32)
    targets = np.array([w[1] for w in windows], np.int32)
    positions = np.broadcast_to(np.arange(SEQ_LEN - 1, dtype=np.int32), inputs.shape)
    decoders = [hf.import_llama(d, mesh)[0] if d == HF_DIR else checkpoint.load_run(d, mesh).model for d in run_dirs]
    logits = [np.asarray(decoder(inputs, positions), np.float64) for decoder in decoders]
    if mode == "mean_logits":
        log_probs = jax.nn.log_softmax(np.mean(logits, axis=0), axis=-1)
    else:
        log_probs = np.log(np.mean([jax.nn.softmax(lg, axis=-1) for lg in logits], axis=0))
    picked = np.take_along_axis(np.asarray(log_probs), targets[..., None], axis=-1)[..., 0]
    return -float(picked.mean())


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs"])
def test_an_ensemble_of_two_sizes_equals_the_reference_from_full_logits(tmp_path, stores, runs, mode):
    members = [str(runs["small"]), str(runs["wide"])]
    value = run_eval(tmp_path, members, stores={"plain": stores["plain"]}, recipes=("concat",), ensemble=mode)
    got = result(value, "plain", "concat")
    if mode == "mean_logits":  # a run and a Hugging Face Llama directory in one ensemble
        mixed = run_eval(tmp_path, [members[0], str(HF_DIR)], stores={"plain": stores["plain"]}, ensemble=mode)
        want = full_logits_loss([runs["small"], HF_DIR], stores["plain"], mode)
        np.testing.assert_allclose(result(mixed, "plain", "concat")["loss"], want, rtol=1e-5)
        assert [m["kind"] for m in mixed["models"]] == ["run", "hf"]
    np.testing.assert_allclose(
        got["loss"], full_logits_loss([runs["small"], runs["wide"]], stores["plain"], mode), rtol=1e-5
    )
    assert value["ensemble"] == {"mode": mode, "members": 2}
    assert [m["step"] for m in value["models"]] == [7, 7]
    assert written_file(tmp_path, f"ensemble_{mode}_2_small_step_7").is_file()
    single = [full_logits_loss([runs[k]], stores["plain"], mode) for k in ("small", "wide")]
    assert abs(got["loss"] - single[0]) > 1e-3 and abs(got["loss"] - single[1]) > 1e-3  # a real combination


def test_an_ensemble_of_one_is_the_model(tmp_path, stores, runs):
    alone = run_eval(tmp_path / "a", [str(runs["small"])], stores={"plain": stores["plain"]}, recipes=("concat",))
    one = run_eval(
        tmp_path / "b",
        [str(runs["small"])],
        stores={"plain": stores["plain"]},
        recipes=("concat",),
        ensemble="mean_logits",
    )
    assert result(one, "plain", "concat")["loss"] == result(alone, "plain", "concat")["loss"]
    assert one["ensemble"] == {"mode": "mean_logits", "members": 1} and alone["ensemble"] is None


# --------------------------------------------------------------------------------------------------
# Determinism: devices and meshes, a rerun in a new process; the run's metrics
# --------------------------------------------------------------------------------------------------


def figures(value: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "metrics"} for r in value["results"]]


def test_one_device_and_eight_with_ring_attention_give_the_same_numbers(tmp_path, stores, runs):
    kwargs = dict(stores={"plain": stores["plain"], "mega": stores["mega"]})
    one = run_eval(tmp_path / "one", [str(runs["wide"])], **kwargs)
    eight = run_eval(
        tmp_path / "eight",
        [str(runs["wide"])],
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.context=2",
        "model.attention=ring",
        devices=8,
        **kwargs,
    )
    assert eight["devices"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "context": 2}
    assert_same_figures(one, eight)


def assert_same_figures(one: dict, other: dict) -> None:
    """The same results: counts exactly, losses to fp32 rounding (another mesh sums in another order)."""
    assert len(one["results"]) == len(other["results"])
    for a, b in zip(figures(one), figures(other)):
        assert (a["store"], a["recipe"], a["tokens"], a["bytes"]) == (b["store"], b["recipe"], b["tokens"], b["bytes"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        for part in ("by_segment", "by_position"):
            assert [p["tokens"] for p in a[part]] == [p["tokens"] for p in b[part]]
            np.testing.assert_allclose([p["loss"] for p in a[part]], [p["loss"] for p in b[part]], rtol=1e-5)


@pytest.mark.slow
def test_a_rerun_in_a_new_process_gives_identical_numbers_and_appends_the_run_metrics_once(tmp_path, stores, runs):
    run = tmp_path / "run"
    shutil.copytree(runs["small"], run)
    args = ["--model", str(run), "--no-progress", f"data.seq_len={SEQ_LEN}", "train.batch_size=8", "mesh.data=-1"]
    assert cli.main([*args, "--out", str(tmp_path / "first")]) == 0  # the run's data.eval_stores: heldout
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "megadoc_jax.evaluate", *args, "--out", str(tmp_path / "second")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "eval/heldout/loss" in done.stdout
    first, second = (json.loads(written_file(tmp_path / d, "run_step_7").read_text()) for d in ("first", "second"))
    assert figures(first) == figures(second)  # bit for bit
    records = metrics.read_metrics(run).records
    assert [r["step"] for r in records] == [7]  # the rerun's identical figures are not appended again
    assert "figures appended at step 7" in done.stdout and "0 figures appended" in done.stdout
    assert records[0]["eval/heldout/loss"] == result(first, "heldout", "concat")["loss"]
    assert records[0]["eval/heldout/document/loss"] == result(first, "heldout", "document")["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["mesh.data=-1"], ["mesh.data=4", "mesh.context=2", "model.attention=ring"]])
def test_two_processes_give_the_figures_of_one(tmp_path, stores, runs, mesh):
    """Each process scores the rows its devices hold; the scores are gathered (RowScorer.fetch) and
    process 0 writes the JSON: the figures of one process on one device."""
    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two"
    job = ["-m", "megadoc_jax.evaluate", "--model", str(runs["small"]), f"--store=mega={stores['mega']}"]
    job += ["--no-progress", "--no-run-metrics", "--out", str(out), f"data.seq_len={SEQ_LEN}", "train.batch_size=8"]
    processes = [start_python([*job, *mesh], devices=4, env=distributed_env(coordinator, 2, i)) for i in range(2)]
    for p in processes:
        output, _ = p.communicate(timeout=400)
        assert p.returncode == 0, output
    (two,) = [json.loads(f.read_text()) for f in out.glob("*.json")]  # process 0 only
    assert two["devices"]["count"] == 8
    one = run_eval(tmp_path / "one", [str(runs["small"])], "train.batch_size=8", stores={"mega": stores["mega"]})
    assert one["devices"]["count"] == 1
    assert_same_figures(one, two)


# --------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and a message naming the path or key
# --------------------------------------------------------------------------------------------------


def bad(capsys, *args: str) -> str:
    assert cli.main(["--no-progress", *args, "train.batch_size=8"]) == 2
    return capsys.readouterr().err


def test_bad_input_exits_2_naming_the_path_or_key(tmp_path, capsys, stores, runs):
    small = str(runs["small"])
    plain = f"--store=plain={stores['plain']}"
    assert "does not exist" in bad(capsys, "--model", str(tmp_path / "nope"), plain)
    assert "no committed checkpoint of step 3" in bad(capsys, "--model", f"{small}:3", plain)

    partial = tmp_path / "partial"
    shutil.copytree(small, partial)
    (partial / "checkpoints" / "7" / "default" / "_METADATA").unlink()
    assert "partial or foreign checkpoint" in bad(capsys, "--model", str(partial), plain)

    other = bad(capsys, "--model", small, f"--store=other={stores['other']}")
    assert "--store other" in other and stores["other"] in other and "tokenizer" in other

    mismatch = tmp_path / "mismatch"
    shutil.copytree(small, mismatch)
    raw = yaml.safe_load((mismatch / "config.yaml").read_text())
    raw["model"]["hidden"] = 40
    (mismatch / "config.yaml").write_text(yaml.safe_dump(raw))
    message = bad(capsys, "--model", str(mismatch), plain)
    assert "does not match the model of" in message and "config.yaml" in message

    long = bad(capsys, "--model", small, plain, "data.seq_len=65")
    assert "data.seq_len" in long and "longer than the context" in long and small in long
    assert "model.hidden" in bad(capsys, "--model", small, plain, "model.hidden=16")
    assert "neither a megadoc_jax run" in bad(capsys, "--model", str(tmp_path), plain)


def test_several_models_without_ensemble_are_evaluated_one_by_one(tmp_path, stores, runs):
    args = ["--model", str(runs["small"]), "--model", f"{runs['wide']}:7", f"--store=plain={stores['plain']}"]
    options = ["--recipe", "concat", "--out", str(tmp_path), "--no-run-metrics", "--no-progress"]
    assert cli.main([*args, *options, f"data.seq_len={SEQ_LEN}", "train.batch_size=8"]) == 0
    written = {p.name.rsplit("_", 1)[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(written) == {"small_step_7", "wide_step_7"}
    assert all(v["ensemble"] is None and len(v["models"]) == 1 for v in written.values())
    assert not (runs["small"] / metrics.JSONL_NAME).exists()  # --no-run-metrics


def test_an_ensemble_on_eight_devices_with_tensor_and_ring_context_axes_matches_one_device(tmp_path, stores, runs):
    members = [str(runs["small"]), str(runs["wide"])]
    kwargs = dict(stores={"mega": stores["mega"]}, ensemble="mean_probs")
    one = run_eval(tmp_path / "one", members, **kwargs)
    mesh = ("mesh.data=2", "mesh.tensor=2", "mesh.context=2", "model.attention=ring")
    eight = run_eval(tmp_path / "eight", members, *mesh, devices=8, **kwargs)
    for a, b in zip(figures(one), figures(eight)):
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(
            [p["loss"] for p in a["by_segment"]], [p["loss"] for p in b["by_segment"]], rtol=1e-5
        )


# --------------------------------------------------------------------------------------------------
# Downstream benchmarks through the command line
# --------------------------------------------------------------------------------------------------

FIXTURE_DIR = REPO / "tests" / "data"


def test_benchmarks_through_the_command_line_are_lm_evals(tmp_path):
    """--benchmarks with the lm-eval fixture's model (a Hugging Face directory): the JSON's figures equal
    lm-eval's aggregates, the paper's average included, and the summary names chance."""
    fixture = json.loads((FIXTURE_DIR / "lm_eval_fixture.json").read_text())
    argv = ["--model", str(FIXTURE_DIR / "lm_eval_model"), "--benchmarks", str(FIXTURE_DIR / "benchmarks")]
    argv += ["--out", str(tmp_path), "--no-progress", "model.compute_dtype=float32", "train.batch_size=8"]
    assert cli.main(argv) == 0
    (written,) = tmp_path.glob("*.json")
    value = json.loads(written.read_text())
    benchmarks = value["benchmarks"]
    for task, expected in fixture["zero_shot"].items():
        assert benchmarks["tasks"][task]["metrics"] == expected["metrics"], task
        assert benchmarks["tasks"][task]["stderr"] == lm_evals_float_sum(expected["stderr"]), task
    assert benchmarks["paper_average"]["acc"] == lm_evals_float_sum(fixture["paper3"]["metrics"]["acc"])
    assert benchmarks["tasks"]["arc_easy"]["chance"] == pytest.approx(0.25, abs=0.05)
    summary = "\n".join(report.summary_lines(value))  # what the command prints
    assert "paper average acc (arc_easy, piqa, sciq)" in summary and "(chance 0.25" in summary


def test_benchmarks_need_known_tasks_and_a_tokenizer(tmp_path, capsys):
    model = ["--model", str(FIXTURE_DIR / "lm_eval_model"), "--out", str(tmp_path), "--no-progress"]
    assert cli.main([*model, "--benchmarks", str(FIXTURE_DIR / "benchmarks"), "--tasks", "arc_easy,mmlu"]) == 2
    assert "unknown tasks ['mmlu']" in capsys.readouterr().err
    assert cli.main([*model, "--benchmarks", str(tmp_path / "empty")]) == 2
    assert "no task directory" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs"])
def test_an_ensemble_of_one_model_twice_scores_the_benchmarks_as_the_model(tmp_path, mode):
    """Two identical members average to the model itself: the ensemble scorer's figures equal lm-eval's."""
    fixture = json.loads((FIXTURE_DIR / "lm_eval_fixture.json").read_text())
    model = str(FIXTURE_DIR / "lm_eval_model")
    argv = ["--model", model, "--model", model, "--ensemble", mode, "--benchmarks", str(FIXTURE_DIR / "benchmarks")]
    argv += ["--tasks", "arc_easy,piqa", "--out", str(tmp_path), "--no-progress", "model.compute_dtype=float32"]
    assert cli.main([*argv, "train.batch_size=8"]) == 0
    (written,) = tmp_path.glob("*.json")
    value = json.loads(written.read_text())
    assert value["ensemble"] == {"mode": mode, "members": 2}
    for task in ("arc_easy", "piqa"):
        assert value["benchmarks"]["tasks"][task]["metrics"] == fixture["zero_shot"][task]["metrics"], task
