"""Every registered method learns on a tiny phantom, and its unlabeled loss really trains the student.

Also here: the loss weights every method promises in its docstring, the copy-paste helper that BCP and
M3HL share, and the shape of the methods package (short files, no method importing another).

Convention checked here: ``training_step`` returns ``'loss'`` (what is optimised), ``'sup'`` and, for
semi-supervised methods, ``'unsup'``: the unlabeled part before its weight.

One test per method: train 40 steps on one fixed batch, check that the supervised loss falls and
the Dice of the prediction rises, then check the unlabeled part in that trained state (methods with a
confidence threshold, e.g. UniMatch, have no confident voxel and so no unlabeled loss on a fresh
network): it is non-zero, it sends gradients into the student, and it depends on the unlabeled images.
"""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minissl.config import load_config
from minissl.data import datasets
from minissl.data.sources import open_data
from minissl.metrics import dice
from minissl import ops
from minissl.methods import METHODS, get_method
from minissl.methods.base import labeled_unlabeled_mixes
from minissl.methods.mn import pseudo_count

HOME = {"ersr": "fetal_head", "mn": "atrium"}  # method -> suite of its learning test (default cardiac)
ARGS = {"mn": {"pretext": "none"}}  # method -> options of its generic tests (M&N's pretext has its own tests)
UNSUP_STEP = {"spcl": 0}  # method -> step whose unlabeled part is checked (default the last): SPCL's pre-training
ITERS = 40


def build(name, root):
    store = open_data(root)
    cfg = load_config(method=name, data_root=str(root), width=8, depth=2, batch_size=4, labeled_bs=2,
                      max_iters=ITERS, lr=0.03, rampup=0.1, cons_weight=1.0, progress=False,
                      method_args=ARGS.get(name, {}),
                      ema_decay=0.99)  # the published horizons are under one step of a 40-step run
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
    parts = []
    for step in range(ITERS):
        parts.append(method.update(batch, step, opts))
        if step + 1 in method.stage_ends():  # as the engine does, with the live state as the stage's best
            method.end_stage(step + 1, method.state_dict(), opts)
    sup = [p["sup"] for p in parts]
    assert all(np.isfinite(p["loss"]) for p in parts)
    assert np.mean(sup[-5:]) < 0.8 * np.mean(sup[:5]), sup
    assert train_dice(method, batch) > d0 + 0.1
    if not method.semi_supervised:
        return
    step = UNSUP_STEP.get(name, ITERS - 1)
    out = method.training_step(batch, step=step)
    assert {"loss", "sup", "unsup"} <= set(out)
    assert out["unsup"].item() > 0
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["unsup"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    out2 = method.training_step(batch | {"x_u": batch["x_u"].flip(-1)}, step=step)
    assert not torch.isclose(out["unsup"], out2["unsup"])


def documented_weights(method, step):
    """(d loss / d sup, d loss / d unsup) at ``step`` as each method's docstring states them."""
    t = step / method.max_iters
    ramp = method.cfg.cons_weight * math.exp(-5 * (1 - min(t / method.cfg.rampup, 1.0)) ** 2)
    if method.name == "bcp":  # u_weight 0.5 after the labeled-only stage, no ramp
        return 1.0, 0.0 if step < method.pretrain_iters else 0.5
    if method.name == "label_propagation":  # model A's labels enter with u_weight 1 after model A's stage
        return 1.0, 0.0 if step < method.first_iters else 1.0
    if method.name == "m3hl":  # no ramp: the unlabeled part enters with weight 1
        return 1.0, 1.0
    if method.name == "unimatch":  # the medical code's total "/ 2", no ramp
        return 0.5, 0.5
    if method.name == "lefed":  # constant consistency weight 1, no ramp (the deep supervision is in sup)
        return 1.0, method.args.cons_weight
    if method.name == "spcl":  # the meta-label loss alone while pre-training, then the supervised loss alone
        return (0.0, 1.0) if step < method.pretrain_iters else (1.0, 0.0)
    if method.name == "mn":  # the 3D model's parts weighted by their volumes: n_l / B and n_p / B (B = 2 here)
        n_p = pseudo_count(step, method.max_iters, method.args.transition, 2)
        return (2 - n_p) / 2, n_p / 2
    if method.name == "versemi":  # every term with weight 1, no ramp (the official code applies none)
        return 1.0, 1.0
    if method.name in ("c3s3", "medl"):  # c3s3: ramped competition + contrast as they enter; medl: L_u, weight 1
        return 1.0, 1.0
    return 1.0, ramp


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.semi_supervised))
def test_loss_weights_follow_the_documented_schedule(name, tiny_stores):
    suite = HOME.get(name, "cardiac")
    store = open_data(tiny_stores[suite])
    cfg = load_config(method=name, data_root=str(tiny_stores[suite]), width=8, depth=2, batch_size=4,
                      labeled_bs=2, max_iters=40, rampup=0.8, cons_weight=2.0, progress=False,
                      method_args=ARGS.get(name, {}))
    torch.manual_seed(0)
    method = get_method(name)(cfg, store.spec)
    batch = next(datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2))
    for step in (2, 20):  # early in the ramp (weight ~0.01 of the full one), then half-way up it (~0.5)
        out = method.training_step(batch, step)
        parts = [out["sup"], out["unsup"]]
        live = [p for p in parts if p.requires_grad]  # BCP's labeled stage reports a constant unsup = 0
        grads = dict(zip(map(id, live), torch.autograd.grad(out["loss"], live, allow_unused=True)))
        got = tuple(0.0 if grads.get(id(p)) is None else float(grads[id(p)]) for p in parts)
        assert got == pytest.approx(documented_weights(method, step), rel=1e-5), (name, step)


