"""The package as a user installs it: a wheel built from this checkout, in a fresh virtual
environment, run from a temporary directory that has no configs/ and no checkout.

The environment's dependencies are this test environment's own packages, seen through a folder
of links (no downloads): the core install's (every package but the [train] extra's), plus the
[train] extra's where a test trains.
"""
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import zipfile
import sysconfig

import pytest

import cli_runs
from resnet_v2_jax import cli

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The [train] extra's distributions and what they bring (setup.py's TRAIN), as the names of
# their site-packages entries begin; checked against the wheel's metadata below.
TRAIN_EXTRA = ("tensorflow", "tensorboard", "matplotlib", "mpl_toolkits", "pylab")
NOT_LINKED = ("resnet_v2_jax", "__editable__", "sitecustomize")


def _link_packages(folder: pathlib.Path, train_extra: bool) -> pathlib.Path:
    """A folder of links to this environment's installed packages: the [train] extra's when
    `train_extra`, every other one otherwise (never resnet_v2_jax itself)."""
    folder.mkdir()
    for entry in pathlib.Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(NOT_LINKED) or not entry.exists():
            continue
        if name.startswith(TRAIN_EXTRA) == train_extra:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding only the wheel and the core dependencies, a PYTHONPATH
    that adds the [train] extra, an empty working directory, the wheel)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so that building leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("resnet_v2_jax", "configs"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True, cwd=tmp, timeout=300)
    wheel, = (tmp / "dist").glob("resnet_v2_jax-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = pathlib.Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    core = _link_packages(tmp / "core", train_extra=False)
    (site / "core_dependencies.pth").write_text(f"{core}\n")
    train = _link_packages(tmp / "train_extra", train_extra=True)
    work = tmp / "anywhere"
    work.mkdir()
    return python, str(train), work, wheel


def command(installed, *args, train_extra=False, **env):
    python, train, work, _ = installed
    environment = {k: v for k, v in cli_runs.environment(1, **env).items()
                   if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if train_extra:
        environment["PYTHONPATH"] = train
    return subprocess.run([str(python), *args], cwd=work, env=environment, text=True,
                          capture_output=True, timeout=600)


def test_the_wheel_ships_the_configs_and_the_core_install_has_no_tensorflow(installed):
    python, _, _, wheel = installed
    result = command(installed, "-c", (
        "import importlib.util, resnet_v2_jax.models, resnet_v2_jax.nnx, resnet_v2_jax.parallel\n"
        "print(resnet_v2_jax.models.__file__)\n"
        "print([m for m in ('tensorflow', 'tensorboardX', 'matplotlib', 'configs')\n"
        "       if importlib.util.find_spec(m)])\n"))
    assert result.returncode == 0, result.stderr[-3000:]
    where, found = result.stdout.splitlines()
    assert where.startswith(str(python.parents[1])) and "site-packages" in where
    assert found == "[]"
    shipped = {p.name for p in (ROOT / "configs").glob("*.py")}
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], text=True,
                           capture_output=True, check=True).stdout
    assert {n for n in shipped if f"resnet_v2_jax/shipped/configs/{n}" in names} == shipped


def test_the_train_extra_is_the_same_in_setup_the_cli_and_these_tests(installed):
    """setup.py's [train] distributions (read from the wheel) provide every module the CLI
    names as the extra's (`cli.TRAIN_EXTRA`), each of them provides one, and the core install
    above leaves all their modules out."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(installed[3]) as wheel:
        meta = wheel.read(next(n for n in wheel.namelist()
                               if n.endswith(".dist-info/METADATA"))).decode()
    required = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    train = {canonicalize_name(r.name) for r in required
             if r.marker is not None and r.marker.evaluate({"extra": "train"})}
    # The gs:// clients are in the extra too; a gs:// path without them is refused by
    # rundir.resolve in one line (tests/test_gcs.py), not by the CLI's missing-module message.
    assert {"gcsfs", "google-cloud-storage"} <= train
    train -= {"gcsfs", "google-cloud-storage"}
    modules_of = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(canonicalize_name(distribution), set()).add(module)
    assert train and all(modules_of.get(d, set()) & set(cli.TRAIN_EXTRA) for d in train), train
    modules = set().union(*(modules_of[d] for d in train))
    assert set(cli.TRAIN_EXTRA) <= modules
    assert all(m.lower().startswith(TRAIN_EXTRA) for m in modules), modules


def test_the_cards_command_runs_from_any_directory(installed, array_dir):
    printed = command(installed, "-m", "resnet_v2_jax.main", "--config=configs/imagenet_200.py",
                      "--print_config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "model.depth = 200" in printed.stdout
    assert "# runs trained together" in printed.stdout  # the keys keep their meanings

    unknown = command(installed, "-m", "resnet_v2_jax.main", "--config=configs/imagenet_201.py",
                      "--print_config")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith(
        "error: config file configs/imagenet_201.py not found")
    assert "in: ablation, " in unknown.stderr and ", imagenet_200, " in unknown.stderr

    workdir = installed[2] / "run"
    # The command-line tests' run (tests/cli_runs.py), so its programs come from the cache.
    trained = command(installed, *cli_runs.command(workdir, array_dir, "--config.num_train_steps=2",
                                                   config="configs/cifar10_quick.py")[1:],
                      train_extra=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.startswith("step 2: test accuracy")
    assert (workdir / "results.json").is_file()


def test_a_missing_extra_is_named_in_one_line_before_anything_is_written(installed, array_dir):
    workdir = installed[2] / "no_extra"
    result = command(installed, "-m", "resnet_v2_jax.main", "--config=configs/cifar10_quick.py",
                     f"--workdir={workdir}", "--config.input_pipeline=device_resident",
                     f"--config.array_dir={array_dir}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: tensorboardX is not installed: training from .npz arrays needs only it, for the "
        "logs: pip install tensorboardX (or the whole [train] extra: pip install "
        "'resnet_v2_jax[train]')")
    assert not workdir.exists()
