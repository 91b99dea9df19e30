"""Hugging Face interop: Llama directories in and out of our Decoder (tokenizers: hf_tokenizer.py).

- import: a Hugging Face Llama directory (config.json with model_type llama + *.safetensors, one file or
  sharded with model.safetensors.index.json) -> the Decoder and a real ModelConfig (size=custom) that
  round-trips through YAML. Only safetensors are read: pickle weights (.bin, .pt) are refused and nothing
  in the directory is ever executed. Features the decoder lacks (rope scaling, biases, another
  activation) are refused by name.
- export: a run's checkpoint (newest step or a given one) -> a Hugging Face Llama directory (safetensors,
  sharded with an index above a size, + config.json + generation_config.json + the tokenizer files) that
  transformers' LlamaForCausalLM.from_pretrained loads. Written into a temporary sibling directory that is
  renamed into place when complete, so a killed export never leaves a directory that looks finished.
- dtype: an import keeps the checkpoint's dtype (the tensors', else config.json's `dtype`/`torch_dtype`)
  for the parameters, and computes in it unless asked otherwise; an export writes the run's param_dtype
  unless asked otherwise.

The rotary layout needs no permutation: our apply_rope rotates pairs (i, i + K/2), Hugging Face's
`rotate_half` layout, with the same frequencies base^(-2i/K).

    python -m megadoc_jax.hf export RUN_DIR [--step N] [--tokenizer DIR] [--dtype float32|bfloat16] --out DIR
    python -m megadoc_jax.hf import HF_DIR [--tokenizer DIR] --out RUN_DIR
    python -m megadoc_jax.hf prepare RUN_DIR [--tokenizer DIR]   # config.json + tokenizer, for generation
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from megadoc_jax import checkpoint
from megadoc_jax import config as config_lib
from megadoc_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from megadoc_jax.files import read_json
from megadoc_jax.hf_tokenizer import TOKENIZER_JSON, HFError, copy_tokenizer, load_tokenizer

CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
INDEX_JSON = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 2**30  # export: one safetensors file up to this size, else shards + index
# Buffers some checkpoints carry that the model recomputes; read past, never mapped.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# --------------------------------------------------------------------------------------------------
# The weight map: our parameter paths <-> Hugging Face Llama tensor names
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter: ours (dotted path of the pure dict, per-layer shape) and Hugging Face's (name, shape).

    transposed: ours = hf.T.reshape(ours_shape) (torch Linear weights are [out, in]); else equal.
    Per-layer weights are stacked along our leading 'layers' axis and named model.layers.{i}.* there."""

    ours: str
    hf: str
    ours_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    transposed: bool
    per_layer: bool

    def hf_names(self, layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(layers)] if self.per_layer else [self.hf]

    def to_ours(self, hf_value: np.ndarray) -> np.ndarray:
        return hf_value.T.reshape(self.ours_shape) if self.transposed else hf_value

    def to_hf(self, ours_value: np.ndarray) -> np.ndarray:
        value = ours_value.reshape(self.hf_shape[::-1]).T if self.transposed else ours_value
        return np.ascontiguousarray(value)


