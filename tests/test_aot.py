"""Tests of megadoc_jax.aot: compile reports on the 8 fake CPU devices, state estimates, TPU topologies.

The TPU tests compile real TPU programs on this CPU machine with libtpu (the `tpu` extra), under
JAX_PLATFORMS=cpu as set by conftest.py; they are skipped, with the reason, where libtpu is missing.
"""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from megadoc_jax import aot, hardware

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install "megadoc-jax[tpu]")')

B, D, F = 256, 512, 1024  # batch, model width, hidden width of the test MLP


def _mesh(devices, shape):
    return Mesh(np.array(devices).reshape(shape), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _mlp_grad_step(mesh):
    """A jitted SGD step of a two-matmul MLP: fp32 params split over fsdp, bf16 batch over all devices."""

    def loss(params, x_BxD):
        h_BxF = jax.nn.gelu(x_BxD @ params["w1"].astype(x_BxD.dtype))
        y_BxD = h_BxF @ params["w2"].astype(x_BxD.dtype)
        return jnp.mean(y_BxD.astype(jnp.float32) ** 2)

    def step(params, x_BxD):
        grads = jax.grad(loss)(params, x_BxD)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    param_shardings = {"w1": NamedSharding(mesh, P(None, "fsdp")), "w2": NamedSharding(mesh, P("fsdp", None))}
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    jitted = jax.jit(
        step, in_shardings=(param_shardings, batch_sharding), out_shardings=param_shardings, donate_argnums=0
    )
    params = {
        "w1": jax.ShapeDtypeStruct((D, F), jnp.float32, sharding=param_shardings["w1"]),
        "w2": jax.ShapeDtypeStruct((F, D), jnp.float32, sharding=param_shardings["w2"]),
    }
    batch = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=batch_sharding)
    return jitted, (params, batch)


def _check_mlp_report(report, num_devices, fsdp):
    param_bytes = 2 * D * F * 4 // fsdp  # both matrices, fp32, split over the fsdp axis
    batch_bytes = B * D * 2 // num_devices
    m = report["memory"]
    assert report["num_devices"] == num_devices
    assert m["argument_bytes"] == param_bytes + batch_bytes
    assert m["alias_bytes"] == param_bytes  # the donated params are updated in place
    assert param_bytes <= m["output_bytes"] <= param_bytes + 1024  # plus a small tuple index table
    assert m["total_bytes"] >= param_bytes + batch_bytes
    assert m["required_bytes"] == max(m["total_bytes"], m["peak_bytes"])
    # Matmul FLOPs: forward 2 * 2BDF, backward 3 * 2BDF (no gradient for the input batch) = 10 BDF.
    # The rest is the elementwise GELU, square and update.
    expected_flops = 10 * B * D * F / num_devices
    assert 1.0 <= report["flops_per_device"] / expected_flops < 1.1
    assert report["flops_count_loops_once"] is False


def test_compile_report_cpu_sharded_grad_step():
    mesh = _mesh(jax.devices()[:8], (2, 4))
    jitted, args = _mlp_grad_step(mesh)
    report = aot.compile_report(jitted, args)
    assert report["platform"] == "cpu"
    _check_mlp_report(report, num_devices=8, fsdp=4)
    # CPU has no entry in the HBM table: the fit is not judged, and the text says so.
    assert report["device_memory_bytes"] is None and report["fits"] is None
    text = aot.format_compile_report(report)
    assert "8 x cpu" in text and "fit not checked" in text


def test_compile_report_flags_loops_that_cost_analysis_counts_once():
    # Four scanned matmuls: XLA's count is that of one, and the report says so.
    w = jax.ShapeDtypeStruct((4, 128, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32)
    scanned = jax.jit(lambda w, x: jax.lax.scan(lambda h, w_i: (h @ w_i, None), x, w)[0])
    report = aot.compile_report(scanned, (w, x))
    assert report["flops_count_loops_once"] is True
    assert report["flops_per_device"] < 2 * (2 * 32 * 128 * 128)
    assert "counts each loop body once" in aot.format_compile_report(report)


def test_state_bytes_per_device_and_bad_leaves():
    mesh = _mesh(jax.devices()[:8], (2, 4))
    fsdp = NamedSharding(mesh, P("fsdp", None))
    replicated = NamedSharding(mesh, P())
    state = {
        "params": {"w": jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=fsdp)},  # 256 rows each
        "adam": [jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=fsdp)] * 2,
        "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "bias": jax.ShapeDtypeStruct((64,), jnp.bfloat16, sharding=replicated),
    }
    assert aot.state_bytes_per_device(state) == 3 * 256 * 64 * 4 + 4 + 64 * 2
    with pytest.raises(ValueError, match=r"\['odd'\] cannot be split"):
        aot.state_bytes_per_device({"odd": jax.ShapeDtypeStruct((10, 3), jnp.float32, sharding=fsdp)})
    with pytest.raises(ValueError, match=r"\['params'\]\['b'\].*no sharding"):
        aot.state_bytes_per_device({"params": {"b": jax.ShapeDtypeStruct((4,), jnp.float32)}})


