"""Training batches: 2D slices / 3D patches, labeled and unlabeled streams split by case.

The unit of labeling is the **case** (patient): the run resolves the labeled cases once
(``store.labeled(budget, seed)``) and passes them here; every slice of them goes to the labeled stream;
the unlabeled stream holds the slices (or volumes) of the other training cases only. So no slice of
a labeled patient is ever in the unlabeled pool (the slice-level leakage trap of some SSL4MIS variants).

Sparse slices (a :class:`~minissl.data.store.Budget` of kind ``slices:k``): only every k-th slice (axis 0)
of a labeled volume is annotated. The labels of the other slices are replaced by ``IGNORE`` when the
case is read, so nothing downstream can see them, and every batch carries ``label_mask`` (1 where the
label is ground truth). In 2D the unannotated slices of a labeled case join the unlabeled stream as
unlabeled images; in 3D the labeled volumes keep them and ``label_mask`` removes them from the loss.
A method may fill hidden labels before training (``fill``: label propagation interpolates them).

Items are 2D images, slices ``z`` of (Z, Y, X) cases when ``spatial_dims == 2``, or whole volumes
(cropped to random patches) when ``spatial_dims == 3``. The small suites are preloaded into memory.

Batch ``b`` of a loader is a pure function of ``(seed, b)``: each stream walks through its items in
epochs, epoch ``e`` in the order ``default_rng([seed, stream, e]).permutation(n)``, and the
augmentation of batch ``b`` draws from ``default_rng([seed, 2, b])``. A run resumed at iteration
``start`` therefore sees exactly the batches an uninterrupted run would have seen.

Every batch also carries the meta-labels that come free with each item (``meta_l``, ``meta_u``: one row
``(patient, slice, slices, phase)`` per item, see :data:`META_COLUMNS`); methods that learn from them
(SPCL) read them, the others ignore them.

Several suites at once (``Config.suites``, VerSemi): :class:`TaskStore` presents them as one store whose
case ids are ``<suite>/<id>`` and whose cases carry ``meta['task']`` (the suite's index); its loader adds
``'task_l'`` (Bl,) and ``'task_u'`` (Bu,) int64 to every batch. Validation and test stay per suite
(:func:`tasks`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .store import Budget, Case, CaseStore
from .transforms import crop, weak, zoom


META_COLUMNS = ("patient", "slice", "slices", "phase")  # the columns of a batch's meta_l / meta_u rows
PHASES = {"ED": 0, "ES": 1}  # meta 'phase' -> its code; any other or missing phase is -1
IGNORE = 255  # label value of a voxel whose ground truth is hidden (an unannotated slice)


def hide_unannotated(case: Case, budget: Budget) -> Case:
    """The labeled ``case`` with ``IGNORE`` in place of the labels of its unannotated slices (``budget.annotated``).

    Raises:
        ValueError: the case has no label or is not a (Z, Y, X) volume (a single image has no slices).
    """
    if case.label is None or case.label.ndim != 3:
        got = "no label" if case.label is None else f"a label of shape {case.label.shape}"
        raise ValueError(f"budget kind {budget.kind}: expected labeled (Z, Y, X) volumes whose slices can be "
                         f"annotated, got {got} for case {case.id!r}")
    label = case.label.copy()
    label[~budget.annotated(case.id, label.shape[0])] = IGNORE
    return dataclasses.replace(case, label=label)


def known_slices(label: np.ndarray) -> np.ndarray:
    """(Z,) bool: the slices of a (Z, Y, X) label that hold at least one known (not ``IGNORE``) voxel."""
    return (label != IGNORE).reshape(label.shape[0], -1).any(1)


class TaskStore(CaseStore):
    """Several stores as one: task k is the k-th suite (one task per suite, each with its own classes).

    The combined spec is the first suite's (spatial_dims, patch_size, zoom, intensity must agree) with
    ``num_classes`` the largest of the suites' (a task uses the first ``num_classes`` of its suite) and the
    name ``"<a>+<b>"``. The labeled budget counts patients per suite: ``labeled(n, seed)`` takes n
    patients of every suite.

    Args:
        stores: the suites' stores, in task order.
    """

    def __init__(self, stores: Sequence[CaseStore]):
        self.stores = list(stores)
        if len(self.stores) < 2:
            raise ValueError(f"TaskStore: expected at least 2 stores, got {len(self.stores)}")
        first = self.stores[0].spec
        names = [s.spec.name for s in self.stores]
        if len(set(names)) != len(names):
            raise ValueError(f"TaskStore: expected different suites, got {names}")
        for s in self.stores[1:]:
            for f in ("spatial_dims", "patch_size", "zoom", "intensity"):
                if getattr(s.spec, f) != getattr(first, f):
                    raise ValueError(f"TaskStore: suites {first.name!r} and {s.spec.name!r} differ in {f} "
                                     f"({getattr(first, f)!r} and {getattr(s.spec, f)!r}); expected the same")
        widest = max(self.stores, key=lambda s: s.spec.num_classes).spec
        self.names, self.root = names, self.stores[0].root
        self.spec = dataclasses.replace(first, name="+".join(names), num_classes=widest.num_classes,
                                        class_names=widest.class_names,
                                        description=f"tasks {', '.join(names)} trained together")

    def _split_id(self, case_id: str) -> tuple[int, str]:
        suite, _, cid = case_id.partition("/")
        if suite not in self.names or not cid:
            raise ValueError(f"TaskStore: expected a case id '<suite>/<id>' with a suite of {self.names}, "
                             f"got {case_id!r}")
        return self.names.index(suite), cid

    def _ids(self, get) -> list[str]:
        return [f"{n}/{c}" for n, s in zip(self.names, self.stores) for c in get(s)]

    def split(self, name: str) -> list[str]:
        return self._ids(lambda s: s.split(name))

    def read(self, case_id: str) -> Case:
        task, cid = self._split_id(case_id)
        case = self.stores[task].read(cid)
        return dataclasses.replace(case, id=case_id, meta={**case.meta, "task": task})

    def patients(self, case_ids: Sequence[str]) -> list[str]:
        found = [self._split_id(c) for c in case_ids]
        return [f"{self.names[t]}/{self.stores[t].patients([c])[0]}" for t, c in found]

    def has_label(self, case_ids: Sequence[str]) -> list[bool]:
        return [self.stores[t].has_label([c])[0] for t, c in map(self._split_id, case_ids)]

    def labeled(self, budget: int, seed: int = 0) -> list[str]:
        return self._ids(lambda s: s.labeled(budget, seed))

    def problems(self) -> list[str]:
        return [f"{n}: {p}" for n, s in zip(self.names, self.stores) for p in s.problems()]


def tasks(store: CaseStore) -> list[tuple[int, CaseStore]]:
    """(task, store) per suite: ``[(0, store)]`` for one store, each suite of a :class:`TaskStore`."""
    return list(enumerate(store.stores)) if isinstance(store, TaskStore) else [(0, store)]


def load_cases(store: CaseStore, split: str) -> list[Case]:
    """All cases of a split (whole images / volumes, e.g. for validation and test)."""
    return [store.read(c) for c in store.split(split)]


class Pool:
    """In-memory items of some cases: 2D images / slices (``spatial_dims == 2``) or volumes (3).

    With ``zoom_to`` every item is zoomed to that size once, when the pool is made (image linear,
    label nearest, :func:`transforms.zoom`): slices of any size become training samples of one size,
    as in the SSL4MIS ACDC recipe (``SuiteSpec.zoom``). ``slices`` (2D only) names, per case, the slices
    that are items (default: all of them).

    Attributes:
        cases: the loaded cases (zoomed when ``zoom_to`` is given).
        items: (case index, slice index or -1 for the whole case) per item.
    """

    def __init__(self, cases: Sequence[Case], spatial_dims: int, zoom_to: Sequence[int] | None = None,
                 slices: Sequence[Sequence[int] | None] | None = None):
        if spatial_dims not in (2, 3):
            raise ValueError(f"expected spatial_dims 2 or 3, got {spatial_dims}")
        if zoom_to is not None and len(zoom_to) != spatial_dims:
            raise ValueError(f"zoom_to: expected {spatial_dims} sizes for spatial_dims={spatial_dims}, got {zoom_to}")
        self.cases, self.spatial_dims = list(cases), spatial_dims
        if zoom_to is not None:
            self.cases = [dataclasses.replace(c, image=image, label=label) for c in self.cases
                          for image, label in [zoom(c.image, c.label, zoom_to)]]
        self.tasks = [int(c.meta.get("task", 0)) for c in self.cases]  # task of each case
        self.items: list[tuple[int, int]] = []
        for i, c in enumerate(self.cases):
            if c.image.ndim == spatial_dims:
                self.items.append((i, -1))
            elif spatial_dims == 2 and c.image.ndim == 3:
                chosen = slices[i] if slices is not None and slices[i] is not None else range(c.image.shape[0])
                self.items += [(i, int(z)) for z in chosen]
            else:
                raise ValueError(f"case {c.id!r}: expected a {'(Y, X) or (Z, Y, X)' if spatial_dims == 2 else '(Z, Y, X)'} "
                                 f"image for spatial_dims={spatial_dims}, got shape {c.image.shape}")

    def __len__(self) -> int:
        return len(self.items)

    def meta(self, patients: dict[str, int]) -> np.ndarray:
        """Meta-labels of every item, (n_items, 4) int64 with columns :data:`META_COLUMNS`.

        ``patient`` numbers ``meta['patient_id']`` (else the case id) through ``patients``, a shared
        dict that gives each new id the next number; ``slice`` is the item's slice index and ``slices``
        the slices of its case (0 and 1 for 2D images and volumes); ``phase`` is :data:`PHASES` of
        ``meta['phase']``, -1 when unknown.
        """
        rows = []
        for i, z in self.items:
            c = self.cases[i]
            pid = patients.setdefault(str(c.meta.get("patient_id", c.id)), len(patients))
            slices = c.image.shape[0] if z >= 0 else 1
            rows.append((pid, max(z, 0), slices, PHASES.get(str(c.meta.get("phase", "")), -1)))
        return np.asarray(rows, np.int64).reshape(-1, len(META_COLUMNS))

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image, label) of item k: (Y, X) slices or (Z, Y, X) volumes (views, not copies)."""
        i, z = self.items[k]
        c = self.cases[i]
        if z < 0:
            return c.image, c.label
        return c.image[z], None if c.label is None else c.label[z]


