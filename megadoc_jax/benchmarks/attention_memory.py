"""Per-device memory of context-parallel attention, from compiled programs (nothing runs).

For a fixed sequence length L and context axis C in {1, 2, 4, 8} over 8 devices (mesh data = 8/C,
context = C, one sequence per data shard, so each device holds L/C tokens of one sequence), compiles
  - `attention`: forward + backward of one attention call (q, k, v [B, L, H, K]), and
  - `step`: the whole train step of a small decoder (configs' model.size, remat full),
for ring and all_gather, and prints `memory_analysis()`'s temporary bytes per device and the ratio to
C = 1 (the goal for ring: close to 1/C). Compiles for the local devices (8 fake CPU devices) and, with
`--topology`, for a TPU slice of 8 chips through libtpu (see megadoc_jax/aot.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m megadoc_jax.benchmarks.attention_memory --seq 8192 --topology v5p:2x2x2
"""

from __future__ import annotations

import argparse
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from megadoc_jax import aot, sharding  # noqa: E402
from megadoc_jax import attention as attention_lib  # noqa: E402
from megadoc_jax import config as config_lib  # noqa: E402
from megadoc_jax import step as step_lib  # noqa: E402

CONTEXTS = (1, 2, 4, 8)
IMPLS = ("ring", "all_gather")


def _attention_temp(impl: str, mesh, length: int, heads: int, head_size: int, rows: int) -> int:
    shape = jax.ShapeDtypeStruct((rows, length, heads, head_size), jnp.bfloat16)
    layout = sharding.named_sharding(mesh, ("batch", "seq", "heads", "head_dim"), shape.shape)
    q = k = v = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=layout)

    def loss(q, k, v):
        return attention_lib.attention(q, k, v, impl=impl).astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _step_temp(impl: str, mesh, cfg: config_lib.Config) -> int:
    graphdef, params = nnx.split(sharding.abstract_model(cfg.model, mesh))
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1e-3)
    shardings = step_lib.state_shardings(params, tx)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    step = step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-3), cfg)
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, in_shardings=(shardings, step_lib.batch_sharding(mesh, cfg)))
        compiled = jitted.lower(state, step_lib.abstract_batch(mesh, cfg)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _table(title: str, temps: dict[tuple[str, int], int]) -> None:
    print(f"\n{title}")
    print(f"{'C':>3} " + " ".join(f"{impl + ' temp':>16} {'ratio':>6}" for impl in IMPLS))
    for c in CONTEXTS:
        cells = []
        for impl in IMPLS:
            base, value = temps[(impl, 1)], temps[(impl, c)]
            cells.append(f"{aot.format_bytes(value):>16} {value / base:6.3f}")
        print(f"{c:>3} " + " ".join(cells) + f"   (1/C = {1 / c:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="total sequence length L")
    parser.add_argument("--model", default="tiny", help="model.size of the step (tiny, 150m, 300m, ...)")
    parser.add_argument("--topology", default="", help="also compile for this 8-chip TPU slice, e.g. v5p:2x2x2")
    parser.add_argument("--no-step", action="store_true", help="attention only (the step compiles slowly)")
    args = parser.parse_args()

    targets = [("local " + jax.devices()[0].platform, jax.devices()[:8])]
    if args.topology:
        targets.append((f"TPU {args.topology}", aot.tpu_topology_devices(args.topology)))
    for name, devices in targets:
        if len(devices) != 8:
            raise SystemExit(f"{name}: needs 8 devices, has {len(devices)}")
        attention, step = {}, {}
        for impl in IMPLS:
            for c in CONTEXTS:
                mesh = sharding.make_mesh({"data": 8 // c, "context": c}, devices=devices)
                cfg = config_lib.load(None, [
                    f"model.size={args.model}", f"model.attention={impl}", "model.remat=full",
                    f"data.seq_len={args.seq}", f"train.batch_size={8 // c}",
                ])  # fmt: skip
                m = cfg.model
                attention[(impl, c)] = _attention_temp(impl, mesh, args.seq, m.heads, m.head_size, 8 // c)
                if not args.no_step:
                    step[(impl, c)] = _step_temp(impl, mesh, cfg)
                print(f"compiled {name} {impl} C={c}", flush=True)
        _table(f"{name}: attention fwd+bwd, L={args.seq}, temp bytes per device (ratio to C=1)", attention)
        if step:
            _table(f"{name}: train step, model {args.model}, L={args.seq}, temp bytes per device", step)


if __name__ == "__main__":
    main()
