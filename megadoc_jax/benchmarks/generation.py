"""Generation throughput: our KV-cache sampler against transformers' `generate`, same Llama, same prompts.

    python -m megadoc_jax.benchmarks.generation                       # demo-sized Llama on CPU, about a minute
    python -m megadoc_jax.benchmarks.generation --shape 300m --batch 32 --prompt-len 512 --new-tokens 256  # GPU

One randomly initialised transformers LlamaForCausalLM of the chosen shape (a preset of
megadoc_jax.config.MODEL_SIZES; its config.json from hf.llama_config_json, the mapping the export uses) is
saved to a temporary directory; transformers loads it back with from_pretrained and we import it with
hf.import_llama, so both sides hold the same weights (checked: the logits of each prompt's last token).
Ours is decode.Sampler, the compiled prefill + while_loop over decode steps that `--backend jax` runs;
theirs is `model.generate(do_sample=True)` with its default dynamic KV cache. Both draw plain samples
with the same temperature / top-k / top-p and produce exactly --new-tokens per row: neither side has a
reachable EOS (ours is given an id outside the vocabulary, theirs none), so both do the same work.

Timing: each side runs once as a warm-up (ours compiles then: reported as compile time), then --rounds
timed rounds, interleaved side by side so that both see the same load on a shared machine; the medians
give output tokens/s and each round gives a ratio ours / transformers. On CPU both sides use the same
threads: --threads N (default 1; 0: every core this process may run on) pins the process to N cores
before JAX starts (XLA sizes its CPU thread pool by the schedulable cores: one tf_XLAEigen thread per
core, checked in /proc) and sets torch's intra-op threads
to N. Then the phases: prefill alone, generate(1 token) against generate(N) (the cost of one decode
step), the sampling alone, and for comparison a Python loop of one jitted decode step per token (what
dispatching and a host sync per token would cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SHAPE = "demo"  # megadoc_jax.config.MODEL_SIZES: hidden 128, 4 layers, vocab 2048
PAD_ID = 0


def pin_threads(threads: int) -> int:
    """Restricts this process to `threads` of its schedulable cores (0: all of them); returns the count.
    Must run before JAX creates its CPU client."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < 0 or threads > len(cores):
        raise SystemExit(f"error: --threads {threads}: this process may run on {len(cores)} cores")
    if threads:
        os.sched_setaffinity(0, cores[:threads])
    return threads or len(cores)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f} ms"


class Prompts:
    """Random prompts of lengths in [prompt_len // 2, prompt_len], one seed per row."""

    def __init__(self, batch: int, prompt_len: int, vocab: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, batch)
        self.rows = [tuple(int(t) for t in rng.integers(1, vocab, n)) for n in lengths]
        self.seeds = [1000 + row for row in range(batch)]
        self.width = prompt_len


def save_random_llama(shape: str, dtype: str, context: int, directory: Path, vocab: int | None) -> Any:
    """A random transformers Llama of a megadoc_jax preset shape, saved as safetensors; returns the ModelConfig."""
    import torch
    import transformers

    from megadoc_jax import config as config_lib
    from megadoc_jax import hf

    overrides = {"size": shape, **({"vocab_size": vocab} if vocab else {})}
    cfg = config_lib.from_dict({"model": overrides}).model
    # Only the special ids matter here: EOS is never forced (see the module docstring).
    tokenizer = types.SimpleNamespace(bos_token_id=None, eos_token_id=PAD_ID, pad_token_id=PAD_ID)
    llama_json = hf.llama_config_json(cfg, context, tokenizer, dtype)
    llama_json.pop("model_type"), llama_json.pop("architectures")
    torch.manual_seed(0)
    # initializer_range 0.1: logits spread over a few nats, so sampling is not near-uniform noise.
    config = transformers.LlamaConfig(**llama_json, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(directory), safe_serialization=True)
    return cfg


