"""CAD's parts: largest low-confidence region, its size cap, the high-confidence donor, the DTE schedules."""
from dataclasses import replace

import pytest
import torch
from scipy import ndimage

from minissl import ops
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.cad import CAD, donor_index, linear_schedule, low_confidence_boxes


def make(spatial=(16, 16), iters=100):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="cad", max_iters=iters, width=4, depth=2, progress=False)
    torch.manual_seed(0)
    return CAD(cfg, spec)


def test_largest_low_region_box():
    conf = torch.ones(2, 12, 12)
    conf[0, 1:3, 1:3] = 0.2  # small low region (4 px)
    conf[0, 5:9, 4:11] = 0.5  # largest low region (28 px)
    conf[0, 6, 6] = 0.9  # a confident hole inside it does not split it
    boxes = low_confidence_boxes(conf, tau=0.8, max_frac=1.0)
    assert boxes[0].tolist() == [5, 4, 9, 11]  # (lo_y, lo_x, hi_y, hi_x) half-open
    assert boxes[1].tolist() == [0, 0, 0, 0]  # nothing below tau: an empty box, no displacement


def test_box_agrees_with_scipy_on_random_maps():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 8, 10, 10, generator=g)
    boxes = low_confidence_boxes(conf, tau=0.3, max_frac=1.0)
    for b in range(4):
        comp, n = ndimage.label((conf[b] < 0.3).numpy(), structure=torch.ones(3, 3, 3).numpy())
        sizes = [(comp == k).sum() for k in range(1, n + 1)]
        sl = ndimage.find_objects(comp)[int(torch.tensor(sizes).argmax())]
        assert boxes[b].tolist() == [s.start for s in sl] + [s.stop for s in sl]


def test_size_cap_shrinks_about_the_centre():
    conf = torch.full((1, 16, 16), 0.1)  # the whole image is unsure
    boxes = low_confidence_boxes(conf, tau=0.5, max_frac=1 / 16)
    assert boxes[0].tolist() == [6, 6, 10, 10]  # a centred 4 x 4 box = 1/16 of the image
    box = low_confidence_boxes(conf, tau=0.5, max_frac=0.1)[0]
    assert ((box[2:] - box[:2]).prod() <= 0.1 * 256) and (box[:2] >= 0).all() and (box[2:] <= 16).all()


def test_donor_is_the_most_confident_other_image():
    conf = torch.stack([torch.full((8, 8), v) for v in (0.3, 0.9, 0.6)])  # (3, 8, 8)
    conf[2, :4, :4] = 0.99  # image 2 is the most confident inside the top-left box
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [4, 4, 8, 8]])
    assert donor_index(conf, boxes).tolist() == [2, 2, 1]  # never itself


def test_displacement_carries_donor_content_and_pseudo_label():
    method = make()
    x_u = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x_d, pl_d, boxes = method.displace(x_u, step=50)
    region = ops.region_mask((16, 16), boxes=boxes)  # (3, 16, 16)
    assert torch.equal(x_d[:, 0][~region], x_u[:, 0][~region])  # untouched outside the box
    changed = [(x_d[i, 0][region[i]] != x_u[i, 0][region[i]]).any() for i in range(3) if region[i].any()]
    assert changed and all(changed)  # inside, another image's content
    tau, a_max = method.schedules(50)
    assert (region.flatten(1).sum(1) <= a_max * 256).all()
    assert pl_d.shape == (3, 16, 16) and pl_d.dtype == torch.int64


def test_dte_schedules():
    method = make(iters=100)
    assert method.schedules(0) == pytest.approx((0.70, 1 / 16))
    assert method.schedules(50) == pytest.approx((0.825, (1 / 16 + 1 / 4) / 2))
    assert method.schedules(100) == pytest.approx((0.95, 1 / 4))
    taus = [method.schedules(s)[0] for s in range(0, 101, 10)]
    assert taus == sorted(taus)  # the threshold only rises
    assert linear_schedule(0.9, 0.0, 1.0, 0.5) == 1.0 and linear_schedule(0.2, 0.0, 1.0, 0.0) == 1.0


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_training_step_parts(spatial):
    method = make(spatial)
    g = torch.Generator().manual_seed(1)
    batch = {"x_l": torch.randn(2, 1, *spatial, generator=g), "x_u": torch.randn(3, 1, *spatial, generator=g),
             "y_l": torch.randint(0, method.num_classes, (2, *spatial), generator=g)}
    out = method.training_step(batch, step=60)
    assert out["unsup"] > 0 and out["tau"] == pytest.approx(0.85)
    for net in (method.student, method.peer):  # the unlabeled terms train both students
        grads = torch.autograd.grad(out["unsup"], list(net.parameters()), retain_graph=True)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_bad_confidence_shape():
    with pytest.raises(ValueError, match="expected conf"):
        low_confidence_boxes(torch.rand(16, 16), 0.5, 0.1)
