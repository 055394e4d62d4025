"""Dist.on_main: a step run on rank 0 alone, its result and its failure shared with every rank."""

import json
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conilium.errors import ConiliumError, OutputError
from conilium.runtime import Dist


class StageError(ConiliumError):
    """A conilium error defined in a stage, not in conilium.errors."""


def _stage_failure():
    raise StageError("the stage stopped")


def _full_disk():
    raise OutputError("/data/out", "No space left on device", "free some space")


def test_single_process_runs_the_step_and_raises_its_errors_as_they_are():
    d = Dist()
    assert d.on_main(lambda: 7) == 7 and d.on_main(lambda: 7, share=True) == 7
    with pytest.raises(OutputError, match="cannot write /data/out"):
        d.on_main(_full_disk)
    with pytest.raises(ZeroDivisionError):
        d.on_main(lambda: 1 / 0)


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    d = Dist(rank=rank, world=2)
    ran = []
    seen = {"result": d.on_main(lambda: ran.append(rank) or "on rank 0"),
            "shared": d.on_main(lambda: {"from": rank}, share=True)}
    for name, step in (("conilium", _full_disk), ("stage", _stage_failure), ("other", lambda: 1 / 0)):
        try:
            d.on_main(step)
        except ConiliumError as e:
            seen[name] = [type(e).__name__, str(e), getattr(e, "path", None)]
    seen["ran"] = ran
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(seen, f)


@pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="needs torch.distributed (gloo)")
def test_two_ranks_share_rank_0s_result_and_its_error(tmp_path):
    out = str(tmp_path / "seen")
    mp.spawn(_rank, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    zero, one = (json.loads(open(f"{out}.{r}").read()) for r in (0, 1))
    assert zero["ran"] == [0] and one["ran"] == []  # the step ran on rank 0 only
    assert zero["result"] == "on rank 0" and one["result"] is None
    assert zero["shared"] == one["shared"] == {"from": 0}
    message = "cannot write /data/out: No space left on device; free some space"
    assert zero["conilium"] == one["conilium"] == ["OutputError", message, "/data/out"]
    assert zero["stage"] == ["StageError", "the stage stopped", None]
    assert one["stage"] == ["ConiliumError", "the stage stopped", None]
    assert zero["other"] == one["other"] == ["ConiliumError", "ZeroDivisionError: division by zero", None]
