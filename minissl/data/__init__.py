"""Data: the one door into the data, the HDF5 case store, embedded suites, batches and augmentations.

    sources     open_data (suite name | store folder | SSL4MIS layout -> CaseStore), check_store
    store       Case, SuiteSpec, CaseStore, read_case / write_case, splits and labeled budgets
    phantoms    SUITES, make_suite (fetal_head, cardiac, atrium)
    ssl4mis     the SSL4MIS / BCP layouts of ACDC and LA, read as they are
    datasets    load_cases, make_train_loader (two streams, split by case, resumable)
    transforms  weak (geometric, per sample), strong (intensity, batched torch), resize / zoom, normalise
    formats     read_image / write_mask: users' NIfTI, NRRD, MHA, PNG and HDF5 files (minissl predict)
"""
from .datasets import load_cases, make_train_loader
from .phantoms import SUITES, make_suite
from .sources import check_store, open_data
from .store import Case, CaseStore, SuiteSpec, read_case, write_case

__all__ = ["Case", "CaseStore", "SuiteSpec", "SUITES", "check_store", "load_cases", "make_suite",
           "make_train_loader", "open_data", "read_case", "write_case"]
