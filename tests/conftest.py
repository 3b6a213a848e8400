"""Test setup shared by every test file.

8 fake CPU devices make the data-parallel code testable without accelerators; this must be set
before JAX initialises its backends, hence at import time here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
