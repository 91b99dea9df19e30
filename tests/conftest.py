"""Test setup: 8 fake CPU devices for sharding tests, set before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# Tests compile TPU programs ahead of time in several processes at once (pytest -n, subprocesses).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
