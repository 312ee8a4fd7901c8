"""The one door into the data: a suite name, a store folder or an SSL4MIS layout becomes a CaseStore.

    store = open_data("cardiac")            # an embedded suite (generated once, then cached)
    store = open_data("nuclei")             # a real sample suite (after `minissl data fetch nuclei`)
    store = open_data("/data/my_store")     # a minissl store: suite.json + cases/ + splits/
    store = open_data("/data/ACDC")         # an SSL4MIS layout, read as it is (never written to)
    labeled = store.labeled(4, seed=0)      # the saved list of a standard budget, else drawn
    check_store(store, labeled)             # every split and every case, before the first step

A run opens its data once, resolves its labeled ids once and passes the store and the ids down;
nothing below reopens the data or draws the budget again. A budget the store has no saved list for
is drawn deterministically (``store.choose_labeled``) and saved by the run in its own folder, never
in the data folder.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

from ..atomic import write_text_atomic
from . import phantoms, samples, ssl4mis
from .store import SPLITS, CaseStore, H5Store, duplicates

CHECK_VERSION = 1  # bump when check_store checks more: older remembered checks no longer count
CONVERTERS = ("acdc", "la", "pancreas", "hc18", "psfh")  # data_scripts/prepare_<name>.py


def open_data(source: str | os.PathLike, budget_rule: str = "first") -> CaseStore:
    """Open the data of a run.

    Args:
        source: a store folder (holding ``suite.json``), an SSL4MIS layout folder (ACDC or LA; also
            its parent or its ``data/`` folder), the name of an embedded suite (``phantoms.SUITES``,
            generated into ``phantoms.cache_dir()`` on first use) or of a real sample suite
            (``samples.SUITES``, converted by ``minissl data fetch <name>``). An existing folder wins
            over a suite of the same name. Several of these, comma-separated, open one
            ``datasets.TaskStore`` (one task per suite, ``Config.suites``).
        budget_rule: labeled-budget rule of an SSL4MIS layout: "first" (SSL4MIS) or "random".

    Returns:
        The CaseStore (``spec``, ``split``, ``read``, ``labeled``, ``patients``).

    Raises:
        ValueError: nothing recognisable at ``source`` (the message lists the suites), a sample
            suite not fetched yet (the message gives the command), or a store whose ``suite.json`` is
            unreadable or incomplete (the message names the file and field).
    """
    if "," in str(source):  # several suites trained together, one task each
        from .datasets import TaskStore

        return TaskStore([open_data(s.strip(), budget_rule) for s in str(source).split(",")])
    path = Path(source)
    if (path / "suite.json").is_file():
        return H5Store(path)
    if path.exists():
        found = ssl4mis.detect(path, budget_rule) if path.is_dir() else None
        if found is None:
            raise ValueError(f"expected a minissl store (suite.json) or an SSL4MIS layout (ACDC data/slices, "
                             f"LA <id>/mri_norm2.h5) at {path}, found neither")
        return found
    if str(source) in phantoms.SUITES:
        return H5Store(phantoms.make_suite(str(source)))
    if str(source) in samples.SUITES:
        return H5Store(samples.fetched(str(source)))
    raise ValueError(f"unknown suite {str(source)!r}: expected one of {sorted(phantoms.SUITES | samples.SUITES)}, "
                     f"or a store or SSL4MIS folder (no such folder: {path.resolve()})")


def check_store(store: CaseStore, labeled: Sequence[str] = (), remember: bool = True) -> None:
    """Check every split of a store before training and report every problem at once.

    Checked: each split list is readable and ``train``, ``val`` and ``test`` are non-empty; no list
    names a case twice; no case is in two splits (train/test and val/test leak the test set into
    training or checkpoint choice, val inside train inflates validation); the store's own files
    (saved labeled lists, slices named by an SSL4MIS ``train_slices.list``); and every case of every
    split, read once: readable (not truncated or corrupt), an image of 2 or 3 dimensions as
    ``spec.spatial_dims`` needs, finite intensities, a label of the image's shape with integer
    values in ``[0, num_classes)``; val, test and the ``labeled`` cases must carry a label.

    Cost: one read of every case, about what loading the data for training costs (a second or two
    for the embedded suites and ACDC; minutes for large 3D sets on a slow disk). A passed check is
    remembered in a small file under ``phantoms.cache_dir()`` keyed by the store, its spec, its lists
    and the size and modification time of every file under its root, so an unchanged store is not
    read again.

    Args:
        store: the opened data (``open_data``).
        labeled: the labeled training case ids of the run.
        remember: read and write the record of passed checks.

    Raises:
        ValueError: ``"<store>: N problem(s) ..."`` followed by one line per problem, each naming
            the list, file or case.
    """
    from .datasets import TaskStore

    if isinstance(store, TaskStore):  # several suites: each is checked (and remembered) on its own
        for name, sub in zip(store.names, store.stores):
            check_store(sub, [c.partition("/")[2] for c in labeled if c.partition("/")[0] == name], remember)
        return
    problems: list[str] = []
    splits: dict[str, list[str]] = {}
    for name in SPLITS:
        try:
            splits[name] = store.split(name)
        except (OSError, ValueError) as e:
            problems.append(f"split {name!r}: {e}")
            continue
        if not splits[name]:
            problems.append(f"split {name!r}: expected at least one case, got an empty list")
        if dup := duplicates(splits[name]):
            problems.append(f"split {name!r}: expected each case once, got duplicates {dup[:10]}")
    for a, b, why in (("train", "test", "the test set would be trained on"),
                      ("val", "test", "checkpoints would be chosen on the test set"),
                      ("train", "val", "validation would score training cases")):
        if shared := [c for c in dict.fromkeys(splits.get(a, ())) if c in set(splits.get(b, ()))]:
            problems.append(f"splits {a!r} and {b!r} share {len(shared)} case(s) {shared[:10]}: {why}")
    if dup := duplicates(labeled):
        problems.append(f"labeled cases: expected each case once, got duplicates {dup[:10]}")
    if outside := sorted(set(labeled) - set(splits.get("train", ()))):
        problems.append(f"labeled cases: expected cases of the train split, got {outside[:10]}")
    try:
        problems += store.problems()
    except (OSError, ValueError) as e:
        problems.append(str(e))
    key = _check_key(store, splits, labeled) if remember and not problems else None
    if key is not None and key.is_file():
        return
    needs_label = set(labeled) | set(splits.get("val", ())) | set(splits.get("test", ()))
    where: dict[str, list[str]] = {}
    for name, ids in splits.items():
        for c in ids:
            where.setdefault(c, []).append(name)
    for c, names in where.items():
        try:
            case = store.read(c)
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"case {c!r} ({'/'.join(names)}): {e}")
            continue
        if store.spec.spatial_dims == 3 and case.image.ndim != 3:
            problems.append(f"case {c!r} ({'/'.join(names)}): expected a (Z, Y, X) image for spatial_dims=3, "
                            f"got shape {case.image.shape}")
        if case.label is None and c in needs_label:
            problems.append(f"case {c!r} ({'/'.join(names)}): expected a label (val, test and labeled cases "
                            f"are scored or trained on), got none")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{store!r}: {len(problems)} problem(s) found before training:\n{lines}")
    if key is not None:
        try:
            write_text_atomic(key, "passed\n")
        except OSError:  # a read-only cache only costs a re-check next time
            pass


def _check_key(store: CaseStore, splits: dict[str, list[str]], labeled: Sequence[str]) -> Path | None:
    """The record file of a passed check of this exact store state (None if the root cannot be listed)."""
    try:
        root = store.root.resolve()
        files = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(root.rglob("*")) if p.is_file()]
    except OSError:
        return None
    state = [CHECK_VERSION, type(store).__name__, str(root), store.spec.to_dict(), splits, sorted(labeled), files]
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]
    return phantoms.cache_dir() / ".checks" / f"{digest}.ok"


def _data_scripts() -> Path:
    """The dataset converters: ``data_scripts/`` at the repository root (editable install, source
    checkout), else the copy a regular install ships inside the package (``minissl/_data_scripts``)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package.parent / "data_scripts", package / "_data_scripts"):
        if (folder / "_common.py").is_file():
            return folder
    return package / "_data_scripts"


def converter(dataset: str) -> ModuleType:
    """The converter module ``prepare_<dataset>`` (``prepare(raw_dir, out_dir, **options)``, ``main(argv)``).

    Loaded by path from :func:`_data_scripts` as the package ``minissl_data_scripts`` (the scripts
    import their shared ``_common`` relative to it), whichever way minissl was installed.

    Raises:
        ValueError: ``dataset`` is not one of ``CONVERTERS``, or the converter file is missing.
    """
    if dataset not in CONVERTERS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {list(CONVERTERS)}")
    folder, package = _data_scripts(), "minissl_data_scripts"
    if not (folder / f"prepare_{dataset}.py").is_file():
        raise ValueError(f"converter {folder / f'prepare_{dataset}.py'} not found (an incomplete install?)")
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.prepare_{dataset}")
