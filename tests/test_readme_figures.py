"""The figure blocks of the README and the docs pages equal their rendering from
bench/results (issue #17)."""

import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import readme_figures  # noqa: E402


def _pages():
    texts = {}
    for path in readme_figures.pages():
        with open(path) as f:
            texts[os.path.relpath(path, REPO_ROOT)] = f.read()
    return texts


def test_every_figure_block_is_rendered_from_the_committed_results():
    found = set()
    for name, text in _pages().items():
        blocks = readme_figures.blocks(text)
        found |= set(blocks)
        rendered = readme_figures.blocks(readme_figures.render(text))
        stale = [block for block in blocks if blocks[block] != rendered[block]]
        assert not stale, (f"{name}: figures {stale} differ from bench/results; "
                           "run: python bench/readme_figures.py")
    assert set(readme_figures.RENDERERS) <= found, "a renderer has no block in any page"
    assert "headline" in readme_figures.blocks(_pages()["README.md"])
    assert readme_figures.main(["--check"]) == 0


def test_a_hand_edited_figure_is_caught():
    text = _pages()[os.path.join("docs", "benchmarks.md")]
    body = readme_figures.blocks(text)["train_cost"]
    edited = text.replace(body, body.replace("|", "| 0.999 |", 1), 1)
    assert readme_figures.blocks(edited)["train_cost"] != readme_figures.blocks(
        readme_figures.render(edited))["train_cost"]
