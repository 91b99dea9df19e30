"""Training metrics: model FLOPs per token, MFU (peaks from megadoc_jax.hardware), and writers.

The FLOP count is the standard "model FLOPs" of a decoder-only transformer (PaLM, appendix B):

    flops_per_token = 6 * N_matmul + 6 * layers * seq_len * heads * head_size

* 6 * N_matmul: every matmul weight is used once per token in the forward pass (one multiply and one
  add: 2 FLOPs per weight) and twice in the backward pass (gradient of the input and of the weight:
  4 FLOPs), so training costs 6 FLOPs per weight per token. N_matmul counts every matmul weight:
  q, k, v, o projections, the three SwiGLU matrices, and the unembedding. It leaves out the input
  embedding (a lookup, not a matmul) and the RMSNorm scales.
* Attention scores and the weighted sum of values are matmuls without weights: per layer, head and
  query token, q.k over seq_len keys costs 2 * seq_len * head_size FLOPs, and the sum over values as
  much again: 4 * seq_len * heads * head_size per layer forward, 12 * ... with the backward pass.
  A causal mask keeps half of the (query, key) pairs on average, so it is counted at half:
  6 * layers * seq_len * heads * head_size. Grouped-query attention shares K/V heads but every
  query head still attends, so `heads` (query heads) is the right factor.

Model FLOPs exclude recomputation (remat) and optimizer arithmetic, so MFU compares the useful work
with the chip's peak: MFU = (tokens/s * flops_per_token / devices) / peak FLOP/s per device.

`Throughput` turns the loop's finished steps into tokens/s, TFLOP/s per device and MFU.
MetricsWriter writes the per-step scalars to TensorBoard event files and to an append-only JSONL log,
on process 0 only. It takes host numbers: fetching values from the device is the caller's choice
of when to synchronise, and never hidden in the writer. `progress_line` formats the console line.
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from megadoc_jax import hardware, storage
from megadoc_jax.config import ModelConfig
from megadoc_jax.metrics_log import JSONL_NAME, MetricsLog, read_metrics  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matmuls: attention and SwiGLU projections of every layer plus the unembedding."""
    d, q_width, kv_width = cfg.hidden, cfg.heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attention = d * q_width + 2 * d * kv_width + q_width * d  # q, k and v, o
    mlp = 3 * d * cfg.mlp  # gate, up, down
    return cfg.layers * (attention + mlp) + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs of causal attention scores and value sums per token: 12*layers*L*heads*head_size / 2."""
    return 6 * cfg.layers * seq_len * cfg.heads * cfg.head_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward) at context length `seq_len`; see module doc."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


# --------------------------------------------------------------------------------------------------
# Throughput and MFU
# --------------------------------------------------------------------------------------------------


def throughput_scalars(
    *,
    tokens: float,
    seconds: float,
    flops_per_token: float,
    num_devices: int,
    peak_flops_per_device: float | None,
) -> dict[str, float]:
    """tokens_per_s, tflops_per_device (achieved model TFLOP/s per device) and mfu (fraction of peak,
    left out where the peak is unknown, as on CPU) for `tokens` processed in `seconds`."""
    for name, value in (("tokens", tokens), ("seconds", seconds), ("num_devices", num_devices)):
        if not value > 0:
            raise ValueError(f"throughput_scalars: {name} must be positive, got {value}")
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token / num_devices
    out = {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12}
    if peak_flops_per_device:
        out["mfu"] = flops_per_device / peak_flops_per_device
    return out


class Throughput:
    """Throughput of the training loop between reports, from the host's view of finished steps.

    Call `add(loss_tokens)` once per step, as its metrics are read back. The first call only starts
    the clock (its interval holds the compilation); each later call counts one step of
    batch_size * seq_len processed tokens over the time since the previous call. Pauses between steps
    (evaluation, checkpoints) fall into the next step's interval: this is wall-clock throughput.
    """

    def __init__(
        self,
        model: ModelConfig,
        seq_len: int,
        batch_size: int,
        devices: Sequence[jax.Device],
        *,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.tokens_per_step = batch_size * seq_len
        self.flops_per_token = train_flops_per_token(model, seq_len)
        self.num_devices = len(devices)
        self.peak_flops_per_device = hardware.peak_flops_per_device(devices[0].device_kind)
        self._clock = clock
        self._last: float | None = None
        self._steps, self._loss_tokens, self._seconds = 0, 0.0, 0.0

    def add(self, loss_tokens: float) -> None:
        now = self._clock()
        if self._last is not None:
            self._steps += 1
            self._loss_tokens += loss_tokens
            self._seconds += now - self._last
        self._last = now

    def report(self) -> dict[str, float]:
        """Scalars since the last report (empty before two steps were added); resets the counts.

        tokens_per_s, tflops_per_device and mfu count all processed tokens (what the device computes);
        loss_tokens_per_s counts the tokens with a loss weight; step_time_s is seconds per step.
        """
        if self._steps == 0 or self._seconds <= 0:
            return {}
        out = throughput_scalars(
            tokens=self._steps * self.tokens_per_step,
            seconds=self._seconds,
            flops_per_token=self.flops_per_token,
            num_devices=self.num_devices,
            peak_flops_per_device=self.peak_flops_per_device,
        )
        out["loss_tokens_per_s"] = self._loss_tokens / self._seconds
        out["step_time_s"] = self._seconds / self._steps
        self._steps, self._loss_tokens, self._seconds = 0, 0.0, 0.0
        return out


# --------------------------------------------------------------------------------------------------
# Writers: TensorBoard + JSONL, process 0 only
# --------------------------------------------------------------------------------------------------

TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("step", "time", "event")


def _host_scalar(key: str, value: Any) -> float:
    """A float from a host number (Python, NumPy scalar or 0-d array, as jax.device_get returns)."""
    if key in _RESERVED_KEYS:
        raise ValueError(f"MetricsWriter.write: scalar name {key!r} is reserved ({_RESERVED_KEYS})")
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    raise TypeError(
        f"MetricsWriter.write: scalar {key!r} is a {type(value).__name__}, not a host number; "
        "fetch device values with jax.device_get where the loop may wait for them"
    )


class _EventObject:
    """A TensorBoard event file on an object store: records kept in memory, the whole object put at each
    flush (tensorboardX flushes every flush_secs and at close)."""

    def __init__(self, url: str):
        self._location, self._buffer, self._put_size = storage.location(url), bytearray(), -1

    def write(self, data: bytes) -> None:
        self._buffer += data

    def flush(self) -> None:
        if len(self._buffer) != self._put_size:
            storage.write_bytes(self._location, bytes(self._buffer))
            self._put_size = len(self._buffer)

    def close(self) -> None:
        self.flush()


class _EventObjectFactory:
    def open(self, path: str) -> _EventObject:
        return _EventObject(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no folders."""