class OurSide:
    """decode.Sampler (what the jax backend runs) on the imported Llama, plus jitted phase probes."""

    def __init__(self, directory: Path, dtype: str, prompts: Prompts, new_tokens: int, sampling: Any):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from megadoc_jax import decode, hf, sharding

        mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        model, self.cfg, _ = hf.import_llama(directory, mesh, compute_dtype=dtype)
        self.device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
        # An EOS id outside the vocabulary: no row ever stops early, every row makes new_tokens tokens.
        self.sampler = decode.Sampler(model, eos_ids=[self.cfg.vocab_size], pad_id=PAD_ID)
        self.prompts, self.new_tokens, self.sampling = prompts, new_tokens, sampling
        arrays = decode.pad_prompts(prompts.rows, prompts.width, "right", PAD_ID)
        self.arrays = tuple(jnp.asarray(a) for a in arrays)
        self.keys_B = decode.seed_keys(prompts.seeds)
        graphdef, params = nnx.split(model)
        self.params = params
        cfg, batch, slots = self.cfg, len(prompts.rows), prompts.width + new_tokens

        def prefill(params, tokens_BxP, start_B, next_B):
            cache = decode.init_cache(cfg, batch, slots)
            return decode.prefill(nnx.merge(graphdef, params), tokens_BxP, start_B, next_B, cache)

        # The layers sliced once, as generate_tokens slices them before its loop.
        block_graphs, self.block_states = zip(*(nnx.split(b) for b in decode.layer_blocks(model)))

        def step(params, block_states, tokens_B, cache, keys_B, index):
            blocks = [nnx.merge(g, s) for g, s in zip(block_graphs, block_states)]
            logits_BxV, cache = decode.decode_step(nnx.merge(graphdef, params), tokens_B, cache, blocks)
            return decode.sample_tokens(logits_BxV, keys_B, index, sampling), cache

        def sample_only(logits_BxV, keys_B):
            # new_tokens draws, as the loop makes them; each depends on the previous, so none is skipped.
            def body(index, carry):
                token_B, logits_BxV = carry
                drawn_B = decode.sample_tokens(logits_BxV, keys_B, index, sampling)
                return drawn_B, logits_BxV.at[:, 0].add(drawn_B.astype(logits_BxV.dtype) * 1e-30)

            return jax.lax.fori_loop(0, new_tokens, body, (jnp.zeros((batch,), jnp.int32), logits_BxV))[0]

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, donate_argnums=(3,))
        self._sample_only = jax.jit(sample_only)

    def generate(self, new_tokens: int | None = None) -> list:
        n = new_tokens or self.new_tokens
        return self.sampler.generate(self.prompts.rows, self.prompts.seeds, self.sampling, n, width=self.prompts.width)

    def prefill(self):
        import jax

        return jax.block_until_ready(self._prefill(self.params, *self.arrays))

    def sample_only(self):
        import jax

        if not hasattr(self, "_logits_BxV"):
            self._logits_BxV = self.prefill()[0]
        return jax.block_until_ready(self._sample_only(self._logits_BxV, self.keys_B))

    def dispatch_loop(self) -> list:
        """One jitted decode step per token from Python, the token fetched to the host each step."""
        import jax
        import jax.numpy as jnp

        from megadoc_jax import decode

        logits_BxV, cache = self._prefill(self.params, *self.arrays)
        token_B = decode.sample_tokens(logits_BxV, self.keys_B, jnp.int32(0), self.sampling)
        out = [jax.device_get(token_B)]
        for index in range(1, self.new_tokens):
            token_B, cache = self._step(self.params, self.block_states, token_B, cache, self.keys_B, jnp.int32(index))
            out.append(jax.device_get(token_B))
        return out


