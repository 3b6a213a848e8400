"""Importing the package changes nothing in the user's process: no logging handler, file
descriptor, environment variable, jax setting, TensorFlow device visibility or tfds progress
bar is touched by `import resnet_v2_jax.<module>`, for every module. What the command lines
need (quiet TensorFlow, 64-bit JAX for float64 configs) they do themselves (`cli`)."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "resnet_v2_jax").glob("*.py") if p.stem != "__init__")

# Runs in a fresh interpreter: the libraries are imported first (their own import-time effects
# are theirs), the calls that change a process are wrapped to record any call, then each module
# of the package is imported and the process compared with its state before.
PROBE = r"""
import importlib, json, logging, os, sys
import jax, flax, optax, orbax.checkpoint, tensorflow as tf, tensorflow_datasets as tfds
import matplotlib, tensorboard, absl.logging
calls = []
def record(name, function):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)
    return wrapper
tf.config.set_visible_devices = record("tf.config.set_visible_devices", tf.config.set_visible_devices)
tfds.disable_progress_bar = record("tfds.disable_progress_bar", tfds.disable_progress_bar)
jax.config.update = record("jax.config.update", jax.config.update)
os.dup2 = record("os.dup2", os.dup2)

def state():
    handlers = logging.getLogger().handlers + logging.getLogger("absl").handlers
    return {"fds": sorted(os.listdir("/proc/self/fd")),
            "stderr": os.readlink("/proc/self/fd/2"),
            "environ": dict(os.environ),
            "handlers": [repr(h) for h in handlers],
            "filters": [repr(f) for h in handlers for f in h.filters],
            "levels": [logging.getLogger().level, logging.getLogger("absl").level],
            "jax": {k: repr(v) for k, v in jax.config.values.items()}}

report = {}
for module in sys.argv[1:]:
    before, calls[:] = state(), []
    importlib.import_module(f"resnet_v2_jax.{module}")
    after = state()
    report[module] = {"calls": list(calls),
                      "changed": [k for k in before if before[k] != after[k]]}
print(json.dumps(report))
"""


def test_importing_any_module_changes_nothing_in_the_process():
    result = subprocess.run([sys.executable, "-c", PROBE, *MODULES], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(MODULES)
    assert {m: r for m, r in report.items() if r["calls"] or r["changed"]} == {}


def test_float64_is_turned_on_by_the_command_line_not_by_building_a_network():
    code = ("import jax\n"
            "from resnet_v2_jax import base_config\n"
            "from resnet_v2_jax import recipe\n"
            "config = base_config.cifar('cifar10', 20, float64=True)\n"
            "try:\n"
            "    recipe.create_model(config, 10)\n"
            "except ValueError as e:\n"
            "    print(e)\n"
            "print(jax.config.jax_enable_x64)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "float64=True needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) before "
        "building (the command line does)", "False"]


# Imports inside functions, each for a reason other than a cycle: TensorFlow (tfds_input) only
# where tfds is read, the training stack (runs) only for a run as init_from.
LAZY_IMPORTS = {("device_input", "tfds_input"), ("inputs", "tfds_input"),
                ("write_arrays", "tfds_input"), ("pretrained", "runs")}


def test_the_package_s_imports_run_one_way():
    """No cycle among the package's modules, and no import inside a function but the lazy
    ones above (an import hidden in a function is how a cycle hides)."""
    import ast
    graph, lazy = {}, set()
    for path in (pathlib.Path(ROOT) / "resnet_v2_jax").glob("*.py"):
        module = path.stem
        graph[module] = set()
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body} | {   # a command's `if __name__ == "__main__"`
            id(node) for block in tree.body if isinstance(block, ast.If) for node in block.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "resnet_v2_jax":
                names = {alias.name for alias in node.names}
                graph[module] |= names
                if id(node) not in top:
                    lazy |= {(module, name) for name in names}
    assert lazy == LAZY_IMPORTS
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(trail + [module])}"
        state[module] = "open"
        for other in graph.get(module, ()):
            visit(other, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
