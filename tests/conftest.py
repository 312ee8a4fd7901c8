"""Shared fixtures: tiny stores made from the embedded generators (fast enough for CI)."""
from __future__ import annotations

import locale
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from minissl.data import phantoms
from minissl.data.store import write_case, write_store

CI = os.environ.get("MINISSL_CI", "0") == "1"


@pytest.fixture(autouse=True)
def process_locale_unchanged():
    """Fail a test that leaves the process locale changed: later tests in the same worker (and torch,
    which reads its own files with the default encoding) would then decode text as ASCII."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"the test changed the process locale from {before!r} to {after!r}")

TINY = {  # suite -> (generator kwargs, patch size)
    "fetal_head": ({"size": 32}, (32, 32)),
    "cardiac": ({"size": 32}, (32, 32)),
    "atrium": ({"shape": (16, 24, 24)}, (8, 16, 16)),
}


def make_tiny_store(root: Path, suite: str, n_train: int = 8, n_val: int = 2, n_test: int = 2,
                    budget: int = 2, iters: int = 40) -> Path:
    """A small store of ``suite``: same generator, smaller images and fewer cases."""
    kwargs, patch = TINY[suite]
    spec = replace(phantoms.SUITES[suite], patch_size=patch, n_train=n_train, n_val=n_val, n_test=n_test,
                   default_budget=budget, default_iters=iters)
    ids = []
    for i in range(n_train + n_val + n_test):
        rng = np.random.default_rng([0, 99, i])
        case = phantoms.GENERATORS[suite](rng, f"{suite}_{i:04d}", **kwargs)
        write_case(root / "cases" / f"{case.id}.h5", case, spec.num_classes)
        ids.append(case.id)
    a, b = n_train, n_train + n_val
    write_store(root, spec, {"train": ids[:a], "val": ids[a:b], "test": ids[b:]})
    return root


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory) -> dict[str, Path]:
    """One tiny store per suite, made once per test session."""
    base = tmp_path_factory.mktemp("stores")
    return {s: make_tiny_store(base / s, s) for s in TINY}


def pytest_configure(config):
    """Under pytest-xdist each worker gets one thread: two workers with two threads each on a
    2-core machine spend their time waiting for each other (measured 3-10x slower)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