def test_format_fit_says_plainly():
    gib = 2**30
    assert aot.format_fit(12 * gib, "TPU v5 lite", 16 * gib).endswith("(75.0%, vendor HBM figure): fits")
    assert aot.format_fit(15 * gib, "TPU v5 lite", 16 * gib).endswith("fits, but with under 10% headroom")
    assert aot.format_fit(17 * gib, "TPU v5 lite", 16 * gib).endswith("DOES NOT FIT")


def test_bad_topology_name_is_refused():
    with pytest.raises(aot.AotError, match="GENERATION:AxB"):
        aot.tpu_topology_devices("v5litepod-4")
    with pytest.raises(aot.AotError, match="'v9:2x2'"):
        aot.tpu_topology_devices("v9:2x2")


def test_missing_libtpu_names_the_tpu_extra(monkeypatch):
    # A None entry in sys.modules makes `import libtpu` fail, as in an install without the tpu extra
    # (where nothing has set TPU_LIBRARY_PATH either: importing libtpu is what sets it).
    monkeypatch.setitem(sys.modules, "libtpu", None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(aot.AotError, match=r"needs libtpu.*megadoc-jax\[tpu\]"):
        aot.tpu_topology_devices("v5e:2x2")


@needs_libtpu
@pytest.mark.parametrize(
    "name, num_devices, table_name",
    [
        ("v5e:2x2", 4, "TPU v5e"),
        ("v5e:1x1", 1, "TPU v5e"),
        ("v4:2x2x1", 4, "TPU v4"),  # megacore: one device per chip
        ("v5p:2x2x2", 8, "TPU v5p"),
        ("v6e:2x2", 4, "TPU v6e"),
        ("tpu7x:2x2x1", 8, "TPU7x"),  # two TensorCores per chip, two devices
    ],
)
def test_tpu_topology_devices_under_cpu_platform(name, num_devices, table_name):
    devices = aot.tpu_topology_devices(name)
    assert len(devices) == num_devices
    assert {d.platform for d in devices} == {"tpu"}
    # libtpu's device kind strings are the ones the peak/HBM table matches.
    assert hardware.accelerator(devices[0].device_kind).name == table_name
    assert jax.devices()[0].platform == "cpu"  # JAX_PLATFORMS=cpu still rules ordinary computation


@needs_libtpu
def test_compile_report_tpu_v5e_sharded_grad_step():
    devices = aot.tpu_topology_devices("v5e:2x2")
    jitted, args = _mlp_grad_step(_mesh(devices, (1, 4)))
    report = aot.compile_report(jitted, args)
    assert (report["platform"], report["device_kind"]) == ("tpu", "TPU v5 lite")
    _check_mlp_report(report, num_devices=4, fsdp=4)
    assert report["memory"]["generated_code_bytes"] > 0
    assert report["device_memory_bytes"] == 16 * 2**30 and report["fits"] is True
    assert "4 x TPU v5 lite" in aot.format_compile_report(report)


@needs_libtpu
def test_compile_report_tpu_says_when_it_does_not_fit():
    mesh = _mesh(aot.tpu_topology_devices("v5e:2x2"), (1, 4))
    replicated = NamedSharding(mesh, P())
    big = jax.ShapeDtypeStruct((5 * 2**30,), jnp.float32, sharding=replicated)  # 20 GiB on every chip
    report = aot.compile_report(jax.jit(lambda x: x * 2, donate_argnums=0), (big,))
    # The TPU compiler itself refuses a program that exceeds HBM; the report carries its reason.
    assert report["fits"] is False and report["memory"] is None
    assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
    assert "RESOURCE_EXHAUSTED" in report["compile_error"]
    assert "DOES NOT FIT" in aot.format_compile_report(report)


def test_temp_bytes_from_a_refused_compile():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(74.28G) exceeds available HBM (15.75G)."
    )
    assert aot.temp_bytes_from_error(message) == int(74.28 * 2**30)
    assert aot.temp_bytes_from_error("RESOURCE_EXHAUSTED: something else") is None
