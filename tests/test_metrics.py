"""Tests of megadoc_jax.metrics and its device table (megadoc_jax.hardware): FLOP formula (hand counts and XLA's
count), MFU, device table, writers."""

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from megadoc_jax import hardware, metrics
from megadoc_jax.config import ModelConfig
from megadoc_jax.model import count_parameters

GIB = 2**30


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def test_train_flops_hand_count_small_config():
    cfg = ModelConfig(hidden=64, mlp=192, layers=2, heads=4, kv_heads=2, vocab_size=512)
    # head_size = 64 / 4 = 16; q and o are 64 x (4*16) = 4096 each; k and v are 64 x (2*16) = 2048 each.
    attention = 4096 + 2048 + 2048 + 4096  # 12288
    mlp = 3 * 64 * 192  # gate, up, down: 36864
    unembed = 64 * 512  # 32768
    n_matmul = 2 * (attention + mlp) + unembed  # 2 * 49152 + 32768 = 131072
    assert metrics.matmul_params(cfg) == n_matmul == 131_072
    # Causal attention at seq_len 128: 12 * 2 layers * 128 * 4 heads * 16 / 2 = 98304.
    attention_flops = 12 * 2 * 128 * 4 * 16 // 2
    assert metrics.attention_flops_per_token(cfg, 128) == attention_flops == 98_304
    assert metrics.train_flops_per_token(cfg, 128) == 6 * 131_072 + 98_304 == 884_736
    # All parameters add the input embedding (512 * 64) and the norms ((2 * 2 + 1) * 64).
    assert count_parameters(cfg) == 131_072 + 32_768 + 320


def test_train_flops_paper_300m_worked_example():
    # The worked example of docs/performance.md: the paper's main model at its context length 4096.
    cfg = ModelConfig(size="300m", hidden=768, mlp=2688, layers=12, heads=12, kv_heads=12, vocab_size=128_256)
    per_layer = 4 * 768 * 768 + 3 * 768 * 2688  # 2,359,296 + 6,193,152 = 8,552,448
    n_matmul = 12 * per_layer + 768 * 128_256  # 102,629,376 + 98,500,608 = 201,129,984
    assert metrics.matmul_params(cfg) == n_matmul == 201_129_984
    attention_flops = 6 * 12 * 4096 * 12 * 64  # 226,492,416
    assert metrics.train_flops_per_token(cfg, 4096) == 6 * n_matmul + attention_flops == 1_433_272_320


def test_train_flops_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        metrics.train_flops_per_token(ModelConfig(), 0)


def _reference_decoder_loss(params, tokens_BxL, cfg: ModelConfig):
    """A plain jnp Llama-layout decoder (unscaled RMSNorm, SwiGLU, GQA) for XLA to count FLOPs of."""
    B, L = tokens_BxL.shape
    hd, groups = cfg.head_size, cfg.heads // cfg.kv_heads
    x_BxLxD = params["embed"][tokens_BxL]
    mask_LxL = jnp.tril(jnp.ones((L, L), bool))
    for layer in params["layers"]:
        h_BxLxD = x_BxLxD * jax.lax.rsqrt(jnp.mean(x_BxLxD**2, -1, keepdims=True) + 1e-5)
        q_BxLxHxK = (h_BxLxD @ layer["q"]).reshape(B, L, cfg.heads, hd)
        k_BxLxGxK = (h_BxLxD @ layer["k"]).reshape(B, L, cfg.kv_heads, hd)
        v_BxLxGxK = (h_BxLxD @ layer["v"]).reshape(B, L, cfg.kv_heads, hd)
        k_BxLxHxK = jnp.repeat(k_BxLxGxK, groups, axis=2)
        v_BxLxHxK = jnp.repeat(v_BxLxGxK, groups, axis=2)
        scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / np.sqrt(hd)
        probs_BxHxLxL = jax.nn.softmax(jnp.where(mask_LxL, scores_BxHxLxL, -1e9), axis=-1)
        attn_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
        x_BxLxD = x_BxLxD + attn_BxLxHxK.reshape(B, L, -1) @ layer["o"]
        h_BxLxD = x_BxLxD * jax.lax.rsqrt(jnp.mean(x_BxLxD**2, -1, keepdims=True) + 1e-5)
        x_BxLxD = x_BxLxD + (jax.nn.silu(h_BxLxD @ layer["gate"]) * (h_BxLxD @ layer["up"])) @ layer["down"]
    logits_BxLxV = x_BxLxD @ params["unembed"]
    return -jnp.mean(jax.nn.log_softmax(logits_BxLxV)[..., 0])