def weight_table(cfg: ModelConfig) -> list[Weight]:
    """Every parameter of the Decoder of `cfg`, in the order an export writes them."""
    d, f, v, h, g, k = cfg.hidden, cfg.mlp, cfg.vocab_size, cfg.heads, cfg.kv_heads, cfg.head_size
    layer = "model.layers.{i}."
    return [
        Weight("embed", "model.embed_tokens.weight", (v, d), (v, d), False, False),
        *[
            Weight(ours, layer + name, ours_shape, hf_shape, transposed, True)
            for ours, name, ours_shape, hf_shape, transposed in [
                ("layers.attn_norm.scale", "input_layernorm.weight", (d,), (d,), False),
                ("layers.attention.wq", "self_attn.q_proj.weight", (d, h, k), (h * k, d), True),
                ("layers.attention.wk", "self_attn.k_proj.weight", (d, g, k), (g * k, d), True),
                ("layers.attention.wv", "self_attn.v_proj.weight", (d, g, k), (g * k, d), True),
                ("layers.attention.wo", "self_attn.o_proj.weight", (h, k, d), (d, h * k), True),
                ("layers.mlp_norm.scale", "post_attention_layernorm.weight", (d,), (d,), False),
                ("layers.mlp.w_gate", "mlp.gate_proj.weight", (d, f), (f, d), True),
                ("layers.mlp.w_up", "mlp.up_proj.weight", (d, f), (f, d), True),
                ("layers.mlp.w_down", "mlp.down_proj.weight", (f, d), (d, f), True),
            ]
        ],
        Weight("final_norm.scale", "model.norm.weight", (d,), (d,), False, False),
        Weight("lm_head", "lm_head.weight", (d, v), (v, d), True, False),
    ]


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': x} -> {'a': {'b': x}}: the pure-dict layout of nnx.to_pure_dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _get(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------


