"""Generation backends behind one interface, and the registry that creates them by name.

A backend turns token-id prompts into sampled completions; everything else (prompt rendering, sharding,
filtering, flags, the ledger) lives in generation/generate.py and is shared by all backends:

    backend = create_backend("transformers", model_dir, {"batch_size": 8}, trust_remote_code=False)
    completions = backend.generate([Request(prompt_ids, seeds=(s, s + 1))], Sampling(max_new_tokens=64))
    completions[0][1].token_ids, completions[0][1].finish_reason

Seeds: sample k of a request has seed `seeds[0] + k`; this is how vLLM derives the seeds of the n child
requests of `SamplingParams(n, seed)`, and every backend must give sample k the same draw whatever the
batch it runs in, so that a resumed job reproduces an uninterrupted one.

Three backends are registered by name: "vllm", "transformers" and "jax" (megadoc_jax's own sampler, which
also samples from ensembles). They are imported lazily: `vllm` and `torch` are optional and must not be
needed to import this package. Another backend is added with `register_backend`, or named on the command
line as "package.module:ClassName". generate.py checks every backend's output against this interface
(check_output_shape: one completion list per request, one completion per seed) before using it.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

# Finish reasons as vLLM names them: "stop" (EOS or a stop token), "length" (max_new_tokens reached).
from megadoc_jax import config as config_lib
from megadoc_jax.data.store import FINISH_LENGTH, FINISH_STOP  # noqa: F401  (re-exported for the backends)


class BackendError(RuntimeError):
    """A backend cannot be created or returned output that breaks the interface; says which and why."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every request of one generate call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"Sampling.temperature: must be positive (sampling, not greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p: must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens <= 0:
            raise ValueError(f"Sampling: top_k must be >= 0 and max_new_tokens > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and the seeds of its samples: len(seeds) samples, seeds consecutive (seeds[0] + k)."""

    prompt_token_ids: tuple[int, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_token_ids or not self.seeds:
            raise ValueError("Request: needs a non-empty prompt and at least one seed")
        if list(self.seeds) != list(range(self.seeds[0], self.seeds[0] + len(self.seeds))):
            raise ValueError(f"Request.seeds must be consecutive (seed + k, as vLLM derives them), got {self.seeds}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample: generated token ids (the stop token included when finish_reason is 'stop')."""

    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | anything else a backend reports (flagged as aborted)


@dataclasses.dataclass(frozen=True)
class Devices:
    """What the backend runs on, for the cost summary: GPU-hours (or CPU core-hours) per output token."""

    kind: str  # "gpu" | "cpu" | "tpu"
    count: int  # accelerators, or CPU threads when kind == "cpu"


class Backend(abc.ABC):
    """The one interface. Subclasses set `name`, an `Options` dataclass, and implement the methods."""

    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass of the backend's knobs; built from a dict by create_backend
    # Whether the backend samples from an ensemble (several model directories, logits averaged); such a
    # backend's constructor takes a list of directories when given more than one.
    supports_ensembles: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Most tokens (prompt + generated) that one sequence may hold."""

    @abc.abstractmethod
    def devices(self) -> Devices: ...

    @abc.abstractmethod
    def version(self) -> str:
        """The engine and its version, e.g. 'vllm 0.33.0', for provenance."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[list[Completion]]:
        """For each request, len(request.seeds) completions in sample order."""

    def close(self) -> None:
        """Release accelerator memory; the default has nothing to release."""


def check_output_shape(requests: Sequence[Request], outputs: Sequence[Sequence[Completion]], backend: str) -> None:
    """Raise BackendError unless there is one completion list per request with one entry per seed."""
    if len(outputs) != len(requests):
        raise BackendError(f"backend {backend}: {len(outputs)} outputs for {len(requests)} requests")
    for i, (request, completions) in enumerate(zip(requests, outputs)):
        if len(completions) != len(request.seeds):
            raise BackendError(
                f"backend {backend}: request {i} asked for {len(request.seeds)} samples, got {len(completions)}"
            )


# --------------------------------------------------------------------------------------------------
# Models: local directories only
# --------------------------------------------------------------------------------------------------


def check_model_dir(model: str | Path) -> Path:
    """The model as a local directory with a config.json; hub names are refused (no hub access assumed)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise BackendError(
            f"model {model}: not a local directory. Models load from local directories only; download the "
            f"model first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR"
        )
    if not (path / "config.json").is_file():
        raise BackendError(f"model {path}: no config.json; pass the directory that holds the model files")
    return path.resolve()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path) -> dict[str, Any]:
    """Name, revision (when it can be known), config hash and weight file sizes, for provenance."""
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return {
        "name": model_dir.name,
        "revision": model_revision(model_dir),
        "config_sha256": file_sha256(model_dir / "config.json"),
        "weights": {p.name: p.stat().st_size for p in weights},
    }


def model_revision(model_dir: Path) -> str | None:
    """The model's commit: from a hub cache snapshot path, a `--local-dir` download's metadata, or git."""
    parts = model_dir.parts
    if "snapshots" in parts[:-1] and len(parts[parts.index("snapshots") + 1]) == 40:
        return parts[parts.index("snapshots") + 1]
    metadata = model_dir / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if metadata.is_file():  # first line: the commit hash
        return metadata.read_text().split("\n", 1)[0].strip() or None
    head = model_dir / ".git" / "HEAD"
    if head.is_file():
        ref = head.read_text().strip()
        target = model_dir / ".git" / ref[5:] if ref.startswith("ref: ") else None
        return target.read_text().strip() if target and target.is_file() else ref
    return None


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# name -> "module:Class" (imported on first use) or a factory already imported.
_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "vllm": "generation.backends.vllm_backend:VllmBackend",
    "transformers": "generation.backends.transformers_backend:TransformersBackend",
    "jax": "generation.backends.jax_backend:JaxBackend",
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Add a backend: a class (or 'module:Class') called as factory(model_dir, options, trust_remote_code=)."""
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> Callable[..., Backend]:
    """The registered factory for `name`, or one named 'package.module:ClassName'."""
    spec = _REGISTRY.get(name, name if ":" in name else None)
    if spec is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backend_names())} (or 'module:Class')")
    if not isinstance(spec, str):
        return spec
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(f"backend {name}: cannot import {module_name} ({e})") from e
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise BackendError(f"backend {name}: {module_name} has no {attribute}") from None


def model_dirs(model: str | Path | Sequence[str | Path]) -> list[Path]:
    """One model directory or several (an ensemble), each checked by check_model_dir."""
    models = [model] if isinstance(model, (str, Path)) else list(model)
    if not models:
        raise BackendError("no model directory given")
    return [check_model_dir(m) for m in models]


def create_backend(
    name: str,
    model_dir: str | Path | Sequence[str | Path],
    options: dict[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
) -> Backend:
    """Create a backend for a local model, or for an ensemble of several (backends that support them);
    options are checked against the backend's Options fields."""
    cls = backend_class(name)
    dirs = model_dirs(model_dir)
    if len(dirs) > 1 and not getattr(cls, "supports_ensembles", False):
        raise BackendError(
            f"backend {name} samples from one model; an ensemble of {len(dirs)} model directories needs a "
            f"backend that averages logits (jax)"
        )
    built = build_options(getattr(cls, "Options", None), options or {}, name)
    return cls(dirs[0] if len(dirs) == 1 else dirs, built, trust_remote_code=trust_remote_code)


def ensemble_identity(dirs: Sequence[Path]) -> dict[str, Any]:
    """model_identity of one model; of an ensemble, each member's in order and how they combine."""
    if len(dirs) == 1:
        return model_identity(dirs[0])
    return {"ensemble": [model_identity(d) for d in dirs], "combine": "mean of the members' logits"}


def generator_label(identity: dict[str, Any]) -> str:
    """'name@revision' of a model identity; 'ensemble(a+b@rev+...)' of an ensemble's."""
    if "ensemble" in identity:
        return "ensemble(" + "+".join(generator_label(member) for member in identity["ensemble"]) + ")"
    return identity["name"] + (f"@{identity['revision']}" if identity.get("revision") else "")


def build_options(options_cls: type | None, raw: dict[str, Any], backend: str) -> Any:
    """The backend's Options dataclass from a dict (config.build_dataclass: the project's one coercer); an
    unknown key or a wrong type names the option."""
    if options_cls is None:
        if raw:
            raise BackendError(f"backend {backend} takes no options, got {sorted(raw)}")
        return None
    try:
        return config_lib.build_dataclass(options_cls, raw, f"backend {backend} options")
    except config_lib.ConfigError as e:
        raise BackendError(str(e)) from None