def test_train_flops_matches_xla_count_of_a_reference_decoder():
    """XLA counts the full L x L attention (masking skips no work): expect 6N + 2 * causal attention."""
    cfg = ModelConfig(hidden=64, mlp=192, layers=1, heads=4, kv_heads=2, vocab_size=256)
    B, L, D, F, hd = 2, 64, cfg.hidden, cfg.mlp, cfg.head_size
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    layer = dict(
        q=f32(D, cfg.heads * hd),
        k=f32(D, cfg.kv_heads * hd),
        v=f32(D, cfg.kv_heads * hd),
        o=f32(cfg.heads * hd, D),
        gate=f32(D, F),
        up=f32(D, F),
        down=f32(F, D),
    )
    params = dict(embed=f32(cfg.vocab_size, D), layers=[layer] * cfg.layers, unembed=f32(D, cfg.vocab_size))
    tokens = jax.ShapeDtypeStruct((B, L), jnp.int32)
    grad_fn = jax.jit(jax.grad(_reference_decoder_loss), static_argnums=2)
    xla_flops = grad_fn.lower(params, tokens, cfg).compile().cost_analysis()["flops"]
    expected_matmul_flops = B * L * (6 * metrics.matmul_params(cfg) + 2 * metrics.attention_flops_per_token(cfg, L))
    # The rest is elementwise work (softmax, norms, SiLU, the loss) that model FLOPs leave out.
    assert 1.0 <= xla_flops / expected_matmul_flops < 1.1, (xla_flops, expected_matmul_flops)


# --------------------------------------------------------------------------------------------------
# Peak table and MFU
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_kind, name, peak_per_device, hbm_per_device",
    [
        ("TPU v4", "TPU v4", 275e12, 32 * GIB),
        ("TPU v5 lite", "TPU v5e", 197e12, 16 * GIB),
        ("TPU v5", "TPU v5p", 459e12, 95 * GIB),
        ("TPU v5p", "TPU v5p", 459e12, 95 * GIB),
        ("TPU v6 lite", "TPU v6e", 918e12, 32 * GIB),
        ("TPU7x", "TPU7x", 2307e12 / 2, 96 * GIB),  # two TensorCores, two devices per chip
        ("TPU v3", "TPU v3", 61.5e12, 16 * GIB),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12, 80 * GIB),
        ("NVIDIA H200", "H200 SXM", 989e12, 141 * GIB),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312e12, 40 * GIB),
    ],
)
def test_device_kind_lookup(device_kind, name, peak_per_device, hbm_per_device):
    acc = hardware.accelerator(device_kind)
    assert acc is not None and acc.name == name and acc.source
    assert hardware.peak_flops_per_device(device_kind) == pytest.approx(peak_per_device)
    assert hardware.hbm_bytes_per_device(device_kind) == hbm_per_device


def test_device_kind_lookup_unknown_and_cpu():
    assert hardware.accelerator("cpu") is None
    assert hardware.peak_flops_per_device(jax.devices()[0].device_kind) is None
    assert hardware.hbm_bytes_per_device("NVIDIA GeForce RTX 4090") is None


def test_device_kinds_are_unambiguous():
    kinds = [kind for acc in hardware.ACCELERATORS for kind in acc.device_kinds]
    assert len(kinds) == len(set(kinds))


def test_tpu_generations_of_the_table():
    # The topology names aot.tpu_topology_devices accepts, each with the chip mode of its runtime:
    # megacore chips (v4, v5p) are one device.
    assert sorted(hardware.TPU_GENERATIONS) == ["tpu7x", "v2", "v3", "v4", "v5e", "v5p", "v6e"]
    for generation, acc in hardware.TPU_GENERATIONS.items():
        assert acc.name.startswith("TPU") and acc.source.endswith(f"/tpu/docs/{generation}")
        assert acc.tpu_chip_config in ("default", "megacore")
        if acc.tpu_chip_config == "megacore":
            assert acc.devices_per_chip == 1
    assert {g for g, acc in hardware.TPU_GENERATIONS.items() if acc.tpu_chip_config == "megacore"} == {"v4", "v5p"}
    assert all(not acc.tpu_generation for acc in hardware.ACCELERATORS if not acc.name.startswith("TPU"))


