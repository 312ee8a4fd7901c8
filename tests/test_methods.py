"""Every registered method learns on a tiny phantom, and its unlabeled loss really trains the student.

Convention checked here: ``training_step`` returns ``'loss'`` (what is optimised), ``'sup'`` and, for
semi-supervised methods, ``'unsup'``: the unlabeled part before its weight.
"""
import numpy as np
import pytest
import torch

from minissl.config import load_config
from minissl.data import datasets
from minissl.data.store import open_store
from minissl.metrics import dice
from minissl.methods import METHODS, get_method

HOME = {}  # method -> suite of its learning test (default fetal_head)


def build(name, root, iters):
    store = open_store(root)
    cfg = load_config(method=name, data_root=str(root), width=8, depth=2, batch_size=4, labeled_bs=2,
                      max_iters=iters, lr=0.03, rampup=0.1, cons_weight=1.0, progress=False)
    torch.manual_seed(0)
    method = get_method(name)(cfg, store.spec)
    return cfg, store, method


def train_dice(method, batch):
    method.eval()
    with torch.no_grad():
        pred = method.predict(batch["x_l"]).argmax(1).numpy()
    method.train()
    y = batch["y_l"].numpy()
    return float(np.mean([dice(pred == c, y == c) for c in range(1, method.num_classes)]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns(name, tiny_stores):
    iters = 40
    cfg, store, method = build(name, tiny_stores[HOME.get(name, "fetal_head")], iters)
    opts = method.optimizers()
    loader = datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2,
                                        unlabeled=method.semi_supervised)
    batch = next(loader)  # one fixed batch: the loss must fall on it
    d0 = train_dice(method, batch)
    losses = [method.update(batch, step, opts)["loss"] for step in range(iters)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert train_dice(method, batch) > d0 + 0.1


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.semi_supervised))
def test_unlabeled_loss_trains_the_student(name, tiny_stores):
    cfg, store, method = build(name, tiny_stores[HOME.get(name, "fetal_head")], 40)
    loader = datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2)
    batch = next(loader)
    out = method.training_step(batch, step=30)
    assert {"loss", "sup", "unsup"} <= set(out)
    assert out["unsup"].item() > 0
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["unsup"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # the unlabeled images matter: changing only x_u changes the unlabeled loss
    out2 = method.training_step(batch | {"x_u": batch["x_u"].flip(-1)}, step=30)
    assert not torch.isclose(out["unsup"], out2["unsup"])
