"""minissl.ops.regions: region masks vs slicing, random boxes/blocks (sizes, ranges, determinism), errors."""
import math

import pytest
import torch

from minissl.ops import regions


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spatial", [(9, 12), (5, 6, 7)])
def test_region_mask_boxes_equal_slicing(spatial):
    sd = len(spatial)
    boxes = torch.tensor([[1] * sd + [s - 2 for s in spatial], [0] * sd + list(spatial), [2] * sd + [2] * sd])
    m = regions.region_mask(spatial, boxes=boxes)
    assert m.shape == (3, *spatial) and m.dtype == torch.bool
    for k, box in enumerate(boxes.tolist()):
        expected = torch.zeros(spatial, dtype=torch.bool)
        expected[tuple(slice(lo, hi) for lo, hi in zip(box[:sd], box[sd:]))] = True
        assert torch.equal(m[k], expected)
    assert m[2].sum() == 0  # lo == hi: empty


@pytest.mark.parametrize("spatial,grid", [((8, 12), (2, 3)), ((4, 6, 8), (2, 3, 4))])
def test_region_mask_blocks_equal_slicing(spatial, grid):
    blocks = torch.rand(2, *grid, generator=_gen()) < 0.5
    m = regions.region_mask(spatial, blocks=blocks)
    step = [s // g for s, g in zip(spatial, grid)]
    for b in range(2):
        for cell in torch.cartesian_prod(*(torch.arange(g) for g in grid)).tolist():
            sl = tuple(slice(c * st, (c + 1) * st) for c, st in zip(cell, step))
            assert (m[b][sl] == blocks[b][tuple(cell)]).all()


@pytest.mark.parametrize("spatial", [(96, 60), (30, 45, 24)])
def test_bcp_box(spatial):
    boxes = regions.bcp_box(spatial, 4, _gen(), shared=True)
    sd = len(spatial)
    assert boxes.shape == (4, 2 * sd) and boxes.dtype == torch.int64
    assert (boxes == boxes[0]).all()  # one box for the whole batch
    assert (boxes[:, sd:] - boxes[:, :sd] == torch.tensor([int(s * 2 / 3) for s in spatial])).all()
    many = regions.bcp_box(spatial, 200, _gen(1), shared=False)
    assert (many[:, :sd] >= 0).all() and (many[:, sd:] <= torch.tensor(spatial)).all()
    assert len({tuple(b) for b in many.tolist()}) > 50  # per-sample boxes differ
    # every offset that fits is drawn (BCP draws from all positions)
    assert many[:, 0].min() == 0 and many[:, 0].max() == spatial[0] - int(spatial[0] * 2 / 3)
    assert torch.equal(regions.bcp_box(spatial, 4, _gen(), shared=True), boxes)  # deterministic


def test_cutmix_box_2d_ranges():
    H, W = 64, 80
    boxes = regions.cutmix_box((H, W), 2000, _gen(), p=0.5)
    size = (boxes[:, 2:] - boxes[:, :2]).double()  # (B, 2) = (h, w)
    applied = size.prod(1) > 0
    assert 0.45 < applied.double().mean() < 0.55
    assert (boxes[~applied] == 0).all()  # not applied: lo == hi == 0
    frac = size[applied].prod(1) / (H * W)
    # int() truncation makes boxes up to one row/column smaller than the drawn area
    assert frac.max() <= 0.4 and frac.min() >= 0.02 * 0.8
    aspect = size[applied, 0] / size[applied, 1]
    assert aspect.min() >= 0.3 * 0.85 and aspect.max() <= (1 / 0.3) * 1.15
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= torch.tensor([H, W])).all()
    assert torch.equal(regions.cutmix_box((H, W), 2000, _gen(), p=0.5), boxes)  # deterministic
    assert (regions.cutmix_box((H, W), 10, _gen(), p=1.0)[:, 2:] > 0).all()


def test_cutmix_box_3d_volume_fraction():
    spatial = (32, 40, 24)
    boxes = regions.cutmix_box(spatial, 500, _gen(), p=1.0, area=(0.1, 0.3))
    size = (boxes[:, 3:] - boxes[:, :3]).double()
    frac = size.prod(1) / math.prod(spatial)
    assert frac.max() <= 0.3 and frac.min() >= 0.1 * 0.7
    # cube-ish: the same fraction of each dim
    rel = size / torch.tensor(spatial, dtype=torch.float64)
    assert (rel.max(1).values - rel.min(1).values).max() < 0.1
    assert (boxes[:, :3] >= 0).all() and (boxes[:, 3:] <= torch.tensor(spatial)).all()


@pytest.mark.parametrize("spatial,grid,ratio", [((16, 16), (4, 4), 0.5), ((8, 12, 16), (2, 3, 4), 0.3)])
def test_block_grid_exact_count(spatial, grid, ratio):
    blocks = regions.block_grid(spatial, 50, _gen(), grid, ratio=ratio)
    assert blocks.shape == (50, *grid) and blocks.dtype == torch.bool
    assert (blocks.flatten(1).sum(1) == int(ratio * math.prod(grid))).all()
    assert len({tuple(b) for b in blocks.flatten(1).tolist()}) > 10
    assert torch.equal(regions.block_grid(spatial, 50, _gen(), grid, ratio=ratio), blocks)


def test_generator_state_resumes():
    g = _gen(3)
    regions.cutmix_box((32, 32), 4, g)
    state = g.get_state()
    first = regions.block_grid((32, 32), 4, g, (4, 4))
    g.set_state(state)
    assert torch.equal(regions.block_grid((32, 32), 4, g, (4, 4)), first)


def test_bad_input():
    with pytest.raises(ValueError, match=r"block_grid: expected a grid of 2 positive sizes dividing \(10, 10\)"):
        regions.block_grid((10, 10), 2, _gen(), (3, 3))
    with pytest.raises(ValueError, match="expected 2 or 3 positive spatial sizes"):
        regions.bcp_box((10,), 2, _gen())
    with pytest.raises(ValueError, match=r"expected ratio in \[0, 1\]"):
        regions.bcp_box((10, 10), 2, _gen(), ratio=1.5)
    with pytest.raises(ValueError, match="expected 0 < area"):
        regions.cutmix_box((10, 10), 2, _gen(), area=(0.5, 0.2))
    with pytest.raises(ValueError, match="exactly one of boxes / blocks, got neither"):
        regions.region_mask((8, 8))
    with pytest.raises(ValueError, match="exactly one of boxes / blocks, got both"):
        regions.region_mask((8, 8), boxes=torch.zeros(1, 4, dtype=torch.int64), blocks=torch.ones(1, 2, 2).bool())
    with pytest.raises(ValueError, match=r"boxes of dtype torch.int64 and shape \(B, 6\)"):
        regions.region_mask((8, 8, 8), boxes=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"0 <= lo <= hi <= \(8, 8\)"):
        regions.region_mask((8, 8), boxes=torch.tensor([[-1, 0, 4, 4]]))
    with pytest.raises(ValueError, match=r"divisible by the grid \(3, 2\)"):
        regions.region_mask((8, 8), blocks=torch.ones(1, 3, 2, dtype=torch.bool))