class TrainLoader:
    """Infinite, deterministic, resumable iterator of two-stream training batches.

    ``next(loader)`` returns ``{'x_l': (Bl, 1, *P) float32, 'y_l': (Bl, *P) int64, 'x_u': (Bu, 1, *P) float32,
    'meta_l': (Bl, 4) int64, 'meta_u': (Bu, 4) int64}`` with P = ``patch_size`` (meta columns
    :data:`META_COLUMNS`), and with ``label_mask`` also ``'label_mask': (Bl, *P) float32``, 1 where
    ``y_l`` is ground truth and 0 where the label was ``IGNORE`` (``y_l`` is 0 there). No ``label_mask``
    key means every labeled voxel is ground truth. With ``with_tasks`` also ``'task_l': (Bl,)`` and
    ``'task_u': (Bu,)`` int64, the task of each item's case. ``loader.step`` is the index of the next batch
    (``batch(b)`` gives any batch).
    """

    def __init__(self, labeled: Pool, unlabeled: Pool | None, patch_size: Sequence[int], *, seed: int = 0,
                 labeled_bs: int = 4, unlabeled_bs: int = 4, start: int = 0, augment: bool = True,
                 foreground_prob: float = 0.0, label_mask: bool = False, with_tasks: bool = False):
        if len(labeled) == 0:
            raise ValueError("expected at least one labeled item, got an empty labeled pool")
        if labeled_bs < 1 or unlabeled_bs < 0:
            raise ValueError(f"expected labeled_bs >= 1 and unlabeled_bs >= 0, got {labeled_bs}, {unlabeled_bs}")
        self.labeled, self.unlabeled = labeled, unlabeled if unlabeled is not None and len(unlabeled) else None
        self.patch_size = tuple(int(p) for p in patch_size)
        self.spatial_dims = len(self.patch_size)
        self.seed, self.labeled_bs, self.step = seed, labeled_bs, start
        self.unlabeled_bs = unlabeled_bs if self.unlabeled is not None else 0
        self.augment, self.foreground_prob = augment, foreground_prob
        self.label_mask, self.with_tasks = label_mask, with_tasks
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        patients: dict[str, int] = {}  # one numbering over both streams
        self.meta_l = labeled.meta(patients)  # (n_l, 4)
        self.meta_u = self.unlabeled.meta(patients) if self.unlabeled is not None else np.zeros((0, 4), np.int64)

    def _order(self, stream: int, n: int, b: int, k: int) -> list[int]:
        out = []
        for p in range(b * k, (b + 1) * k):
            e = p // n
            if (stream, e) not in self._perms:
                if len(self._perms) > 8:
                    self._perms.clear()
                self._perms[(stream, e)] = np.random.default_rng([self.seed, stream, e]).permutation(n)
            out.append(int(self._perms[(stream, e)][p % n]))
        return out

    def _sample(self, pool: Pool, k: int, rng: np.random.Generator, fg_prob: float, with_label: bool):
        image, label = pool.get(k)
        if self.augment:
            return weak(image, label if with_label else None, self.patch_size, rng, fg_prob=fg_prob)
        start = (np.asarray(image.shape[-self.spatial_dims:]) - np.asarray(self.patch_size)) // 2  # centre crop
        return (crop(image, start, self.patch_size, float(image.min())).astype(np.float32),
                crop(label, start, self.patch_size, 0) if with_label and label is not None else None)

    def batch(self, b: int) -> dict[str, Tensor]:
        """Batch number ``b`` (a pure function of seed and b)."""
        rng = np.random.default_rng([self.seed, 2, b])
        xl, yl, xu = [], [], []
        order_l = self._order(0, len(self.labeled), b, self.labeled_bs)
        order_u = self._order(1, len(self.unlabeled), b, self.unlabeled_bs) if self.unlabeled_bs else []
        for k in order_l:
            img, lab = self._sample(self.labeled, k, rng, self.foreground_prob, True)
            if lab is None:
                raise ValueError(f"labeled case {self.labeled.cases[self.labeled.items[k][0]].id!r} has no label")
            xl.append(img)
            yl.append(lab.astype(np.int64))
        for k in order_u:
            xu.append(self._sample(self.unlabeled, k, rng, 0.0, False)[0])
        P, y = self.patch_size, np.stack(yl)  # y: (Bl, *P)
        out = {"x_l": torch.from_numpy(np.stack(xl)[:, None]),  # (Bl, 1, *P)
               "y_l": torch.from_numpy(np.where(y == IGNORE, 0, y)),  # (Bl, *P)
               "x_u": torch.from_numpy(np.stack(xu)[:, None]) if xu else torch.zeros((0, 1) + P),  # (Bu, 1, *P)
               "meta_l": torch.from_numpy(self.meta_l[order_l]),  # (Bl, 4)
               "meta_u": torch.from_numpy(self.meta_u[order_u]).reshape(-1, len(META_COLUMNS))}  # (Bu, 4)
        if self.label_mask:
            out["label_mask"] = torch.from_numpy((y != IGNORE).astype(np.float32))  # (Bl, *P)
        if self.with_tasks:
            for key, pool, order in (("task_l", self.labeled, order_l), ("task_u", self.unlabeled, order_u)):
                out[key] = torch.tensor([pool.tasks[pool.items[k][0]] for k in order], dtype=torch.int64)  # (B,)
        return out

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: the seed and the next batch index."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a ``state_dict()``."""
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self._perms.clear()


