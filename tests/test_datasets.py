"""Training batches: shapes for every suite, determinism, resume, split by case."""
import numpy as np
import pytest
import torch

from minissl.data import datasets, phantoms
from minissl.data.sources import open_data


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("suites")
    sizes = {"fetal_head": (8, 2, 2), "cardiac": (6, 1, 1), "atrium": (4, 1, 1)}
    return {n: open_data(phantoms.make_suite(n, root=base / n, sizes=s)) for n, s in sizes.items()}


@pytest.mark.parametrize("name", list(phantoms.SUITES))
def test_batch_shapes_and_dtypes(roots, name):
    st = roots[name]
    spec = st.spec
    it = datasets.make_train_loader(st, st.labeled(2, 0), seed=0, batch_size=5, labeled_bs=2)
    b = next(it)
    P = spec.patch_size
    assert set(b) == {"x_l", "y_l", "x_u", "meta_l", "meta_u"}
    assert b["x_l"].shape == (2, 1, *P) and b["x_l"].dtype == torch.float32
    assert b["y_l"].shape == (2, *P) and b["y_l"].dtype == torch.int64
    assert b["x_u"].shape == (3, 1, *P) and b["x_u"].dtype == torch.float32
    assert 0 <= int(b["y_l"].min()) and int(b["y_l"].max()) < spec.num_classes
    assert it.step == 1


def test_deterministic_and_resumable(roots):
    st = roots["cardiac"]
    a = datasets.make_train_loader(st, st.labeled(2, 4), seed=4, batch_size=4)
    seq = [next(a) for _ in range(7)]
    b = datasets.make_train_loader(st, st.labeled(2, 4), seed=4, batch_size=4, start=5)
    resumed = next(b)
    for k in ("x_l", "y_l", "x_u"):
        assert torch.equal(resumed[k], seq[5][k])
    state = a.state_dict()
    lab = [c.id for c in a.labeled.cases]
    c = datasets.make_train_loader(st, lab, seed=99, batch_size=4)
    c.load_state_dict(state)
    assert c.step == 7 and torch.equal(next(c)["x_u"], next(a)["x_u"])
    d = datasets.make_train_loader(st, st.labeled(2, 5), seed=5, batch_size=4)
    assert not torch.equal(next(d)["x_l"], seq[0]["x_l"])


def test_split_by_case_no_leakage(roots):
    st = roots["cardiac"]
    lab = st.labeled(2, 1)
    it = datasets.make_train_loader(st, lab, seed=1, batch_size=6, labeled_bs=2)
    ids_l = {c.id for c in it.labeled.cases}
    ids_u = {c.id for c in it.unlabeled.cases}
    assert ids_l == set(lab) and ids_u == set(st.split("train")) - set(lab)
    assert all(c.label is None for c in it.unlabeled.cases)  # unlabeled labels are not even in memory
    # every slice of a case is one item: labeled items are exactly the slices of the labeled cases
    assert len(it.labeled) == sum(len(st.read(c).image) for c in lab)
    # every unlabeled sample is a (transformed) slice of an unlabeled case, never of a labeled one
    slices_u = [np.sort(s.ravel()) for c in it.unlabeled.cases for s in c.image]
    slices_l = [np.sort(s.ravel()) for c in it.labeled.cases for s in c.image]
    for x in next(it)["x_u"][:, 0].numpy():  # rotations change the values: compare by histogram sorting
        x = np.sort(x.ravel())
        dist_u = min(np.abs(x - s).mean() for s in slices_u)
        dist_l = min(np.abs(x - s).mean() for s in slices_l)
        assert dist_u < dist_l


def test_epochs_visit_every_labeled_item_once(roots):
    st = roots["fetal_head"]
    it = datasets.make_train_loader(st, st.labeled(4, 0), seed=0, batch_size=2, labeled_bs=2, unlabeled=False)
    assert len(it.labeled) == 4
    orders = it._order(0, 4, 0, 2) + it._order(0, 4, 1, 2)
    assert sorted(orders) == [0, 1, 2, 3]


def test_full_supervision_and_supervised_only(roots):
    st = roots["fetal_head"]
    full = datasets.make_train_loader(st, st.split("train"), batch_size=4, labeled_bs=2)
    b = next(full)
    assert b["x_u"].shape == (0, 1, 64, 64) and b["x_l"].shape[0] == 2
    sup = datasets.make_train_loader(st, st.labeled(2, 0), batch_size=4, unlabeled=False)
    b = next(sup)
    assert b["x_l"].shape[0] == 4 and b["x_u"].shape[0] == 0


def test_no_augmentation_centre_crop(roots):
    it = datasets.make_train_loader(roots["atrium"], ["atrium_0000"], batch_size=1, augment=False, unlabeled=False)
    case = roots["atrium"].read("atrium_0000")
    b = next(it)
    np.testing.assert_array_equal(b["x_l"][0, 0].numpy(), case.image[8:24, 8:40, 8:40])
    np.testing.assert_array_equal(b["y_l"][0].numpy(), case.label[8:24, 8:40, 8:40])


def test_errors_and_load_cases(roots):
    with pytest.raises(ValueError, match="not in train"):
        datasets.make_train_loader(roots["fetal_head"], ["fetal_head_0009"])
    with pytest.raises(ValueError, match=r"labeled: expected a list of case ids \(store.labeled\(budget, seed\)\), got 2"):
        datasets.make_train_loader(roots["fetal_head"], 2)
    with pytest.raises(ValueError, match="labeled_bs"):
        datasets.make_train_loader(roots["fetal_head"], ["fetal_head_0000"], batch_size=4, labeled_bs=5)
    val = datasets.load_cases(roots["cardiac"], "val")
    assert [c.id for c in val] == ["cardiac_0006"] and val[0].image.ndim == 3
