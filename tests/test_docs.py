"""README.md and docs/ stay true: every Python snippet runs, every command names a command,
flags, config files and config keys that exist, the tables name every config and module, and
the repository cites only documents of its own, by headings that exist."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

from resnet_v2_jax import cli, configuration

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def python_blocks():
    return [(path.relative_to(ROOT), block) for path in DOCS
            for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)]


def commands():
    """Every `python -m resnet_v2_jax.<module> ...` command of the docs, continuation lines
    joined: (document, module, arguments)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                for match in re.finditer(r"python -m resnet_v2_jax\.(\w+)((?: +[^ ;&|#]+)*)",
                                         line):
                    found.append((path.relative_to(ROOT), match[1], match[2].split()))
    return found


SNIPPETS = python_blocks()
COMMANDS = commands()


def test_the_readme_is_short_and_has_its_two_snippets():
    assert len(README.read_text().splitlines()) <= 250
    assert sum(path == README.relative_to(ROOT) for path, _ in SNIPPETS) == 2  # linen, NNX


@pytest.mark.parametrize("index", range(len(SNIPPETS)),
                         ids=[f"{p}:{i}" for i, (p, _) in enumerate(SNIPPETS)])
def test_the_snippet_runs(index):
    path, code = SNIPPETS[index]
    exec(compile(code, f"{path} snippet", "exec"), {"__name__": "doc_snippet"})


PROBE = r"""
import importlib, json, sys
from absl import flags
found = {}
for module in sys.argv[1:]:
    before = set(flags.FLAGS)
    imported = importlib.import_module(f"resnet_v2_jax.{module}")
    getattr(imported, "define_flags", lambda: None)()
    found[module] = sorted(set(flags.FLAGS) - before)
    for name in found[module]:
        delattr(flags.FLAGS, name)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def command_flags():
    """{module: the flags its command defines}, for every module the docs run."""
    modules = sorted({module for _, module, _ in COMMANDS})
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_docs_show_every_command():
    assert {module for _, module, _ in COMMANDS} >= {
        "main", "evaluate", "export", "analyze", "summary", "plot", "write_arrays", "preflight"}


@pytest.mark.parametrize("index", range(len(COMMANDS)),
                         ids=[f"{p}:{m}:{i}" for i, (p, m, _) in enumerate(COMMANDS)])
def test_the_command_names_flags_configs_and_keys_that_exist(index, command_flags):
    path, module, arguments = COMMANDS[index]
    for argument in arguments:
        if not argument.startswith("--") or "$" in argument:  # shell variables: not checkable
            continue
        name, _, value = argument[2:].partition("=")
        if name.startswith("config."):
            key = name[len("config."):]
            configs = [a.split("=", 1)[1] for a in arguments if a.startswith("--config=")]
            for spec in configs:
                assert key in configuration.flatten(load(spec)), (path, argument, spec)
            continue
        assert name in command_flags[module] + ["help", "helpfull"], (path, module, argument)
        if name == "config":
            load(value)  # exists and builds


@pytest.mark.slow
def test_the_documented_evaluate_output_has_the_commands_shape(tmp_path, array_dir):
    """docs/using.md's evaluate command, run on a short run, prints lines of the shape the doc
    shows (every number aside)."""
    from cli_runs import environment, run
    section = (ROOT / "docs" / "using.md").read_text().split("## Evaluating a checkpoint")[1]
    commands, output = re.findall(r"```(?:bash)?\n(.*?)```", section, flags=re.DOTALL)[:2]
    documented = commands.splitlines()[0].split()
    assert documented[:3] == ["python", "-m", "resnet_v2_jax.evaluate"], documented
    workdir = str(tmp_path / "run")
    run(workdir, array_dir)
    arguments = [a.replace("/tmp/cifar10_quick", workdir) for a in documented[3:]]
    result = subprocess.run([sys.executable, "-m", "resnet_v2_jax.evaluate", *arguments],
                            cwd=ROOT, env=environment(), text=True, capture_output=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shape = lambda lines: [re.sub(r"\d+(?:\.\d+)?", "<n>", line) for line in lines]
    printed = result.stdout.replace(workdir, "/tmp/cifar10_quick").strip().splitlines()
    assert shape(printed) == shape(output.strip().splitlines())


def load(spec):
    """A config named as on the command line (`configs/x.py` or `configs/x.py:args`)."""
    file, _, arg = spec.partition(":")
    assert (ROOT / file).is_file(), spec
    module = cli.import_config_file(str(ROOT / file))
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                        if p.stem not in ("__init__", "default", "ablation")))
def test_every_config_is_in_the_readme_table(path):
    assert f"`{path}`" in README.read_text()


def test_every_config_in_the_table_exists():
    first_cells = [line.split("|")[1] for line in README.read_text().splitlines()
                   if line.startswith("| `")]
    names = [name for cell in first_cells for name in re.findall(r"`(\w+\.py)`", cell)]
    assert len(names) > 15
    for name in names:
        assert (ROOT / "configs" / name).exists(), name


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "resnet_v2_jax").glob("*.py")
                                          if p.stem != "__init__"))
def test_every_module_is_in_the_design_table(module):
    assert f"| `resnet_v2_jax/{module}` |" in (ROOT / "docs" / "design.md").read_text()


def test_the_repository_cites_only_itself():
    """Code, configs, launch scripts and docs cite documents of this repository, by headings
    that exist; none points outside the checkout (users have no ../shared)."""
    paths = [*ROOT.glob("resnet_v2_jax/*.py"), *ROOT.glob("configs/*.py"),
             *ROOT.glob("launch/*"), *ROOT.glob("docs/*.md")]
    text = "\n".join(path.read_text() for path in paths)
    for path in paths:
        body = path.read_text()
        assert "PAPER.md" not in body and "../shared" not in body, path
    cited = set(re.findall(r'docs/(\w+)\.md, "([^"]+)"', text))
    assert ("paper", "Training recipes") in cited
    for document, heading in cited:
        headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / f"{document}.md").read_text(),
                              re.M)
        assert heading in headings, (document, heading)
    readme_headings = set(re.findall(r"^## (.+)$", README.read_text(), re.M))
    sections = set(re.findall(r"README\.md, section '([^']+)'", text))
    assert sections <= readme_headings, sections - readme_headings
    for link in re.findall(r"\]\((docs/[\w.]+)\)", README.read_text()):
        assert (ROOT / link).is_file(), link