def make_train_loader(store: CaseStore, labeled: Sequence[str], *, seed: int = 0, batch_size: int = 8,
                      labeled_bs: int | None = None, unlabeled: bool = True, start: int = 0, augment: bool = True,
                      foreground_prob: float = 0.0, patch_size: Sequence[int] | None = None,
                      budget: Budget | None = None,
                      fill: Callable[[np.ndarray], np.ndarray] | None = None) -> TrainLoader:
    """The two-stream training iterator of a store.

    Args:
        store: the opened data (``sources.open_data``).
        labeled: labeled case ids of the train split, resolved once by the caller
            (``store.labeled(budget, seed)``); the other training cases form the unlabeled stream.
        seed: order and augmentation seed.
        batch_size: items per batch, labeled + unlabeled.
        labeled_bs: labeled items per batch (default batch_size // 2; batch_size when ``unlabeled`` is False).
        unlabeled: draw the unlabeled stream (``batch_size - labeled_bs`` items) from the training
            cases that are not labeled. With no such cases (full supervision) ``x_u`` is empty.
        start: index of the first batch (resume).
        augment: weak augmentation (crop, small rotation, rot90, flips); False: centre crop only.
        foreground_prob: probability that a labeled crop is centred on foreground (never used for
            unlabeled crops, whose labels are unknown).
        patch_size: override ``spec.patch_size``.
        budget: the run's budget; of kind ``slices:k`` only the annotated slices of the labeled cases keep
            their labels (``hide_unannotated``) and batches carry ``label_mask``. Its ``n`` and ``seed``
            are those that drew ``labeled``; ``None`` is kind ``cases``.
        fill: under a ``slices:k`` budget, applied to the (Z, Y, X) uint8 label of every labeled case
            (``IGNORE`` on hidden voxels) before training; it returns the label to train on, ``IGNORE``
            where still unknown (``Method.fill_labels``).

    Training samples follow ``spec.zoom``: False, random ``patch_size`` windows of the images at their
    own resolution; True, the images (slices) zoomed to ``patch_size`` first (SSL4MIS ACDC).

    Returns:
        TrainLoader; ``next()`` gives ``{'x_l': (Bl, 1, *P), 'y_l': (Bl, *P) int64, 'x_u': (Bu, 1, *P)}``
        and the meta-labels ``meta_l`` (Bl, 4), ``meta_u`` (Bu, 4) (and ``'label_mask': (Bl, *P)`` under a
        ``slices:k`` budget, ``'task_l'``, ``'task_u'`` for a :class:`TaskStore`).
    """
    spec = store.spec
    train = store.split("train")
    if isinstance(labeled, (str, int, np.integer)) or labeled is None:
        raise ValueError(f"labeled: expected a list of case ids (store.labeled(budget, seed)), got {labeled!r}")
    labeled = list(labeled)
    unknown = sorted(set(labeled) - set(train))
    if unknown:
        raise ValueError(f"expected labeled cases from the train split, got cases not in train: {unknown[:5]}")
    if labeled_bs is None:
        labeled_bs = batch_size // 2 if unlabeled else batch_size
    if not 0 < labeled_bs <= batch_size:
        raise ValueError(f"expected 0 < labeled_bs <= batch_size={batch_size}, got labeled_bs={labeled_bs}")
    lab_set = set(labeled)
    patch_size = tuple(patch_size or spec.patch_size)
    zoom_to = patch_size if spec.zoom else None
    sparse = budget is not None and budget.step > 0
    cases_l = [store.read(c) for c in labeled]
    if sparse:
        cases_l = [hide_unannotated(c, budget) for c in cases_l]
        cases_l = [c if fill is None else dataclasses.replace(c, label=fill(c.label)) for c in cases_l]
    # the labels of unlabeled cases are dropped on reading: nothing downstream can see them
    cases_u = [dataclasses.replace(store.read(c), label=None) for c in train if c not in lab_set] if unlabeled else []
    slices_l, slices_u = None, [None] * len(cases_u)
    if sparse and spec.spatial_dims == 2:  # slices without a known voxel are unlabeled images
        known = [known_slices(c.label) for c in cases_l]
        slices_l = [np.flatnonzero(k) for k in known]
        if unlabeled:
            for c, k in zip(cases_l, known):
                if not k.all():
                    cases_u.append(dataclasses.replace(c, label=None))
                    slices_u.append(np.flatnonzero(~k))
    pool_l = Pool(cases_l, spec.spatial_dims, zoom_to, slices_l)
    pool_u = Pool(cases_u, spec.spatial_dims, zoom_to, slices_u) if unlabeled else None
    return TrainLoader(pool_l, pool_u, patch_size, seed=seed, labeled_bs=labeled_bs,
                       unlabeled_bs=batch_size - labeled_bs, start=start, augment=augment,
                       foreground_prob=foreground_prob, label_mask=sparse, with_tasks=isinstance(store, TaskStore))
