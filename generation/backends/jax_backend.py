"""The jax backend: sampling from our own decoder with a KV cache (megadoc_jax/decode.py), sharded on the
training mesh machinery. No torch: the default install can generate.

Models (a local directory, as every backend):
- a megadoc_jax run directory (config.yaml + checkpoints/STEP): the latest step's params, or a
  checkpoints directory, or one step's directory; only the params are read (partial orbax restore), onto
  the shardings that model.abstract_model gives on this backend's mesh;
- a Hugging Face Llama directory (config.json with model_type llama + *.safetensors), imported into the
  Decoder's layout (no rope scaling, no biases).

The generation CLI needs config.json and the tokenizer inside the model directory (check_model_dir and
prompts.load_tokenizer read them there); `prepare_run_dir(RUN_DIR)`, or
`python -m generation.backends.jax_backend RUN_DIR`, writes a Llama-style config.json describing the run's
model and copies the run's tokenizer (config.yaml's data.tokenizer) next to it.

Seeds: every (request, sample) row is drawn with its own key from seed `seeds[0] + k` (decode.seed_keys),
so a sample does not depend on its batch (up to last-bit numerics of differently padded shapes). Batches
always have `batch_size` rows and a prompt width rounded up to `prompt_bucket`, so few programs compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import flax
import jax
import numpy as np
from flax import nnx

from generation.backends import Backend, BackendError, Completion, Devices, Request, Sampling, register_backend
from megadoc_jax import config as config_lib
from megadoc_jax import decode, sharding
from megadoc_jax import model as model_lib
from megadoc_jax.config import MeshConfig, ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class JaxOptions:
    batch_size: int = 8  # rows (request x sample) per compiled call; the last batch is padded to it
    prompt_bucket: int = 64  # prompt widths are rounded up to a multiple of this (bounds recompiles)
    dtype: str = "auto"  # compute dtype: auto (the model config's) | float32 | bfloat16
    devices: int = 0  # use the first N devices (0: all)
    data: int = -1  # mesh axes: rows split over 'data'; weights over 'tensor'; -1: the remaining devices
    tensor: int = 1
    padding: str = "right"  # right | left (same samples; a choice of layout)
    context_length: int = 0  # 0: the model's (run: data.seq_len; Llama: max_position_embeddings)


class JaxBackend(Backend):
    name = "jax"
    Options = JaxOptions
    supports_ensembles = True

    def __init__(self, model_dir: Path | Sequence[Path], options: JaxOptions | None = None, *,
                 trust_remote_code: bool = False):  # fmt: skip
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
        """(decoder, its config, its context length or None, its tokenizer) of a run or Llama directory."""
        if (config_yaml := find_run_config(model_dir)) is not None:
            run_config = config_lib.load(config_yaml)
            cfg, context = run_config.model, run_config.data.seq_len
        else:
            cfg, context = llama_model_config(model_dir), None
        if self.options.dtype != "auto":
            cfg = dataclasses.replace(cfg, compute_dtype=self.options.dtype)
        if config_yaml is not None:
            model = restore_run_model(model_dir, cfg, self.mesh)
        else:
            model, context = import_llama(model_dir, cfg, self.mesh)
        tokenizer = load_tokenizer(model_dir, run_config.data.tokenizer if config_yaml else None)
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
                    list(prompts) + [prompts[0]] * filler, seeds + [0] * filler, config, sampling.max_new_tokens,
                    width=width, padding=self.options.padding, input_sharding=self.row_sharding,
                )  # fmt: skip
            for (i, k, _), sample in zip(batch, generated):
                results[i][k] = Completion(sample.token_ids, sample.finish_reason)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.sampler = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------
# megadoc_jax run directories
# --------------------------------------------------------------------------------------------------


def find_run_config(path: Path) -> Path | None:
    """config.yaml of a run directory, of a run's checkpoints/ or of one of its step directories."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate / "config.yaml"
    return None


def checkpoint_step_dir(path: Path) -> Path:
    """The step directory to read: `path` itself if it is one, else the newest committed step."""
    path = path.resolve()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path
    checkpoints = path if path.name == "checkpoints" else path / "checkpoints"
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
    if not steps:  # orbax renames a step directory to its number only once it is complete
        raise BackendError(f"backend jax: no committed checkpoint in {checkpoints}")
    return checkpoints / str(steps[0])


def restore_run_model(path: Path, cfg: ModelConfig, mesh: jax.sharding.Mesh) -> nnx.Module:
    """The Decoder with the params of a train-state checkpoint, restored onto this mesh's shardings."""
    import orbax.checkpoint as ocp

    step_dir = checkpoint_step_dir(path)
    graphdef, abstract_state = nnx.split(model_lib.abstract_model(cfg, mesh))
    item = {"params": nnx.to_pure_dict(abstract_state)}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
        restored = ocp.PyTreeCheckpointer().restore(step_dir / "default", args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise BackendError(f"backend jax: cannot restore params from {step_dir}: {e}") from e
    nnx.replace_by_pure_dict(abstract_state, restored["params"])
    return nnx.merge(graphdef, abstract_state)


def load_tokenizer(model_dir: Path, run_tokenizer: str | None):
    """The tokenizer in the model directory, else the run's data.tokenizer."""
    from transformers import AutoTokenizer

    for directory in (model_dir, Path(run_tokenizer) if run_tokenizer else None):
        if directory is not None and (directory / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    raise BackendError(f"backend jax: no tokenizer.json in {model_dir} nor in the run's data.tokenizer "
                       f"{run_tokenizer!r}")


def config_eos_ids(model_dir: Path) -> list[int]:
    config = model_dir / "config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def prepare_run_dir(run_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Make a run directory a generator directory: a Llama-style config.json (the run's model) and the
    tokenizer files (from tokenizer_dir or config.yaml's data.tokenizer). Checkpoints stay where they are."""
    run_dir = Path(run_dir)
    config = config_lib.load(run_dir / "config.yaml")
    source = Path(tokenizer_dir or config.data.tokenizer)
    if not (source / "tokenizer.json").is_file():
        raise BackendError(f"prepare_run_dir: no tokenizer.json in {source} (pass tokenizer_dir)")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, run_dir / name)
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(str(source), local_files_only=True).eos_token_id
    m = config.model
    llama = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": m.vocab_size,
        "hidden_size": m.hidden, "intermediate_size": m.mlp, "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_size,
        "rope_theta": m.rope_base, "rms_norm_eps": m.norm_eps, "max_position_embeddings": config.data.seq_len,
        "tie_word_embeddings": False, "eos_token_id": eos_id, "bos_token_id": eos_id,
        "megadoc_jax": {"note": "weights are the orbax checkpoints of this run directory (config.yaml)"},
    }  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(llama, indent=1) + "\n")
    return run_dir


