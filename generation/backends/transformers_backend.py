"""The transformers backend: PyTorch `generate` with sampling, on CPU or one GPU, for small local models.

Sampling is done as argmax(processed logits + Gumbel noise), i.e. `generate` in greedy mode with a logits
processor that adds the noise (Gumbel-max: the argmax is an exact sample of softmax(logits / T)). The
noise of each row comes from its own torch.Generator seeded with that sample's seed, so a sample is the
same whatever batch it runs in and whatever ran before it: a resumed job reproduces an uninterrupted
one (given the same batches: on CPU batch composition can still move logits in the last bits). The
stock `do_sample=True` path draws every row from one global RNG, so a sample would depend on its batch.

The model's own generation_config.json is replaced by a blank one (keeping its EOS ids), so that its
defaults (temperature, top_p, repetition penalty, ...) do not leak in: the job's Sampling alone decides.
Models load from a local directory only (local_files_only); trust_remote_code only when asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from generation.backends import (
    FINISH_LENGTH,
    FINISH_STOP,
    Backend,
    BackendError,
    Completion,
    Devices,
    Request,
    Sampling,
)
from megadoc_jax import hf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class TransformersOptions:
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    batch_size: int = 8  # sequences (request x sample) per generate call


class GumbelSampler(LogitsProcessor):
    """Adds Gumbel(0, 1) noise to each row's scores from that row's own seeded generator."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores_BxV: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores_BxV.shape[-1]
        uniform_BxV = torch.stack([torch.rand(vocab, generator=g) for g in self.generators])
        gumbel_BxV = -torch.log(-torch.log(uniform_BxV))  # rand is in [0, 1): 0 gives -inf, never chosen
        return scores_BxV + gumbel_BxV.to(device=scores_BxV.device, dtype=scores_BxV.dtype)


class TransformersBackend(Backend):
    name = "transformers"
    Options = TransformersOptions

    def __init__(self, model_dir: Path, options: TransformersOptions | None = None, *, trust_remote_code: bool = False):
        self.options = options or TransformersOptions()
        if self.options.batch_size <= 0:
            raise BackendError(f"backend transformers option batch_size={self.options.batch_size}: must be positive")
        self.device = torch.device(self._device_name(self.options.device))
        dtype = self._dtype(self.options.dtype)
        load = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        try:
            self.tokenizer = hf_tokenizer.load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        except hf_tokenizer.HFError as e:
            raise BackendError(f"backend transformers: {e}") from None
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **load).to(self.device).eval()
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def devices(self) -> Devices:
        if self.device.type == "cuda":
            return Devices("gpu", 1)
        return Devices("cpu", torch.get_num_threads())

    def version(self) -> str:
        return f"transformers {transformers.__version__}, torch {torch.__version__}"

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        rows = [(i, k, seed) for i, request in enumerate(requests) for k, seed in enumerate(request.seeds)]
        # Rows of similar prompt length batch together (less padding); the order is a pure function of
        # the requests, so the same requests always form the same batches.
        rows.sort(key=lambda row: len(requests[row[0]].prompt_token_ids))
        results: list[list[Completion | None]] = [[None] * len(r.seeds) for r in requests]
        for start in range(0, len(rows), self.options.batch_size):
            batch = rows[start : start + self.options.batch_size]
            prompts = [requests[i].prompt_token_ids for i, _, _ in batch]
            completions = self._generate_batch(prompts, [seed for _, _, seed in batch], sampling)
            for (i, k, _), completion in zip(batch, completions):
                results[i][k] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[tuple[int, ...]], seeds: list[int], sampling: Sampling) -> list[Completion]:
        width = max(len(p) for p in prompts)
        # Left padding: every row's last prompt token sits at the same position, where generation starts.
        input_ids_BxL = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask_BxL = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        processors = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(GumbelSampler(seeds))
        config = GenerationConfig(
            do_sample=False,  # greedy over logits + Gumbel noise == sampling (see the module docstring)
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            output_BxT = self.model.generate(
                input_ids=input_ids_BxL, attention_mask=mask_BxL, generation_config=config, logits_processor=processors
            )
        return [self._completion(row[width:].tolist(), sampling.max_new_tokens) for row in output_BxT.cpu()]

    def _completion(self, tokens: list[int], max_new_tokens: int) -> Completion:
        """Cut at the first EOS (kept, as vLLM keeps it); no EOS means the length limit ended it."""
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                return Completion(tuple(tokens[: position + 1]), FINISH_STOP)
        return Completion(tuple(tokens[:max_new_tokens]), FINISH_LENGTH)

    def _eos_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        ids = sorted({int(i) for i in ids if i is not None})
        if not ids:
            raise BackendError("backend transformers: the model and tokenizer define no EOS token")
        return ids

    @staticmethod
    def _device_name(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"backend transformers option device={device}: CUDA is not available here")
        return device

    def _dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if name not in DTYPES:
            raise BackendError(f"backend transformers option dtype={name!r}: expected auto or one of {sorted(DTYPES)}")
        return DTYPES[name]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