@pytest.mark.parametrize("paste_labeled,region", [(True, "boxes"), (False, "blocks"), (True, "blocks")])
def test_labeled_unlabeled_mixes_by_hand(paste_labeled, region):
    n, spatial, g = 2, (8, 8), torch.Generator().manual_seed(0)
    x_l = torch.cat([torch.full((n, 1, *spatial), 1.0), torch.full((n, 1, *spatial), 2.0)])  # L_a, L_b
    x_u = torch.cat([torch.full((n, 1, *spatial), 3.0), torch.full((n, 1, *spatial), 4.0)])  # U_a, U_b
    y_l = torch.cat([torch.full((n, *spatial), 1), torch.full((n, *spatial), 2)])  # Y_a, Y_b
    pseudo = torch.cat([torch.full((n, *spatial), 3), torch.full((n, *spatial), 0)])  # PL_a, PL_b
    kw = ({"boxes": ops.bcp_box(spatial, n, g)} if region == "boxes" else
          {"blocks": ops.block_grid(spatial, n, g, (4, 4), ratio=0.5)})
    (x1, t1, g1), (x2, t2, g2) = labeled_unlabeled_mixes(x_l, y_l, x_u, pseudo, paste_labeled=paste_labeled, **kw)
    r = ops.region_mask(spatial, **kw)  # (n, *S) True inside the region
    assert 0 < int(r.sum()) < r.numel()
    inside_1 = r if paste_labeled else ~r  # where X_1 holds L_a (and X_2 holds U_b)
    assert torch.equal(x1[:, 0], torch.where(inside_1, 1.0, 3.0)) and torch.equal(t1, torch.where(inside_1, 1, 3))
    assert torch.equal(x2[:, 0], torch.where(inside_1, 4.0, 2.0)) and torch.equal(t2, torch.where(inside_1, 0, 2))
    assert torch.equal(g1, inside_1.float()) and torch.equal(g2, (~inside_1).float())  # 1 on ground truth


def test_labeled_unlabeled_mixes_needs_matching_even_batches():
    x, y = torch.zeros(3, 1, 8, 8), torch.zeros(3, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="labeled_unlabeled_mixes: expected .* same positive even number of rows, "
                                         "got 3, 3, 3, 3"):
        labeled_unlabeled_mixes(x, y, x, y, paste_labeled=True, boxes=torch.zeros(1, 4, dtype=torch.int64))


METHOD_DIR = Path(__file__).resolve().parents[1] / "minissl" / "methods"
METHOD_FILES = sorted(p for p in METHOD_DIR.glob("*.py") if p.name not in ("base.py", "__init__.py"))
SUBCLASSING = {("ua_mt", "mean_teacher")}  # UA-MT is Mean Teacher with a masked consistency


def code_lines(path: Path) -> int:
    """Non-blank, non-comment lines below the module docstring."""
    tree = ast.parse(path.read_text())
    first = tree.body[0]
    start = first.end_lineno if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else 0
    lines = path.read_text().splitlines()[start:]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_every_method_file_is_at_most_200_code_lines():
    assert len(METHOD_FILES) >= 9
    counts = {p.name: code_lines(p) for p in METHOD_FILES}
    assert all(isinstance(ast.get_docstring(ast.parse(p.read_text())), str) for p in METHOD_FILES)
    assert {k: v for k, v in counts.items() if v > 200} == {}


def imported_methods(path: Path) -> set[str]:
    """Method modules ``path`` imports (relative ``.x`` / ``minissl.methods.x`` imports), base excluded."""
    names = {p.stem for p in METHOD_FILES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:
                found |= {a.name for a in node.names}  # from . import bcp
            elif node.level == 1:
                found.add(node.module.split(".")[0])  # from .bcp import ...
            elif node.module and node.module.startswith("minissl.methods"):
                parts = node.module.split(".")
                found |= {parts[2]} if len(parts) > 2 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("minissl.methods.")}
    return found & names


def test_no_method_imports_another_method():
    found = {(p.stem, m) for p in METHOD_FILES for m in imported_methods(p)}
    assert found == SUBCLASSING
