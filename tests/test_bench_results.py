"""bench/common.py's result store: a superseded row runs again and its old values stay on
record (the CIFAR-10 study's rows rerun after a fix, issue #17)."""

import json
import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import common  # noqa: E402


def test_a_superseded_row_is_kept_with_its_reason_and_commit(tmp_path):
    path = str(tmp_path / "study.json")
    first = common.ResultStore(path, {"git_commit": "aaa"}, {"size": "full"})
    first.add("qil_direct_2/seed0", {"keras_top1": 0.8073})
    first.add("qil_frozen_2/seed0", {"keras_top1": 0.8311})
    first.finish()
    second = common.ResultStore(path, {"git_commit": "bbb"}, {"size": "full"})
    assert second.supersede("qil_direct_2/seed0", "width floor fix")
    assert not second.supersede("qil_direct_4/seed0", "never ran")
    assert not second.has("qil_direct_2/seed0") and second.has("qil_frozen_2/seed0")
    with open(path) as handle:
        stored = json.load(handle)
    assert stored["superseded"]["qil_direct_2/seed0"] == [
        {"reason": "width floor fix", "commit": "aaa", "row": {"keras_top1": 0.8073}}]
    assert "qil_direct_2/seed0" not in stored["rows"]


def test_redo_supersedes_once_and_an_interrupted_rerun_resumes(tmp_path):
    path = str(tmp_path / "architectures.json")
    first = common.ResultStore(path, {"git_commit": "aaa"}, {"size": "full"})
    first.add("resnet50/8/int8", {"keras_top1": 0.474})
    first.add("resnet50/8/int4", {"keras_top1": 0.474})
    first.finish()
    # the rerun at bbb supersedes both rows, then is interrupted after one row
    second = common.ResultStore(path, {"git_commit": "bbb"}, {"size": "full"})
    assert second.redo("resnet50/8/int8", "stale export") and second.redo(
        "resnet50/8/int4", "stale export")
    second.add("resnet50/8/int8", {"keras_top1": 0.480})
    # the same command at bbb again: the new row stays, the missing one is still missing
    third = common.ResultStore(path, {"git_commit": "bbb"}, {"size": "full"})
    assert not third.redo("resnet50/8/int8", "stale export")
    assert not third.redo("resnet50/8/int4", "stale export")
    assert third.get("resnet50/8/int8") == {"keras_top1": 0.480}
    # resumed at a later commit ccc (a docs fix): the row rerun for this reason stays too
    fourth = common.ResultStore(path, {"git_commit": "ccc"}, {"size": "full"})
    assert not fourth.redo("resnet50/8/int8", "stale export")
    # another reason supersedes it again
    assert fourth.redo("resnet50/8/int8", "another fix")
    assert [e["reason"] for e in fourth.data["superseded"]["resnet50/8/int8"]] == [
        "stale export", "another fix"]