# --------------------------------------------------------------------------------------------------
# Hugging Face Llama directories
# --------------------------------------------------------------------------------------------------


def llama_model_config(model_dir: Path) -> ModelConfig:
    """The Decoder config of a Llama config.json; features our decoder lacks are refused by name."""
    hf = json.loads((model_dir / "config.json").read_text())
    where = f"backend jax: {model_dir / 'config.json'}"
    if hf.get("model_type") != "llama":
        raise BackendError(f"{where}: model_type {hf.get('model_type')!r}; expected a megadoc_jax run or a llama")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if hf.get(key):
            raise BackendError(f"{where}: {key}={hf[key]!r} is not supported by megadoc_jax's decoder")
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs a top-level rope_theta.
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000.0)}
    if rope.get("rope_type", "default") != "default":
        raise BackendError(f"{where}: rope_parameters={rope!r}: only the default rotary embedding is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise BackendError(f"{where}: hidden_act={hf['hidden_act']!r}; the decoder's MLP is SwiGLU (silu)")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        size="custom", vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], mlp=hf["intermediate_size"],
        layers=hf["num_hidden_layers"], heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0, rope_base=float(rope["rope_theta"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), compute_dtype="bfloat16",
    )  # fmt: skip


def import_llama(model_dir: Path, cfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, int]:
    """(Decoder, context length) from *.safetensors in the Llama layout; each weight placed on its shards."""
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BackendError(f"backend jax: no *.safetensors in {model_dir}")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        weights.update(load_file(file))
    hf = json.loads((model_dir / "config.json").read_text())
    d, h, g, k = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_size

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise BackendError(f"backend jax: weight {name} missing from {[f.name for f in files]}")
        return weights[name].astype(np.float32)

    def stacked(name: str, convert) -> np.ndarray:
        return np.stack([convert(get(f"model.layers.{i}.{name}")) for i in range(cfg.layers)])

    embed = get("model.embed_tokens.weight")
    lm_head = embed if hf.get("tie_word_embeddings") else get("lm_head.weight")
    pure = {
        "embed": embed,
        "lm_head": lm_head.T,
        "final_norm": {"scale": get("model.norm.weight")},
        "layers": {
            "attn_norm": {"scale": stacked("input_layernorm.weight", lambda w: w)},
            "mlp_norm": {"scale": stacked("post_attention_layernorm.weight", lambda w: w)},
            "attention": {  # torch Linear weights are [out, in]
                "wq": stacked("self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, k)),
                "wk": stacked("self_attn.k_proj.weight", lambda w: w.T.reshape(d, g, k)),
                "wv": stacked("self_attn.v_proj.weight", lambda w: w.T.reshape(d, g, k)),
                "wo": stacked("self_attn.o_proj.weight", lambda w: w.T.reshape(h, k, d)),
            },
            "mlp": {
                "w_gate": stacked("mlp.gate_proj.weight", lambda w: w.T),
                "w_up": stacked("mlp.up_proj.weight", lambda w: w.T),
                "w_down": stacked("mlp.down_proj.weight", lambda w: w.T),
            },
        },
    }
    graphdef, abstract_state = nnx.split(model_lib.abstract_model(cfg, mesh))
    flat_target, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_state))
    flat_weights = treedef.flatten_up_to(pure)
    wrong = [f"{jax.tree_util.keystr(path)} {w.shape} != {spec.shape}"
             for (path, spec), w in zip(flat_target, flat_weights) if w.shape != spec.shape]  # fmt: skip
    if wrong:
        raise BackendError(f"backend jax: {model_dir} weights do not match config.json's shapes: {wrong}")
    placed = treedef.unflatten(
        [jax.device_put(w.astype(spec.dtype), spec.sharding) for (_, spec), w in zip(flat_target, flat_weights)]
    )
    nnx.replace_by_pure_dict(abstract_state, placed)
    return nnx.merge(graphdef, abstract_state), int(hf.get("max_position_embeddings", 0)) or 2048


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m generation.backends.jax_backend", description=prepare_run_dir.__doc__
    )
    parser.add_argument("run_dir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: config.yaml's data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        print(f"generator directory: {prepare_run_dir(args.run_dir, args.tokenizer)}")
    except (BackendError, config_lib.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


register_backend("jax", JaxBackend)  # create_backend("jax", ...) once this module is imported

if __name__ == "__main__":
    sys.exit(main())