def tensorboard_logdir(directory: storage.AnyPath) -> str:
    """The logdir given to tensorboardX: a local path as it is (file:// as its local path); for gs:// and
    memory://, the URL, whose event files are written through megadoc_jax.storage (tensorstore) by the
    factory registered here in place of tensorboardX's own gs:// writer (google-cloud-storage)."""
    if isinstance(directory, Path):
        return str(directory)
    if directory.is_local_disk:
        return str(directory.local_path())
    from tensorboardX import record_writer

    record_writer.register_writer_factory(directory.scheme, _EventObjectFactory())
    return str(directory)


class MetricsWriter:
    """Per-step scalars to `<log_dir>/tensorboard/` event files and `<log_dir>/metrics.jsonl`; log_dir may be
    a URL (megadoc_jax/storage.py: the JSONL is then put whole, at most every few seconds and at flush).

    Only process 0 writes (elsewhere every method is a no-op). `start_step` is the number of steps
    already done when a run resumes from a checkpoint: TensorBoard is told to hide events after it,
    and the JSONL gets an {"event": "open", "step": start_step} line so that `read_metrics` drops
    records of later steps from the earlier attempt (and one it logs again at start_step with the same
    names, such as the final evaluation). The JSONL is flushed after every record; the
    TensorBoard file is written by tensorboardX's background thread.
    """

    def __init__(self, log_dir: str | Path | storage.Location, *, start_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.log_dir = storage.location(log_dir, "metrics directory")
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        storage.makedirs(self.log_dir)
        self.jsonl_path = self.log_dir / JSONL_NAME
        self._jsonl = storage.AppendLog(self.jsonl_path)
        self._write_line({"event": "open", "step": start_step, "time": time.time()})
        self._tensorboard = SummaryWriter(
            logdir=tensorboard_logdir(self.log_dir / TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step > 0 else None,
            max_queue=1000,
            flush_secs=30,
        )

    def _write_line(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` (Python or NumPy numbers, already on the host) for `step`."""
        if not self.enabled:
            return
        values = {key: _host_scalar(key, value) for key, value in scalars.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._write_line(record)
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, int(step), walltime=record["time"])

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Console progress line
# --------------------------------------------------------------------------------------------------


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """45s, 3m20s, 1h02m, 2d03h."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_line(step: int, total_steps: int, values: Mapping[str, float]) -> str:
    """One console line from a step's logged scalars; keys that are absent are left out:

    step  120/1000 | loss 3.4512 | gnorm 0.812 | lr 2.95e-03 | 12.3k tok/s | MFU 41.2% | ETA 1h02m

    Reads loss, grad_norm, learning_rate, tokens_per_s, mfu, and step_time_s for the ETA.
    """
    parts = [f"step {step:>{len(str(total_steps))}}/{total_steps}"]
    for key, text in (
        ("loss", "loss {:.4f}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("learning_rate", "lr {:.2e}"),
    ):
        if key in values:
            parts.append(text.format(values[key]))
    if "tokens_per_s" in values:
        parts.append(f"{_si(values['tokens_per_s'])} tok/s")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    if "step_time_s" in values:
        parts.append(f"ETA {format_duration(max(total_steps - step, 0) * values['step_time_s'])}")
    return " | ".join(parts)
