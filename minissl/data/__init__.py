"""Data: the HDF5 case store, embedded synthetic suites, training batches and augmentations.

    store       Case, SuiteSpec, CaseStore, open_store, read_case / write_case, splits and budgets
    phantoms    SUITES, make_suite (fetal_head, cardiac, atrium)
    datasets    load_cases, make_train_loader (two streams, split by case, resumable)
    transforms  weak (geometric, per sample), strong (intensity, batched torch)
"""
from .datasets import load_cases, make_train_loader
from .phantoms import SUITES, make_suite
from .store import Case, CaseStore, SuiteSpec, open_store, read_case, write_case

__all__ = ["Case", "CaseStore", "SuiteSpec", "SUITES", "load_cases", "make_suite", "make_train_loader",
           "open_store", "read_case", "write_case"]
