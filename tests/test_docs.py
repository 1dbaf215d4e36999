"""The documentation covers the public API and shows figures that exist."""

import pathlib
import re

import pytest

import gflow

DOCS = pathlib.Path(__file__).parent.parent / "docs"


def test_api_reference_covers_every_public_name():
    documented = set(
        re.findall(r"^::: gflow\.(\w+)", (DOCS / "api.md").read_text(), re.M)
    )
    public = {name for name in dir(gflow) if not name.startswith("_")}
    assert public - documented == set()


def test_every_figure_a_page_shows_is_in_the_docs():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), (page.name, target)


PAGES = sorted(DOCS.rglob("*.md")) + [DOCS.parent / "README.md"]
_BLOCK = re.compile(r"(<!-- not run[^>]*-->\s*)?```python\n(.*?)```", re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_block_of_the_docs_runs(page, tmp_path, monkeypatch):
    """Each page's Python blocks run in order, in one namespace, as a reader would
    paste them (blocks marked `<!-- not run: why -->` excepted)."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    blocks = [code for skip, code in _BLOCK.findall(page.read_text()) if not skip]
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}, block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, block {i + 1} fails: {e!r}") from e
