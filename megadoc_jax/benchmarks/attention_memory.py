"""Per-device memory of context-parallel attention, from compiled programs (nothing runs).

For a fixed sequence length L and context axis C in {1, 2, 4, 8} over 8 devices (mesh data = 8/C,
context = C, one sequence per data shard, so each device holds L/C tokens of one sequence), compiles
  - `attention`: forward + backward of one attention call (q, k, v [B, L, H, K]), and
  - `step`: the whole train step of the decoder (--model's size, remat full, the default AdamW),
for ring and all_gather, and prints `memory_analysis()`'s temporary bytes per device and the ratio to
C = 1 (the goal for ring: close to 1/C). Compiles for the local devices (8 fake CPU devices) and, with
`--topology`, for a TPU slice of 8 chips through libtpu (see megadoc_jax/aot.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m megadoc_jax.benchmarks.attention_memory --seq 8192 --topology v5p:2x2x2
    python -m megadoc_jax.benchmarks.attention_memory --seq 32768 --model 300m --document-masking \\
        --topology v5e:2x4   # the long-context configs' shapes (about half an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from megadoc_jax import aot, sharding  # noqa: E402
from megadoc_jax import attention as attention_lib  # noqa: E402
from megadoc_jax import config as config_lib  # noqa: E402
from megadoc_jax import step as step_lib  # noqa: E402

CONTEXTS = (1, 2, 4, 8)
IMPLS = ("ring", "all_gather")


def _attention_temp(
    impl: str, mesh, length: int, heads: int, head_size: int, rows: int, segments: bool
) -> tuple[int, bool]:
    shape = (rows, length, heads, head_size)
    layout = sharding.named_sharding(mesh, ("batch", "seq", "heads", "head_dim"), shape)
    q = k = v = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=layout)
    seg = jax.ShapeDtypeStruct(
        shape[:2], jnp.int32, sharding=sharding.named_sharding(mesh, ("batch", "seq"), shape[:2])
    )

    def loss(q, k, v, seg):
        out = attention_lib.attention(q, k, v, segment_ids_BxL=seg if segments else None, impl=impl)
        return out.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        return _temp_bytes(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, seg))


def _step_temp(mesh, cfg: config_lib.Config) -> tuple[int, bool]:
    setup = step_lib.train_setup(cfg, mesh, total_steps=1000)
    step = step_lib.jit_train_step(setup, cfg, step_lib.batch_sharding(mesh, cfg))
    with jax.set_mesh(mesh):
        return _temp_bytes(step.lower(setup.abstract_state, step_lib.abstract_batch(mesh, cfg)))


def _temp_bytes(lowered) -> tuple[int, bool]:
    """(temporary bytes per device of the compiled program, whether the compiler refused it). A TPU
    compile refused for lack of HBM says in its message how much the program needs; that figure is used."""
    try:
        return lowered.compile().memory_analysis().temp_size_in_bytes, False
    except jax.errors.JaxRuntimeError as e:
        needed = aot.temp_bytes_from_error(str(e))
        if needed is None:
            raise
        return needed, True


def _table(title: str, temps: dict[tuple[str, int], tuple[int, bool]]) -> None:
    print(f"\n{title}")
    print(f"{'C':>3} " + " ".join(f"{impl + ' temp':>16} {'ratio':>6}" for impl in IMPLS))
    for c in CONTEXTS:
        cells = []
        for impl in IMPLS:
            (base, _), (value, refused) = temps[(impl, 1)], temps[(impl, c)]
            cells.append(f"{aot.format_bytes(value):>15}{'*' if refused else ' '} {value / base:6.3f}")
        print(f"{c:>3} " + " ".join(cells) + f"   (1/C = {1 / c:.3f})")
    if any(refused for _, refused in temps.values()):
        print("  * the TPU compiler refused the program (more than the chip's HBM); its message's figure")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="total sequence length L")
    parser.add_argument("--model", default="tiny", help="model.size of the step (tiny, 150m, 300m, ...)")
    parser.add_argument("--topology", default="", help="also compile for this 8-chip TPU slice, e.g. v5p:2x2x2")
    parser.add_argument("--no-step", action="store_true", help="attention only (the step compiles slowly)")
    parser.add_argument("--document-masking", action="store_true", help="segment ids in attention and step")
    parser.add_argument("--tpu-only", action="store_true", help="with --topology: skip the local devices")
    args = parser.parse_args()

    targets = [] if args.tpu_only and args.topology else [("local " + jax.devices()[0].platform, jax.devices()[:8])]
    if args.topology:
        targets.append((f"TPU {args.topology}", aot.tpu_topology_devices(args.topology)))
    for name, devices in targets:
        if len(devices) != 8:
            raise SystemExit(f"{name}: needs 8 devices, has {len(devices)}")
        attention, step = {}, {}
        for impl in IMPLS:
            for c in CONTEXTS:
                mesh = sharding.make_mesh({"data": 8 // c, "context": c}, devices=devices)
                cfg = config_lib.load(
                    None,
                    [
                        f"model.size={args.model}",
                        f"model.attention={impl}",
                        "model.remat=full",
                        f"data.seq_len={args.seq}",
                        f"train.batch_size={8 // c}",
                        f"data.document_masking={str(args.document_masking).lower()}",
                    ],
                )
                m, segments = cfg.model, args.document_masking
                attention[(impl, c)] = _attention_temp(impl, mesh, args.seq, m.heads, m.head_size, 8 // c, segments)
                if not args.no_step:
                    step[(impl, c)] = _step_temp(mesh, cfg)
                print(f"compiled {name} {impl} C={c}", flush=True)
        _table(f"{name}: attention fwd+bwd, L={args.seq}, temp bytes per device (ratio to C=1)", attention)
        if step:
            _table(f"{name}: train step, model {args.model}, L={args.seq}, temp bytes per device", step)


if __name__ == "__main__":
    main()