def llama_model_config(
    hf: dict[str, Any], where: Path, *, param_dtype: str = "float32", compute_dtype: str | None = None
) -> ModelConfig:
    """The Decoder config of a Llama config.json (`where` names it in errors); features our decoder lacks
    are refused by name. compute_dtype None: param_dtype."""
    if hf.get("model_type") != "llama":
        raise HFError(f"{where}: model_type {hf.get('model_type')!r}; expected a megadoc_jax run or a llama")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFError(f"{where}: {key}={hf[key]!r} is not supported by megadoc_jax's decoder")
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; older configs a top-level rope_theta.
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000.0)}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{where}: rope_parameters={rope!r}: only the default rotary embedding is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act={hf['hidden_act']!r}; the decoder's MLP is SwiGLU (silu)")
    try:
        heads = int(hf["num_attention_heads"])
        raw = dict(
            size=config_lib.CUSTOM_SIZE,
            vocab_size=hf["vocab_size"],
            hidden=hf["hidden_size"],
            mlp=hf["intermediate_size"],
            layers=hf["num_hidden_layers"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or 0,
            rope_base=float(rope["rope_theta"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype or param_dtype,
        )
    except KeyError as e:
        raise HFError(f"{where}: no {e.args[0]}") from None
    try:
        return config_lib.from_dict({"model": raw}).model  # types and shapes validated as any run's
    except config_lib.ConfigError as e:
        raise HFError(f"{where}: {e}") from None


def llama_config_json(cfg: ModelConfig, context_length: int, tokenizer: Any, dtype: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM computing what the Decoder of `cfg` computes."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    llama = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": context_length,
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "bos_token_id": eos if bos is None else bos,
        "eos_token_id": eos,
    }
    if tokenizer.pad_token_id is not None:
        llama["pad_token_id"] = tokenizer.pad_token_id
    return llama


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


class Llama(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]  # the Decoder's pure dict of host numpy arrays, in config.param_dtype
    context_length: int  # max_position_embeddings (2048 when config.json has none)


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: those of model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / INDEX_JSON
    if index.is_file():
        weight_map = read_json(index, error=HFError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index}: no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise HFError(f"{index} names {file.name}, but {file} does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise HFError(
                f"{model_dir} holds only pickle weights ({', '.join(pickles)}): megadoc_jax reads "
                f"*.safetensors only and never unpickles; convert them to safetensors first"
            )
        raise HFError(f"no *.safetensors weights in {model_dir}")
    return files


def _tensor_headers(files: Sequence[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype name) of every tensor, from the safetensors headers (no data read)."""
    from safetensors import safe_open

    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                found = {
                    name: (file, tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                    for name in f.keys()  # noqa: SIM118 (safetensors handles are not dicts)
                }
        except Exception as e:  # safetensors' SafetensorError derives from Exception only
            raise HFError(f"{file} is not a readable safetensors file: {e}") from e
        duplicate = next(iter(found.keys() & headers.keys()), None)
        if duplicate is not None:
            raise HFError(f"weight {duplicate} is in both {headers[duplicate][0]} and {file}")
        headers.update(found)
    for name, (file, shape, dtype) in headers.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise HFError(f"weight {name} in {file} has dtype {dtype}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        headers[name] = (file, shape, SAFETENSORS_DTYPES[dtype])
    return headers


def _check_weights(
    headers: dict[str, tuple[Path, tuple[int, ...], str]],
    expected: dict[str, Weight],
    ignored: Sequence[str],
    files: Sequence[Path],
    config_json: Path,
) -> None:
    """Every expected tensor there with its shape, and no tensor the decoder would not use."""
    missing = [name for name in expected if name not in headers]
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 6 else ""
        raise HFError(
            f"weights missing from {', '.join(f.name for f in files)} in {config_json.parent}: "
            f"{', '.join(missing[:6])}{more}"
        )
    unexpected = [
        name
        for name in headers
        if name not in expected and name not in ignored and not name.endswith(IGNORED_WEIGHT_SUFFIXES)
    ]
    if unexpected:
        raise HFError(
            f"{headers[unexpected[0]][0]}: weights the Llama of {config_json} does not have (megadoc_jax's "
            f"decoder maps none of them): {', '.join(unexpected[:6])}"
        )
    for name, w in expected.items():
        file, shape, _ = headers[name]
        if shape != w.hf_shape:
            raise HFError(
                f"weight {name} in {file} has shape {list(shape)}, but {config_json} implies {list(w.hf_shape)}"
            )


def read_llama(model_dir: str | Path, *, compute_dtype: str | None = None) -> Llama:
    """The config and parameters of a Hugging Face Llama directory, every weight checked against the
    config (name, shape) before any is read. compute_dtype None: the checkpoint's dtype."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config_json = model_dir / CONFIG_JSON
    hf = read_json(config_json, error=HFError)
    cfg = llama_model_config(hf, config_json)  # refusals first; the dtypes are set from the tensors below
    files = _safetensors_files(model_dir)
    headers = _tensor_headers(files)
    dtypes = {dtype for _, _, dtype in headers.values()}
    declared = hf.get("dtype") or hf.get("torch_dtype")
    param_dtype = dtypes.pop() if len(dtypes) == 1 else declared if declared in NUMPY_DTYPES else "float32"
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
    if cfg.compute_dtype not in NUMPY_DTYPES:
        raise HFError(f"compute dtype {cfg.compute_dtype!r}: expected one of {sorted(NUMPY_DTYPES)}")

    tied = bool(hf.get("tie_word_embeddings"))
    table = weight_table(cfg)
    expected = {name: w for w in table for name in w.hf_names(cfg.layers) if not (tied and w.ours == "lm_head")}
    ignored = ("lm_head.weight",) if tied else ()  # tied: the output projection is the embedding
    _check_weights(headers, expected, ignored, files, config_json)

    numpy_dtype = NUMPY_DTYPES[param_dtype]
    handles: dict[Path, Any] = {}

    def read(name: str) -> np.ndarray:
        file = headers[name][0]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="numpy")
        return handles[file].get_tensor(name).astype(numpy_dtype, copy=False)

    flat: dict[str, np.ndarray] = {}
    for w in table:
        if w.ours == "lm_head" and tied:
            flat[w.ours] = np.ascontiguousarray(flat["embed"].T)
        elif w.per_layer:
            flat[w.ours] = np.stack([w.to_ours(read(name)) for name in w.hf_names(cfg.layers)])
        else:
            flat[w.ours] = np.ascontiguousarray(w.to_ours(read(w.hf)))
    handles.clear()
    context = int(hf.get("max_position_embeddings") or 0) or 2048
    return Llama(cfg, _nest(flat), context)


def import_llama(
    model_dir: str | Path, mesh: jax.sharding.Mesh, *, compute_dtype: str | None = None
) -> tuple[nnx.Module, ModelConfig, int]:
    """(Decoder on `mesh`'s shardings, its config, context length) of a Hugging Face Llama directory."""
    llama = read_llama(model_dir, compute_dtype=compute_dtype)
    try:
        model = checkpoint.place_params(llama.config, mesh, llama.params, str(model_dir))
    except checkpoint.CheckpointError as e:
        raise HFError(str(e)) from None
    return model, llama.config, llama.context_length


def import_to_run(hf_dir: str | Path, out: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """A run directory from a Hugging Face Llama directory: config.yaml (the imported model, data.tokenizer
    = OUT/tokenizer, data.seq_len = max_position_embeddings), the tokenizer files, and checkpoints/0 holding
    {'step', 'params'} (no optimizer state), which checkpoint.load_run reads."""
    hf_dir, out = Path(hf_dir), Path(out).absolute()
    _check_free(out)
    llama = read_llama(hf_dir)
    tokenizer_source = Path(tokenizer_dir or hf_dir)
    config = Config(
        model=llama.config,
        data=DataConfig(tokenizer=str(out / "tokenizer"), seq_len=llama.context_length),
        train=TrainConfig(run_dir=str(out)),
    )
    with _atomic_directory(out) as tmp:
        copy_tokenizer(tokenizer_source, tmp / "tokenizer")
        config_lib.dump(config, tmp / checkpoint.RUN_CONFIG)
        with checkpoint.Checkpointer(tmp / checkpoint.CHECKPOINTS, config.train) as saver:
            saver.save(0, {"step": np.zeros((), np.int32), "params": llama.params})
    return out


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFError(f"{out} already exists and is not an empty directory")


@contextlib.contextmanager
def _atomic_directory(out: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `out`, renamed to `out` once the body is done and removed if it fails;
    a killed process leaves only the hidden sibling. `out` may exist only as an empty directory."""
    _check_free(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        out.rmdir()  # empty, checked above
    tmp.rename(out)


def hf_tensors(params: dict[str, Any], cfg: ModelConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, tensor in `dtype`) for every parameter, one at a time (bounded memory)."""
    numpy_dtype = NUMPY_DTYPES[dtype]
    for w in weight_table(cfg):
        value = np.asarray(_get(params, w.ours))
        for i, name in enumerate(w.hf_names(cfg.layers)):
            yield name, w.to_hf(value[i] if w.per_layer else value).astype(numpy_dtype, copy=False)


def write_safetensors(
    tensors: Iterator[tuple[str, np.ndarray]], sizes: Sequence[int], directory: Path, max_shard_bytes: int
) -> list[str]:
    """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when the
    tensors (of byte sizes `sizes`, in order) exceed max_shard_bytes. Returns the file names."""
    from safetensors.numpy import save_file

    shards: list[int] = []  # number of tensors per shard
    size = 0
    for nbytes in sizes:
        if not shards or (size + nbytes > max_shard_bytes and size > 0):
            shards.append(0)
            size = 0
        shards[-1] += 1
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for file_name, count in zip(names, shards):
        shard = dict(next(tensors) for _ in range(count))
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (directory / INDEX_JSON).write_text(json.dumps(index, indent=1) + "\n")
    return names


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """A Hugging Face Llama directory at `out` from a run's newest committed step (or `step`).

    tokenizer_dir: default the run's data.tokenizer. dtype: default the run's model.param_dtype."""
    out = Path(out).absolute()
    _check_free(out)
    params, config, _ = checkpoint.load_run_params(run_dir, step=step)
    cfg = config.model
    dtype = dtype or cfg.param_dtype
    if dtype not in NUMPY_DTYPES:
        raise HFError(f"export dtype {dtype!r}: expected one of {sorted(NUMPY_DTYPES)}")
    source = run_tokenizer(run_dir, config, tokenizer_dir)
    if not (source / TOKENIZER_JSON).is_file():
        named_by = "--tokenizer" if tokenizer_dir else f"data.tokenizer of {checkpoint.find_run_config(run_dir)}"
        raise HFError(
            f"no tokenizer: {source / TOKENIZER_JSON} does not exist (named by {named_by}; pass --tokenizer DIR)"
        )
    tokenizer = load_tokenizer(source)
    llama = llama_config_json(cfg, config.data.seq_len, tokenizer, dtype)
    itemsize = NUMPY_DTYPES[dtype].itemsize
    sizes = [math.prod(w.hf_shape) * itemsize for w in weight_table(cfg) for _ in w.hf_names(cfg.layers)]
    with _atomic_directory(out) as tmp:
        write_safetensors(hf_tensors(params, cfg, dtype), sizes, tmp, max_shard_bytes)
        (tmp / CONFIG_JSON).write_text(json.dumps(llama, indent=1) + "\n")
        generation = {key: llama[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in llama}
        (tmp / GENERATION_CONFIG_JSON).write_text(json.dumps(generation, indent=1) + "\n")
        copy_tokenizer(source, tmp)
    return out


def run_tokenizer(run_dir: str | Path, config: Config, tokenizer_dir: str | Path | None) -> Path:
    """The tokenizer directory for a run: `tokenizer_dir`, else the run's data.tokenizer (which must be set)."""
    if tokenizer_dir:
        return Path(tokenizer_dir)
    if not config.data.tokenizer:
        raise HFError(f"{run_dir}: config.yaml has no data.tokenizer; pass --tokenizer DIR")
    return Path(config.data.tokenizer)


def prepare_run_dir(run_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Make a run directory a generator directory: a Llama-style config.json describing the run's model and
    the tokenizer files (from tokenizer_dir, default config.yaml's data.tokenizer) next to config.yaml. The
    weights stay in checkpoints/ (the jax backend reads them there)."""
    run_dir = Path(run_dir)
    config_yaml = run_dir / checkpoint.RUN_CONFIG
    if not config_yaml.is_file():
        raise HFError(f"{config_yaml} does not exist: {run_dir} is not a megadoc_jax run directory")
    config = config_lib.load(config_yaml)
    source = run_tokenizer(run_dir, config, tokenizer_dir)
    copy_tokenizer(source, run_dir)
    llama = llama_config_json(config.model, config.data.seq_len, load_tokenizer(source), config.model.param_dtype)
    llama["megadoc_jax"] = {"note": "weights are the orbax checkpoints of this run directory (config.yaml)"}
    (run_dir / CONFIG_JSON).write_text(json.dumps(llama, indent=1) + "\n")
    return run_dir


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="a Hugging Face Llama directory from a run's checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="the Hugging Face directory to write (must not exist)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    export.add_argument("--tokenizer", default=None, help="tokenizer directory (default: data.tokenizer)")
    export.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="tensor dtype (default: the run's model.param_dtype)",
    )
    export.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    imported = commands.add_parser("import", help="a run directory from a Hugging Face Llama directory")
    imported.add_argument("hf_dir")
    imported.add_argument("--out", required=True, help="the run directory to write (must not exist)")
    imported.add_argument("--tokenizer", default=None, help="tokenizer directory (default: HF_DIR)")
    prepare = commands.add_parser("prepare", help="config.json + tokenizer in a run directory, for generation")
    prepare.add_argument("run_dir")
    prepare.add_argument("--tokenizer", default=None, help="tokenizer directory (default: data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            done = export_run(
                args.run_dir,
                args.out,
                step=args.step,
                tokenizer_dir=args.tokenizer,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_bytes,
            )
            print(f"Hugging Face Llama directory: {done}")
        elif args.command == "import":
            print(f"run directory: {import_to_run(args.hf_dir, args.out, tokenizer_dir=args.tokenizer)}")
        else:
            print(f"generator directory: {prepare_run_dir(args.run_dir, args.tokenizer)}")
    except (HFError, checkpoint.CheckpointError, config_lib.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
