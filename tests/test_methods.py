"""Every registered method learns on a tiny phantom, and its unlabeled loss really trains the student.

Convention checked here: ``training_step`` returns ``'loss'`` (what is optimised), ``'sup'`` and, for
semi-supervised methods, ``'unsup'``: the unlabeled part before its weight.

One test per method: train 40 steps on one fixed batch, check that the supervised loss falls and
the Dice of the prediction rises, then check the unlabeled part in that trained state (methods with a
confidence threshold, e.g. UniMatch, have no confident voxel and so no unlabeled loss on a fresh
network): it is non-zero, it sends gradients into the student, and it depends on the unlabeled images.
"""
import numpy as np
import pytest
import torch

from minissl.config import load_config
from minissl.data import datasets
from minissl.data.sources import open_data
from minissl.metrics import dice
from minissl.methods import METHODS, get_method

HOME = {"ersr": "fetal_head"}  # method -> suite of its learning test (default cardiac)
ITERS = 40


def build(name, root):
    store = open_data(root)
    cfg = load_config(method=name, data_root=str(root), width=8, depth=2, batch_size=4, labeled_bs=2,
                      max_iters=ITERS, lr=0.03, rampup=0.1, cons_weight=1.0, progress=False)
    torch.manual_seed(0)
    return store, get_method(name)(cfg, store.spec)


def train_dice(method, batch):
    method.eval()
    with torch.no_grad():
        pred = method.predict(batch["x_l"]).argmax(1).numpy()
    method.train()
    y = batch["y_l"].numpy()
    return float(np.mean([dice(pred == c, y == c) for c in range(1, method.num_classes)]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns_and_uses_unlabeled_images(name, tiny_stores):
    store, method = build(name, tiny_stores[HOME.get(name, "cardiac")])
    opts = method.optimizers()
    loader = datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2,
                                        unlabeled=method.semi_supervised)
    batch = next(loader)  # one fixed batch: the supervised loss must fall on it
    d0 = train_dice(method, batch)
    parts = [method.update(batch, step, opts) for step in range(ITERS)]
    sup = [p["sup"] for p in parts]
    assert all(np.isfinite(p["loss"]) for p in parts)
    assert np.mean(sup[-5:]) < 0.8 * np.mean(sup[:5]), sup
    assert train_dice(method, batch) > d0 + 0.1
    if not method.semi_supervised:
        return
    out = method.training_step(batch, step=ITERS - 1)
    assert {"loss", "sup", "unsup"} <= set(out)
    assert out["unsup"].item() > 0
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["unsup"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    out2 = method.training_step(batch | {"x_u": batch["x_u"].flip(-1)}, step=ITERS - 1)
    assert not torch.isclose(out["unsup"], out2["unsup"])
