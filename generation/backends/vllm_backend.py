"""The vLLM backend: offline `vllm.LLM` with prefix caching, one `SamplingParams(n=G)` per request.

NOT RUN HERE: vLLM needs CUDA and cannot be installed on the machines this project was built on. Our
side (engine arguments, request building, seeds, output parsing) is tested against a test double that
mimics vLLM's `LLM.generate`, `SamplingParams`, `RequestOutput` and `CompletionOutput`
(tests/test_vllm_backend.py); the real engine path has not been executed. Written against the vLLM API
of the v1 engine (0.8 and later):

- prompts go in as token ids (`{"prompt_token_ids": [...]}`, a TokensPrompt), rendered and length-checked
  by generation/generate.py, so vLLM never sees a prompt longer than its max_model_len;
- `SamplingParams(n=G, seed=s)`: the v1 engine splits it into G child requests whose seeds are s + k
  (vllm/v1/engine/parallel_sampling.py, ParentRequest._get_child_sampling_params), so the G samples of
  one prompt differ and each is reproducible; our Request.seeds follow the same rule;
- explicit SamplingParams are used as given: the model's generation_config.json defaults (which vLLM
  applies only when no SamplingParams are passed) do not leak in;
- `RequestOutput.outputs` is a list of `CompletionOutput` with `index`, `token_ids` (the EOS token
  included when generation stopped on it) and `finish_reason` ("stop" | "length" | "abort").

vLLM is imported lazily, so that importing this module (and running the CPU test suite) needs no vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generation.backends import Backend, BackendError, Completion, Devices, Request, Sampling


@dataclasses.dataclass(frozen=True)
class VllmOptions:
    """Throughput knobs of the engine; 0 means vLLM's own default."""

    max_num_seqs: int = 0  # concurrent sequences in a batch
    max_num_batched_tokens: int = 0  # tokens scheduled per engine step (chunked prefill budget)
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV cache
    max_model_len: int = 0  # context length; 0: from the model config
    tensor_parallel_size: int = 1  # GPUs per engine
    dtype: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs (less memory, slower)


class VllmBackend(Backend):
    name = "vllm"
    Options = VllmOptions

    def __init__(
        self,
        model_dir: Path,
        options: VllmOptions | None = None,
        *,
        trust_remote_code: bool = False,
        vllm_module: types.ModuleType | Any = None,
    ):
        self.options = options or VllmOptions()
        # The model is a local directory: keep the hub out of it (a missing file must fail, not download).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Tests pass a test double of the vllm module; real runs import the installed one.
        self._vllm = vllm_module if vllm_module is not None else _import_vllm()
        self._llm = self._vllm.LLM(**engine_arguments(model_dir, self.options, trust_remote_code))
        self._context_length = int(self._llm.llm_engine.model_config.max_model_len)

    @property
    def context_length(self) -> int:
        return self._context_length

    def devices(self) -> Devices:
        return Devices("gpu", self.options.tensor_parallel_size)

    def version(self) -> str:
        return f"vllm {getattr(self._vllm, '__version__', 'unknown')}"

    def sampling_params(self, request: Request, sampling: Sampling) -> Any:
        """One SamplingParams per request: n samples, child k seeded seeds[0] + k by vLLM itself."""
        kwargs: dict[str, Any] = dict(
            n=len(request.seeds),
            seed=request.seeds[0],
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
        )
        if sampling.top_k:  # vLLM's "disabled" value changed across versions (-1, then 0): pass only a real k
            kwargs["top_k"] = sampling.top_k
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        params = [self.sampling_params(r, sampling) for r in requests]
        outputs = list(self._llm.generate(prompts, params, use_tqdm=False))
        if len(outputs) != len(requests):
            raise BackendError(f"backend vllm: {len(outputs)} outputs for {len(requests)} requests")
        # parse_request_output checks each output's prompt and sample indices against its request.
        return [parse_request_output(output, request, i) for i, (output, request) in enumerate(zip(outputs, requests))]

    def close(self) -> None:
        self._llm = None


def _import_vllm() -> types.ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise BackendError(
            f"backend vllm: cannot import vllm ({e}); install it in its own environment "
            f"(pip install 'megadoc-jax[vllm]', CUDA machines only) or use --backend transformers"
        ) from e


def engine_arguments(model_dir: Path, options: VllmOptions, trust_remote_code: bool) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM: local model, prefix caching on, the knobs that are set."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        trust_remote_code=trust_remote_code,
        enable_prefix_caching=True,  # the G samples and the G+1 rationale prompts of a document share it
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        dtype=options.dtype,
        enforce_eager=options.enforce_eager,
    )
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        if getattr(options, key):
            kwargs[key] = getattr(options, key)
    return kwargs


def parse_request_output(output: Any, request: Request, position: int) -> list[Completion]:
    """vLLM's RequestOutput -> our completions in sample order; checks it answers this request."""
    where = f"backend vllm: output {position}"
    if list(output.prompt_token_ids) != list(request.prompt_token_ids):
        raise BackendError(f"{where} is for another prompt (outputs out of order?)")
    if not output.finished:
        raise BackendError(f"{where} (request {output.request_id}) is not finished")
    completions = sorted(output.outputs, key=lambda c: c.index)
    if [c.index for c in completions] != list(range(len(request.seeds))):
        raise BackendError(
            f"{where}: sample indices {[c.index for c in completions]}, expected 0..{len(request.seeds) - 1}"
        )
    return [Completion(tuple(int(t) for t in c.token_ids), str(c.finish_reason)) for c in completions]
