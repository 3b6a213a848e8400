"""README.md stays true: its code snippets run, and its tables name every config and module."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPET_MARK = "# readme-snippet"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


SNIPPETS = [block for block in python_blocks() if block.startswith(SNIPPET_MARK)]


def test_use_in_your_own_code_has_its_snippets():
    assert len(SNIPPETS) == 3, f"expected 3 ```python blocks starting with {SNIPPET_MARK}"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_the_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"),
         {"__name__": "readme_snippet"})


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                        if p.stem not in ("__init__", "default", "ablation")))
def test_every_config_is_in_the_table(path):
    assert f"`{path}`" in README


def test_every_config_in_the_table_exists():
    first_cells = [line.split("|")[1] for line in README.splitlines() if line.startswith("| `")]
    names = [name for cell in first_cells for name in re.findall(r"`(\w+\.py)`", cell)]
    assert len(names) > 15
    for name in names:
        assert (ROOT / "configs" / name).exists(), name


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "resnet_v2_jax").glob("*.py")
                                          if p.stem != "__init__"))
def test_every_module_is_in_the_design_table(module):
    assert f"| `resnet_v2_jax/{module}` |" in README


def test_the_repository_cites_only_itself():
    """Code, configs, launch scripts and docs cite documents of this repository, by headings
    that exist; none points outside the checkout (users have no ../shared)."""
    paths = [*ROOT.glob("resnet_v2_jax/*.py"), *ROOT.glob("configs/*.py"),
             *ROOT.glob("launch/*"), *ROOT.glob("docs/*.md")]
    text = "\n".join(path.read_text() for path in paths)
    for path in paths:
        body = path.read_text()
        assert "PAPER.md" not in body and "../shared" not in body, path
    paper_headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "paper.md").read_text(), re.M))
    cited = set(re.findall(r'docs/paper\.md, "([^"]+)"', text))
    assert cited and cited <= paper_headings, cited - paper_headings
    readme_headings = set(re.findall(r"^## (.+)$", README, re.M))
    sections = set(re.findall(r"README\.md, section '([^']+)'", text))
    assert sections <= readme_headings, sections - readme_headings