class TheirSide:
    """transformers' LlamaForCausalLM.generate (sampling, dynamic cache) on the same directory."""

    def __init__(self, directory: Path, dtype: str, device: str, prompts: Prompts, new_tokens: int, sampling: Any):
        import torch
        import transformers

        self.torch = torch
        self.device = torch.device(device)
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            str(directory), dtype=getattr(torch, dtype), local_files_only=True
        )
        self.model = self.model.to(self.device).eval()
        # No EOS: the model's own generation defaults (and its eos id) must not apply.
        self.model.generation_config = transformers.GenerationConfig(pad_token_id=PAD_ID)
        width = max(len(p) for p in prompts.rows)
        ids = [[PAD_ID] * (width - len(p)) + list(p) for p in prompts.rows]  # left padding, as generate wants
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts.rows]
        self.ids = torch.tensor(ids, device=self.device)
        self.mask = torch.tensor(mask, device=self.device)
        self.width, self.new_tokens, self.sampling = width, new_tokens, sampling
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"

    def generate(self, new_tokens: int | None = None):
        n = new_tokens or self.new_tokens
        config = self.torch_config(n)
        with self.torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, generation_config=config)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        if out.shape[1] != self.width + n:
            raise RuntimeError(f"transformers generated {out.shape[1] - self.width} tokens a row, expected {n}")
        return out

    def torch_config(self, new_tokens: int):
        import transformers

        s = self.sampling
        return transformers.GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_k=s.top_k,  # 0: no top-k cut (transformers' default would be 50)
            top_p=s.top_p,
            max_new_tokens=new_tokens,  # and no EOS to stop at: exactly new_tokens
            pad_token_id=PAD_ID,
        )

    def last_logits(self):
        """fp32 logits of each prompt's last token, every prompt alone (no padding)."""
        import numpy as np

        rows = []
        with self.torch.inference_mode():
            for ids, mask in zip(self.ids, self.mask):
                real = ids[mask.bool()][None]
                rows.append(self.model(real).logits[0, -1].float().cpu().numpy())
        return np.stack(rows)


def check_same_model(ours: OurSide, theirs: TheirSide) -> float:
    """Max |difference| of the two sides' logits at each prompt's last token, relative to max |logit|."""
    import numpy as np

    logits_BxV, _ = ours.prefill()
    got, expected = np.asarray(logits_BxV, np.float32), theirs.last_logits()
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def build_parser() -> argparse.ArgumentParser:
    from megadoc_jax import config as config_lib

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=DEFAULT_SHAPE, choices=sorted(config_lib.MODEL_SIZES), help="model preset")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: the preset's)")
    parser.add_argument("--batch", type=int, default=8, help="rows (prompt x seed) per generate call")
    parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt; lengths are drawn in [P/2, P]")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row, exactly")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side, interleaved")
    # Default 1: on a shared machine torch's OpenMP threads spin against the other jobs and its time
    # collapses (docs/generation.md, "Throughput"); 0 takes every core this process may run on.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (0: every core)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: bf16 on GPU")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-phases", action="store_true", help="skip the phase breakdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.batch, args.prompt_len, args.rounds) <= 0 or args.new_tokens < 2:
        parser.error("--batch, --prompt-len and --rounds must be positive and --new-tokens at least 2")
    threads = pin_threads(args.threads)  # before JAX starts

    import jax
    import torch

    from megadoc_jax import decode

    torch.set_num_threads(threads)
    on_gpu = jax.default_backend() == "gpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    torch_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    sampling = decode.SamplingConfig(args.temperature, args.top_k, args.top_p)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cfg = save_random_llama(args.shape, dtype, args.prompt_len + args.new_tokens, Path(tmp), args.vocab or None)
        prompts = Prompts(args.batch, args.prompt_len, cfg.vocab_size)
        ours = OurSide(Path(tmp), dtype, prompts, args.new_tokens, sampling)
        theirs = TheirSide(Path(tmp), dtype, torch_device, prompts, args.new_tokens, sampling)
        built = time.perf_counter() - start
    print(
        f"model {args.shape}: {cfg.layers} layers, hidden {cfg.hidden}, heads {cfg.heads}/{cfg.kv_heads}, "
        f"vocab {cfg.vocab_size}, {dtype}; batch {args.batch}, prompts {min(map(len, prompts.rows))}-"
        f"{max(map(len, prompts.rows))} tokens (ours padded to {prompts.width}), {args.new_tokens} new tokens "
        f"a row, {sampling}; built and loaded in {built:.1f} s"
    )
    print(
        f"ours: decode.Sampler on {ours.device}, jax {jax.__version__}; theirs: {theirs.version} on {torch_device}; "
        f"threads {threads} (JAX: schedulable cores {len(os.sched_getaffinity(0))}, torch {torch.get_num_threads()})"
    )
    gap = check_same_model(ours, theirs)
    print(f"same weights: max |logit difference| / max |logit| at each prompt's last token {gap:.1e}")
    throughput(ours, theirs, args.rounds, args.batch * args.new_tokens)
    if not args.no_phases:
        phases(ours, theirs, args.rounds, args.new_tokens)
    return 0