def test_hardware_imports_no_jax():
    import subprocess
    import sys

    code = "import sys, megadoc_jax.hardware, megadoc_jax.config; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _doc_table(first_header_cell: str) -> list[list[str]]:
    """Rows of the docs/performance.md table whose header starts with `first_header_cell`."""
    lines = (Path(__file__).parents[1] / "docs" / "performance.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_docs_peak_table_matches_code():
    rows = _doc_table("chip")
    assert [row[0] for row in rows] == [acc.name for acc in hardware.ACCELERATORS]
    for row, acc in zip(rows, hardware.ACCELERATORS):
        assert tuple(kind.strip(" `") for kind in row[1].split(",")) == acc.device_kinds
        assert float(row[2]) * 1e12 == acc.peak_bf16_flops_per_chip
        assert int(row[3]) * GIB == acc.hbm_bytes_per_chip
        assert int(row[4]) == acc.devices_per_chip
        topology = f"`{acc.tpu_generation}` ({acc.tpu_chip_config})" if acc.tpu_generation else "-"
        assert row[5] == topology


def test_docs_model_size_table_matches_code():
    from megadoc_jax import config

    for size, params, n_matmul, per_token, *_ in _doc_table("size"):
        cfg = config.from_dict({"model": {"size": size}}).model
        as_int = lambda text: int(text.replace(",", ""))  # noqa: E731
        assert count_parameters(cfg) == as_int(params)
        assert metrics.matmul_params(cfg) == as_int(n_matmul)
        assert metrics.train_flops_per_token(cfg, 4096) == as_int(per_token)


def test_mfu_arithmetic():
    # 64 sequences of 4096 tokens in 2 s on 4 v5e chips, at 1e9 FLOPs per token:
    # 262144 tokens / 2 s = 131072 tokens/s; 131072 * 1e9 / 4 = 3.2768e13 FLOP/s per device;
    # MFU = 3.2768e13 / 1.97e14 = 0.166335...
    out = metrics.throughput_scalars(
        tokens=64 * 4096,
        seconds=2.0,
        flops_per_token=1e9,
        num_devices=4,
        peak_flops_per_device=hardware.peak_flops_per_device("TPU v5 lite"),
    )
    assert out == {
        "tokens_per_s": 131_072,
        "tflops_per_device": pytest.approx(32.768),
        "mfu": pytest.approx(3.2768e13 / 1.97e14),
    }


def test_mfu_is_absent_without_a_peak_and_bad_input_is_refused():
    out = metrics.throughput_scalars(
        tokens=100, seconds=0.5, flops_per_token=10.0, num_devices=2, peak_flops_per_device=None
    )
    assert out == {"tokens_per_s": 200.0, "tflops_per_device": 1e-9}
    with pytest.raises(ValueError, match="seconds"):
        metrics.throughput_scalars(
            tokens=1, seconds=0.0, flops_per_token=1.0, num_devices=1, peak_flops_per_device=None
        )


class _FakeDevice:
    device_kind = "TPU v5 lite"


def test_throughput_over_steps_excludes_the_first_interval():
    cfg = ModelConfig(hidden=64, mlp=192, layers=2, heads=4, kv_heads=2, vocab_size=512)
    times = iter([100.0, 110.0, 121.0, 133.0])  # step 1 is read back at t=100, after its compile
    meter = metrics.Throughput(cfg, 128, 8, [_FakeDevice()] * 4, clock=lambda: next(times))
    meter.add(1000.0)
    assert meter.report() == {}  # only the clock started
    for loss_tokens in (1000.0, 1000.0, 900.0):
        meter.add(loss_tokens)
    # Three steps of 8 * 128 = 1024 tokens in 133 - 100 = 33 s: 3072 / 33 tokens/s; per device
    # 3072 / 33 * 884736 (the hand count above) / 4 FLOP/s; MFU against v5e's 197e12.
    tokens_per_s = 3 * 1024 / 33
    assert meter.report() == {
        "tokens_per_s": pytest.approx(tokens_per_s),
        "tflops_per_device": pytest.approx(tokens_per_s * 884_736 / 4 / 1e12),
        "mfu": pytest.approx(tokens_per_s * 884_736 / 4 / 197e12),
        "loss_tokens_per_s": pytest.approx(2900 / 33),
        "step_time_s": pytest.approx(11.0),
    }
    assert meter.report() == {}  # counts reset after a report


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _read_event_scalars(directory: Path) -> list[tuple[int, str, float]]:
    """Read TFRecord event files (length, masked CRCs, Event protos) with CRC checks: (step, tag, value)."""

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars = []
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked(header)
            payload = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked(payload)
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        for step in (1, 2, 3):
            loss = jax.device_get(jnp.float32(4.0 - step))  # a 0-d NumPy array, as from a real step
            writer.write(step, {"train/loss": loss, "train/lr": np.float32(0.5) * step})
    log = metrics.read_metrics(tmp_path)
    assert log.unreadable_lines == []
    assert [(r["step"], r["train/loss"], r["train/lr"]) for r in log.records] == [
        (1, 3.0, 0.5),
        (2, 2.0, 1.0),
        (3, 1.0, 1.5),
    ]
    lines = (tmp_path / metrics.JSONL_NAME).read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    events = _read_event_scalars(tmp_path / metrics.TENSORBOARD_DIR)
    assert sorted(e for e in events if e[1] == "train/loss") == [
        (1, "train/loss", 3.0),
        (2, "train/loss", 2.0),
        (3, "train/loss", 1.0),
    ]
    assert len(events) == 6


def test_metrics_writer_resume_after_kill_mid_line(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)})
    with (tmp_path / metrics.JSONL_NAME).open("a") as f:
        f.write('{"step": 4, "loss": 4.')  # a kill in the middle of a record
    # Resume from the checkpoint of step 2: steps 3 and 4 of the first attempt are superseded.
    with metrics.MetricsWriter(tmp_path, start_step=2, enabled=True) as writer:
        writer.write(3, {"loss": 30.0})
    log = metrics.read_metrics(tmp_path / metrics.JSONL_NAME)
    assert [(r["step"], r["loss"]) for r in log.records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert log.unreadable_lines == [5]  # open, 1, 2, 3, then the cut line


def test_a_final_evaluation_recorded_again_by_the_resumed_attempt_replaces_the_first(tmp_path):
    # A kill after the final evaluation was logged, before the run was marked done: the next attempt
    # resumes from the final checkpoint and evaluates again at the same step.
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(6, {"loss": 1.0})
        writer.write(6, {"eval/heldout/loss": 4.5})
    with metrics.MetricsWriter(tmp_path, start_step=6, enabled=True) as writer:
        writer.write(6, {"eval/heldout/loss": 4.25})
    log = metrics.read_metrics(tmp_path)
    assert [(r["step"], r.get("loss"), r.get("eval/heldout/loss")) for r in log.records] == [
        (6, 1.0, None),
        (6, None, 4.25),
    ]
    # Within one attempt nothing is merged: two records of one step with the same names both stay.
    with metrics.MetricsWriter(tmp_path / "one", enabled=True) as writer:
        writer.write(3, {"loss": 1.0})
        writer.write(3, {"loss": 2.0})
    assert [r["loss"] for r in metrics.read_metrics(tmp_path / "one").records] == [1.0, 2.0]


def test_metrics_writer_refuses_device_values_and_reserved_names(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        with pytest.raises(TypeError, match="'loss' is a .*device_get"):
            writer.write(1, {"loss": jnp.float32(1.0)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(1, {"step": 1.0})


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    with metrics.MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------------


def test_progress_line():
    values = {
        "loss": 3.45123,
        "z_loss": 0.0,
        "grad_norm": 0.8123,
        "learning_rate": 2.95e-3,
        "tokens_per_s": 12_345.0,
        "mfu": 0.4121,
        "step_time_s": 4.25,
    }
    line = metrics.progress_line(120, 1000, values)
    # ETA: 880 steps left at 4.25 s = 3740 s = 1h02m.
    assert line == "step  120/1000 | loss 3.4512 | gnorm 0.812 | lr 2.95e-03 | 12.3k tok/s | MFU 41.2% | ETA 1h02m"
    assert metrics.progress_line(5, 10, {"loss": 2.0}) == "step  5/10 | loss 2.0000"


def test_format_duration():
    assert [metrics.format_duration(s) for s in (45, 200, 3725, 2 * 86400 + 3 * 3600)] == [
        "45s",
        "3m20s",
        "1h02m",
        "2d03h",
    ]
