"""The documentation covers the public API and shows figures that exist."""

import pathlib
import re

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
