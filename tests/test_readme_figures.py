"""The README's benchmark figure blocks equal their rendering from bench/results (issue #17)."""

import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import readme_figures  # noqa: E402


def _readme():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        return f.read()


def test_every_figure_block_is_rendered_from_the_committed_results():
    text = _readme()
    found = readme_figures.blocks(text)
    assert set(readme_figures.RENDERERS) <= set(found), "a renderer has no block in the README"
    rendered = readme_figures.blocks(readme_figures.render(text))
    stale = [name for name in found if found[name] != rendered[name]]
    assert not stale, (f"README figures {stale} differ from bench/results; "
                       "run: python bench/readme_figures.py")
    assert readme_figures.main(["--check"]) == 0


def test_a_hand_edited_figure_is_caught():
    text = _readme()
    body = readme_figures.blocks(text)["train_cost"]
    edited = text.replace(body, body.replace("|", "| 0.999 |", 1), 1)
    assert readme_figures.blocks(edited)["train_cost"] != readme_figures.blocks(
        readme_figures.render(edited))["train_cost"]