def throughput(ours: OurSide, theirs: TheirSide, rounds: int, tokens: int) -> None:
    """Output tokens/s of both sides over `rounds` interleaved rounds after one warm-up call each."""
    first_ours, first_theirs = timed(ours.generate), timed(theirs.generate)
    ours_s, theirs_s = [], []
    for _ in range(rounds):  # interleaved: both sides see the same load
        ours_s.append(timed(ours.generate))
        theirs_s.append(timed(theirs.generate))
    ours_m, theirs_m = statistics.median(ours_s), statistics.median(theirs_s)
    print(
        f"ours:         {tokens / ours_m:9.1f} output tokens/s (median {median_ms(ours_s)} a call; "
        f"first call {first_ours:.2f} s: compile about {first_ours - ours_m:.2f} s)"
    )
    print(
        f"transformers: {tokens / theirs_m:9.1f} output tokens/s (median {median_ms(theirs_s)} a call; "
        f"first call {first_theirs:.2f} s)"
    )
    ratios = ", ".join(f"{t / o:.2f}" for o, t in zip(ours_s, theirs_s))
    print(f"ratio ours / transformers: {theirs_m / ours_m:.2f}x of medians; per round {ratios}  (goal >= 1.0)")


def phases(ours: OurSide, theirs: TheirSide, rounds: int, new_tokens: int) -> None:
    """Where a call's time goes, per side; medians of `rounds` interleaved rounds."""
    probes = {
        "ours prefill (jitted prefill alone)": ours.prefill,
        "ours generate(1 token)": lambda: ours.generate(1),
        "ours sampling alone (N draws)": ours.sample_only,
        "ours Python loop of jitted steps": ours.dispatch_loop,
        "transformers generate(1 token)": lambda: theirs.generate(1),
    }
    compile_s = {name: timed(probe) for name, probe in probes.items()}  # warm-up, compiles
    seen: dict[str, list[float]] = {name: [] for name in probes}
    full: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(rounds):
        for name, probe in probes.items():
            seen[name].append(timed(probe))
        full["ours"].append(timed(ours.generate))
        full["transformers"].append(timed(theirs.generate))
    m = {name: statistics.median(s) for name, s in {**seen, **full}.items()}
    print(f"phases (median of {rounds} rounds; N = {new_tokens}):")
    for name in probes:
        print(f"  {name:40s} {m[name] * 1e3:9.2f} ms   (first call {compile_s[name]:.2f} s)")
    for side, one in (("ours", "ours generate(1 token)"), ("transformers", "transformers generate(1 token)")):
        per_token = (m[side] - m[one]) / (new_tokens - 1)
        # The decode steps are a difference of two medians: at a tiny size it can sit inside the
        # rounds' own spread (even come out negative), and then it says so rather than pass for a figure.
        spread = max(full[side]) - min(full[side]) + max(seen[one]) - min(seen[one])
        resolved = abs(m[side] - m[one]) >= spread
        unresolved = "" if resolved else "  (inside the rounds' spread: not resolved at this size)"
        print(
            f"  {side}: generate(N) {m[side] * 1e3:.2f} ms = generate(1) {m[one] * 1e3:.2f} ms "
            f"+ {new_tokens - 1} decode steps x {per_token * 1e3:.3f} ms{unresolved}"
        )
    ours_step = (m["ours"] - m["ours generate(1 token)"]) / (new_tokens - 1)
    sampling = m["ours sampling alone (N draws)"] / new_tokens
    dispatch = m["ours Python loop of jitted steps"] / new_tokens
    print(
        f"  ours per decode step {ours_step * 1e3:.3f} ms, of which sampling about {sampling * 1e3:.3f} ms; "
        f"a Python loop of jitted steps would take {dispatch * 1e3:.3f} ms a token"
    )


if __name__ == "__main__":
    sys.exit(main())
