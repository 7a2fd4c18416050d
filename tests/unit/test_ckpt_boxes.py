"""The box layout of sharded checkpoints (issue 22), on one process: pieces saved as boxes (a tensor cut
by columns, or the strided runs of a fused weight) read back whole, as rows and as any box, and a layout
whose pieces leave a gap is refused. tests/multiproc/test_tensor_parallel.py runs the real tp layouts."""

from __future__ import annotations

import pytest
import torch

from disttrain.ckpt_write import CheckpointManager
from disttrain.config import CheckpointConfig
from disttrain.errors import CheckpointError


def _saved(run: str, whole: torch.Tensor, boxes: list[list[list[int]]]):
    """A one-rank sharded checkpoint holding `whole` as the given boxes (pieces of one shard file)."""
    rows, pieces = {}, []
    for i, box in enumerate(boxes):
        key = f"model/w#{i}"
        rows[key] = whole[tuple(slice(a, b) for a, b in box)].clone()
        pieces.append({"key": key, "box": box})
    layout = {"model/w": {"shape": list(whole.shape), "dtype": "float32", "pieces": pieces}}
    app = {"model": {}, "optimizer": {"param_groups": [], "state": {}}}
    mgr = CheckpointManager(run, CheckpointConfig())
    mgr.save(1, app, {}, shards=(rows, layout))
    return mgr.read(1).saved(None)


def test_column_boxes_and_strided_runs_read_back_whole_as_rows_and_as_any_box(tmp_path):
    whole = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    # two column halves; then a fused [q; k; v] weight's rank-0 runs plus the rest of each part
    layouts = {
        "columns": [[[0, 6], [0, 2]], [[0, 6], [2, 4]]],
        "strided": [[[0, 1], [0, 4]], [[2, 3], [0, 4]], [[4, 5], [0, 4]], [[1, 2], [0, 4]], [[3, 4], [0, 4]], [[5, 6], [0, 4]]],
    }  # fmt: skip
    for name, boxes in layouts.items():
        saved = _saved(str(tmp_path / name), whole, boxes)
        assert torch.equal(saved.full("model/w"), whole), name
        assert torch.equal(saved.rows("model/w", 2, 5), whole[2:5]), name
        assert torch.equal(saved.box("model/w", [[1, 4], [1, 3]]), whole[1:4, 1:3]), name


def test_a_layout_with_a_gap_is_refused(tmp_path):
    whole = torch.ones(4, 4)
    saved = _saved(str(tmp_path / "run"), whole, [[[0, 4], [0, 3]]])  # column 3 is missing
    assert torch.equal(saved.box("model/w", [[0, 4], [0, 3]]), whole[:, :3])
    with pytest.raises(CheckpointError, match="holds 12 of the 16 values"):
        saved.full("model/w")
