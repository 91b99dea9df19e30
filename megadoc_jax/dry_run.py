"""`python -m megadoc_jax.train --dry-run [--topology NAME]`: check a config before spending hardware time.

Without a topology: validate the config for this machine's devices, build the model and optimizer state
abstractly (nothing is allocated, so a 1.5b model is fine on a laptop), print `parameters: N` and the
per-device memory of the train state for the configured mesh.

With a TPU topology (e.g. v5e:16x16, v5p:4x4x4, v4:2x2x2; needs the `tpu` extra, i.e. libtpu): also compile
the real train step ahead of time for that topology on this CPU machine and report per-device memory
against the chip's HBM and the step's FLOPs from the compiled program. Exits 1 when it does not fit.
"""

from __future__ import annotations

import jax

from megadoc_jax import aot, hardware, metrics, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import step as step_lib


def abstract_setup(
    config: config_lib.Config, devices: list[jax.Device]
) -> tuple[dict[str, int], jax.sharding.Mesh, step_lib.TrainSetup]:
    """The mesh axis sizes, the mesh and the abstract train setup of `config` over `devices` (real or a TPU
    topology's): shapes, divisibility and the attention backend's mesh needs are checked, nothing allocated.
    ConfigError names the key of a problem."""
    mesh_sizes = config_lib.validate_for_devices(config, len(devices))
    mesh = sharding.make_mesh(mesh_sizes, devices, config.mesh.dcn_data)
    return mesh_sizes, mesh, step_lib.train_setup(config, mesh, max(config.train.steps, 1))


def compile_train_step(config: config_lib.Config, mesh: jax.sharding.Mesh, setup: step_lib.TrainSetup) -> dict:
    """aot.compile_report of the real train step of `config` on `mesh` (ahead of time: nothing runs)."""
    train_step = step_lib.jit_train_step(setup, config, step_lib.batch_sharding(mesh, config))
    with jax.set_mesh(mesh):  # activations follow the rule table through `sharding.constrain`
        return aot.compile_report(train_step, (setup.abstract_state, step_lib.abstract_batch(mesh, config)))


def main(config: config_lib.Config, topology: str | None) -> int:
    # a multislice config (mesh.dcn_data > 1) compiles for that many slices of the topology
    devices = aot.tpu_topology_devices(topology, config.mesh.dcn_data) if topology else jax.devices()
    mesh_sizes, mesh, setup = abstract_setup(config, devices)
    device_kind = devices[0].device_kind
    print(f"mesh: {mesh_sizes} over {len(devices)} x {device_kind}")
    print(f"parameters: {setup.num_parameters}")
    state_bytes = aot.state_bytes_per_device(setup.abstract_state)
    capacity = hardware.hbm_bytes_per_device(device_kind)
    print("train state (parameters + AdamW moments) per device: " + aot.format_fit(state_bytes, device_kind, capacity))
    flops = metrics.train_flops_per_token(config.model, config.data.seq_len)
    print(f"model FLOPs per token (forward + backward): {flops:.4g}")
    if capacity is not None and state_bytes > capacity:
        print("the train state alone does not fit: shard it further (mesh.fsdp) or use a smaller model")
        return 1
    if not topology:
        return 0

    report = compile_train_step(config, mesh, setup)
    print(aot.format_compile_report(report))
    if report["memory"] is not None:  # None: the compiler refused the program (it does not fit)
        tokens = config.train.batch_size * config.data.seq_len
        print(
            f"compiled FLOPs per device per step {report['flops_per_device']:.4g} vs the model formula "
            f"{flops * tokens / len(devices):.4g} (6N + causal attention, per device)"
        )
    return 0 if report["fits"] in (True, None) else 1
