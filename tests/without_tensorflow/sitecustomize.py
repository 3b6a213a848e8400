"""On PYTHONPATH, makes this interpreter behave as if TensorFlow and tfds were not installed,
as on a GPU machine without them: `import tensorflow` raises ImportError and
`importlib.util.find_spec("tensorflow")` is None (what etils checks). The tests' CLI runs and the
benchmark smoke test run under it, so the device-resident training path and
benchmarks/accelerator.py stay free of TensorFlow."""
import sys

for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
