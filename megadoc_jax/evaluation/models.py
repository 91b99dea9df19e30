"""The models an evaluation scores: checkpoints of runs or Hugging Face Llama directories, one or an ensemble.

    member = load_member("runs/a:2000", mesh, attention="xla")   # RUN_DIR[:STEP], or a Llama directory
    tokenizer = check_ensemble([member, ...])                    # one tokenizer and vocabulary for all

A run directory is read with checkpoint.load_run (its newest committed step, or STEP), a Llama directory
with hf.import_llama. Every member is rebuilt with the evaluation's attention backend (model.attention),
so that all members read a batch in one token layout; its parameters are what the checkpoint holds.
The member's context is the run's data.seq_len, or the Llama's max_position_embeddings. Its tokenizer is
the run's data.tokenizer (or the Llama directory's tokenizer.json), identified by TokenizerInfo's hash as
the stores' manifests are. Errors name the path: checkpoint.CheckpointError, hf.HFError, or ModelError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from megadoc_jax import checkpoint, hf, storage
from megadoc_jax.config import Config, ModelConfig
from megadoc_jax.data.store import StoreError, TokenizerInfo
from megadoc_jax.loss import ENSEMBLE_MODES

__all__ = ["ENSEMBLE_MODES", "Member", "ModelError", "check_ensemble", "load_member", "parse_model_spec"]


class ModelError(ValueError):
    """A model argument that cannot be evaluated; the message names the path."""


@dataclasses.dataclass
class Member:
    spec: str  # as given on the command line
    kind: str  # "run" or "hf"
    path: storage.AnyPath  # the run directory, a path or a URL (or the Llama directory, local)
    checkpoint: storage.AnyPath  # the step directory read (or the Llama directory)
    step: int | None  # the checkpoint's step; None for a Llama directory
    model_config: ModelConfig
    context_length: int
    run_config: Config | None
    tokenizer_dir: Path | None
    tokenizer: TokenizerInfo | None
    graphdef: nnx.GraphDef
    params: Any  # pure dict of arrays on the mesh
    param_shardings: Any

    def describe(self) -> dict[str, Any]:
        from megadoc_jax import config as config_lib

        return {
            "spec": self.spec,
            "kind": self.kind,
            "path": str(self.path),
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "context_length": self.context_length,
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "model": config_lib.to_dict(Config(model=self.model_config))["model"],
        }


def parse_model_spec(text: str) -> tuple[storage.AnyPath, int | None]:
    """RUN_DIR[:STEP] -> (path or URL, step); a path that exists as written is never split."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and not storage.exists(storage.location(text, "--model")):
        return storage.location(head, "--model"), int(tail)
    return storage.location(text, "--model"), None


def _tokenizer_of(candidates: Sequence[Path | None]) -> tuple[Path | None, TokenizerInfo | None]:
    for directory in candidates:
        if directory is not None and (Path(directory) / hf.TOKENIZER_JSON).is_file():
            try:
                return Path(directory), TokenizerInfo.from_directory(directory)
            except StoreError as e:
                raise ModelError(str(e)) from None
    return None, None


def not_a_model(spec: str, path: storage.AnyPath) -> ModelError:
    if not storage.exists(path):
        return ModelError(f"--model {spec}: {path} does not exist")
    return ModelError(
        f"--model {spec}: {path} is neither a megadoc_jax run ({checkpoint.RUN_CONFIG} next to "
        f"{checkpoint.CHECKPOINTS}/) nor a Hugging Face Llama directory ({hf.CONFIG_JSON})"
    )


def load_member(spec: str, mesh: jax.sharding.Mesh, *, attention: str, compute_dtype: str | None = None) -> Member:
    path, step = parse_model_spec(spec)
    if not storage.exists(path):
        raise not_a_model(spec, path)
    if checkpoint.find_run_config(path) is not None:
        run = checkpoint.load_run(path, mesh, step=step, compute_dtype=compute_dtype)
        kind, model, run_config, context = "run", run.model, run.config, run.config.data.seq_len
        step_dir, step = checkpoint.step_dir(path, run.step), run.step
        run_dir = checkpoint.find_run_config(path).parent
        tokenizer = run_config.data.tokenizer
        tokenizer_dir, info = _tokenizer_of([Path(tokenizer) if tokenizer else None])
    elif isinstance(path, Path) and (path / hf.CONFIG_JSON).is_file():  # Llama directories are local
        if step is not None:
            raise ModelError(f"--model {spec}: {path} is a Hugging Face directory; it has no steps to choose")
        model, _, context = hf.import_llama(path, mesh, compute_dtype=compute_dtype)
        kind, run_config, step_dir, run_dir = "hf", None, path, path
        tokenizer_dir, info = _tokenizer_of([path])
    else:
        raise not_a_model(spec, path)
    model_config = dataclasses.replace(model.cfg, attention=attention)
    graphdef, _ = checkpoint.model_target(model_config, mesh)  # same parameters, the evaluation's backend
    params = nnx.to_pure_dict(nnx.state(model))
    return Member(
        spec=spec,
        kind=kind,
        path=checkpoint.absolute(run_dir),
        checkpoint=checkpoint.absolute(step_dir),
        step=step,
        model_config=model_config,
        context_length=int(context),
        run_config=run_config,
        tokenizer_dir=tokenizer_dir,
        tokenizer=info,
        graphdef=graphdef,
        params=params,
        param_shardings=jax.tree.map(lambda p: p.sharding, params),
    )


def check_ensemble(members: Sequence[Member]) -> TokenizerInfo | None:
    """The members' common tokenizer (None when no member names one); ModelError naming the two members
    that differ in tokenizer or vocabulary size."""
    first = members[0]
    for member in members[1:]:
        if member.model_config.vocab_size != first.model_config.vocab_size:
            raise ModelError(
                f"--model {member.spec}: vocabulary of {member.model_config.vocab_size} tokens, but --model "
                f"{first.spec} has {first.model_config.vocab_size}; ensemble members share one tokenizer"
            )
    known = [m for m in members if m.tokenizer is not None]
    for member in known[1:]:
        if member.tokenizer.hash != known[0].tokenizer.hash:
            raise ModelError(
                f"--model {member.spec}: tokenizer {member.tokenizer_dir} (hash {member.tokenizer.hash}) differs "
                f"from that of --model {known[0].spec}, {known[0].tokenizer_dir} (hash {known[0].tokenizer.hash})"
            )
    return known[0].tokenizer if known else None
