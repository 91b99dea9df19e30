"""The jax backend: sampling from our own decoder with a KV cache (megadoc_jax/decode.py), sharded on the
training mesh machinery. No torch: the default install can generate.

Models (a local directory, as every backend):
- a megadoc_jax run directory (config.yaml + checkpoints/STEP), a checkpoints directory, or one step's
  directory: checkpoint.load_run restores the params only (newest committed step) onto this backend's mesh;
- a Hugging Face Llama directory (config.json with model_type llama + *.safetensors): hf.import_llama.
dtype=auto computes as the checkpoint says: a run's model.compute_dtype, a Llama's tensor dtype.

The generation CLI needs config.json and the tokenizer inside the model directory (check_model_dir and
prompts.generator_tokenizer read them there); `python -m megadoc_jax.hf prepare RUN_DIR` (hf.prepare_run_dir)
writes a Llama-style config.json describing the run's model and copies the run's tokenizer next to it.

Seeds: every (request, sample) row is drawn with its own key from seed `seeds[0] + k` (decode.seed_keys),
so a sample does not depend on its batch (up to last-bit numerics of differently padded shapes). Batches
always have `batch_size` rows and a prompt width rounded up to `prompt_bucket`, so few programs compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
from flax import nnx

from generation.backends import Backend, BackendError, Completion, Devices, Request, Sampling
from megadoc_jax import checkpoint, decode, hf, sharding
from megadoc_jax import config as config_lib
from megadoc_jax.config import MeshConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class JaxOptions:
    batch_size: int = 8  # rows (request x sample) per compiled call; the last batch is padded to it
    prompt_bucket: int = 64  # prompt widths are rounded up to a multiple of this (bounds recompiles)
    dtype: str = "auto"  # compute dtype: auto (the checkpoint's) | float32 | bfloat16
    devices: int = 0  # use the first N devices (0: all)
    data: int = -1  # mesh axes: rows split over 'data'; weights over 'tensor'; -1: the remaining devices
    tensor: int = 1
    padding: str = "right"  # right | left (same samples; a choice of layout)
    context_length: int = 0  # 0: the model's (run: data.seq_len; Llama: max_position_embeddings)


class JaxBackend(Backend):
    name = "jax"
    Options = JaxOptions
    supports_ensembles = True

    def __init__(
        self, model_dir: Path | Sequence[Path], options: JaxOptions | None = None, *, trust_remote_code: bool = False
    ):
        """model_dir: one model, or several (an ensemble: every step samples the mean of the members'
        logits). Members may differ in shape but must share the tokenizer; the first one's tokenizer,
        chat template and EOS are used, and the context length is the shortest member's (unless the
        context_length option is set)."""
        del trust_remote_code  # nothing in a model directory is ever executed by this backend
        self.options = options = options or JaxOptions()
        if options.batch_size <= 0 or options.prompt_bucket <= 0:
            raise BackendError(f"backend jax: batch_size and prompt_bucket must be positive, got {options}")
        if options.dtype not in ("auto", "float32", "bfloat16"):
            raise BackendError(f"backend jax option dtype={options.dtype!r}: expected auto, float32 or bfloat16")
        devices = jax.devices()[: options.devices or None]
        try:
            sizes = MeshConfig(data=options.data, fsdp=1, tensor=options.tensor, context=1).sizes(len(devices))
        except config_lib.ConfigError as e:
            raise BackendError(f"backend jax options data/tensor over {len(devices)} devices: {e}") from None
        self.mesh = sharding.make_mesh(sizes, devices)
        dirs = [Path(model_dir)] if isinstance(model_dir, (str, Path)) else [Path(d) for d in model_dir]
        members = [self._load_member(d) for d in dirs]
        models, configs, contexts, tokenizers = zip(*members)
        for d, tokenizer in zip(dirs[1:], tokenizers[1:]):
            if tokenizer.get_vocab() != tokenizers[0].get_vocab():
                raise BackendError(
                    f"backend jax: ensemble member {d} has another tokenizer than {dirs[0]}; members must share one"
                )
        sizes = {str(d): cfg.vocab_size for d, cfg in zip(dirs, configs)}
        if len(set(sizes.values())) > 1:
            raise BackendError(f"backend jax: ensemble members have different vocabulary sizes: {sizes}")
        self.model_config = configs[0]
        # The shortest member's context, unless the context_length option says otherwise.
        known = [c for c in contexts if c]
        self._context_length = options.context_length or (min(known) if known else None)
        self.tokenizer = tokenizers[0]
        eos_ids = {self.tokenizer.eos_token_id} | set(config_eos_ids(dirs[0]))
        eos_ids.discard(None)
        if not eos_ids:
            raise BackendError(f"backend jax: the model and tokenizer in {dirs[0]} define no EOS token")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids)
        self.sampler = decode.Sampler(models, sorted(eos_ids), pad_id)
        batch_spec = sharding.logical_to_spec(("batch",), (options.batch_size,), dict(self.mesh.shape))
        self.row_sharding = jax.sharding.NamedSharding(self.mesh, batch_spec)

    def _load_member(self, model_dir: Path) -> tuple[nnx.Module, ModelConfig, int | None, Any]:
        """(decoder, its config, its context length, its tokenizer) of a run or Llama directory."""
        compute_dtype = None if self.options.dtype == "auto" else self.options.dtype
        run_tokenizer = None
        try:
            if checkpoint.find_run_config(model_dir) is not None:
                model, run_config, _ = checkpoint.load_run(model_dir, self.mesh, compute_dtype=compute_dtype)
                cfg, context, run_tokenizer = run_config.model, run_config.data.seq_len, run_config.data.tokenizer
            else:
                model, cfg, context = hf.import_llama(model_dir, self.mesh, compute_dtype=compute_dtype)
            # The tokenizer in the model directory, else the run's data.tokenizer.
            candidates = [model_dir] + ([Path(run_tokenizer)] if run_tokenizer else [])
            found = next((d for d in candidates if (d / hf.TOKENIZER_JSON).is_file()), None)
            if found is None:
                raise BackendError(
                    f"backend jax: no tokenizer.json in {model_dir} nor in the run's data.tokenizer {run_tokenizer!r}"
                )
            tokenizer = hf.load_tokenizer(found)
        except (checkpoint.CheckpointError, hf.HFError) as e:
            raise BackendError(f"backend jax: {e}") from e
        return model, cfg, context, tokenizer

    @property
    def context_length(self) -> int:
        return int(self._context_length)

    def devices(self) -> Devices:
        devices = self.mesh.devices.flatten()
        if devices[0].platform == "cpu":
            return Devices("cpu", os.cpu_count() or 1)
        return Devices("tpu" if devices[0].platform == "tpu" else "gpu", len(devices))

    def version(self) -> str:
        members = self.sampler.ensemble_size
        ensemble = f", ensemble of {members} (mean logits)" if members > 1 else ""
        return f"megadoc_jax decode (jax {jax.__version__}, flax {flax.__version__}{ensemble})"

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        rows = [(i, k, seed) for i, request in enumerate(requests) for k, seed in enumerate(request.seeds)]
        rows.sort(key=lambda row: len(requests[row[0]].prompt_token_ids))  # similar widths batch together
        config = decode.SamplingConfig(sampling.temperature, sampling.top_k, sampling.top_p)
        results: list[list[Completion | None]] = [[None] * len(r.seeds) for r in requests]
        size = self.options.batch_size
        for begin in range(0, len(rows), size):
            batch = rows[begin : begin + size]
            prompts = [requests[i].prompt_token_ids for i, _, _ in batch]
            seeds = [seed for _, _, seed in batch]
            filler = size - len(batch)  # dummy rows keep the compiled shape; their output is dropped
            bucket = self.options.prompt_bucket
            width = -(-max(len(p) for p in prompts) // bucket) * bucket
            with jax.set_mesh(self.mesh):
                generated = self.sampler.generate(
                    list(prompts) + [prompts[0]] * filler,
                    seeds + [0] * filler,
                    config,
                    sampling.max_new_tokens,
                    width=width,
                    padding=self.options.padding,
                    input_sharding=self.row_sharding,
                )
            for (i, k, _), sample in zip(batch, generated):
                results[i][k] = Completion(sample.token_ids, sample.finish_reason)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.sampler = None  # type: ignore[assignment]


def config_eos_ids(model_dir: Path) -> list[int]:
    """The eos_token_id(s) of the model directory's config.json; none without one."""
    config = model_dir / "config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])
