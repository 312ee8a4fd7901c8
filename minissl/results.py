"""Results as data: each finished run's small files under ``results/``, read back and rendered.

One folder per run identity::

    results/<suite>/b<budget>[s<k>]-i<max_iters>-<recipe>/<method>/seed<k>/
        config.json      the resolved config, as the run saved it
        metrics.json     best step, best validation Dice, timings, test summary (as the run saved it)
        test_cases.csv   per-case test table
        val_curve.csv    step, val_dice (the validation curve of log.csv)
        provenance.json  git commit, torch version, CPU model, thread count, date the run finished

The middle level (the *setting*: labeled budget, iterations, recipe) keeps runs of different budgets,
lengths or recipes apart (``s<k>``: a sparse-slice budget, ``budget_kind slices:<k>``); a leaderboard compares the methods of one setting. ``<method>`` is the
registry name, or a label given to :func:`record` for an ablation. No checkpoints are kept.

A leaderboard continues where it stopped: :func:`missing` lists the (method, seed) pairs of a setting
whose folder is absent or incomplete, and the bench trains only those. The tables are rendered from
these folders by :func:`minissl.report.render_leaderboard` and :func:`minissl.report.render_all`.

Example:
    >>> folder = record(Run("runs/cardiac-mean_teacher-b3-s0"))     # doctest: +SKIP
    >>> rows = load("results")                                      # doctest: +SKIP
"""
from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .atomic import write_text_atomic
from .runtime import PEAK_FROM
from .run import Run

FILES = ("config.json", "metrics.json", "test_cases.csv", "val_curve.csv", "provenance.json")
DEFAULT_RECIPE = "shared"  # runs whose config has no "recipe" field used the shared recipe
NOT_COMPARED = ("out_dir", "run_name", "progress", "resume", "resume_override", "device", "data_root")
_SETTING = re.compile(r"b(\d+)(?:s(\d+))?-i(\d+)-(.+)")


@dataclass(frozen=True)
class ResultRow:
    """One recorded run, as the leaderboard needs it."""

    suite: str
    budget: int  # labeled cases
    iters: int  # max_iters of the run
    recipe: str  # "shared" or "official"
    method: str  # registry name or ablation label (the folder name)
    seed: int
    dice: float  # test Dice %, mean over cases
    hd95: float  # test HD95, mean over cases, in hd95_unit
    hd95_unit: str = "px"  # "mm" when the cases have a spacing, "px" otherwise (test_cases.csv)
    hc_error_mm: Optional[float] = None  # head circumference error (fetal_head), mean over cases
    cpu_s_per_iter: Optional[float] = None  # process CPU seconds per iteration
    peak_rss_mb: Optional[float] = None  # peak RSS of the run minus RSS once model and optimisers are built
    path: Optional[Path] = None  # the result folder
    budget_kind: str = "cases"  # or "slices:<k>": every k-th slice of a labeled case annotated

    @property
    def setting(self) -> str:
        """The setting folder name, ``b<budget>[s<k>]-i<iters>-<recipe>``."""
        return setting_name(self.budget, self.iters, self.recipe, self.budget_kind)


def setting_name(budget: int, iters: int, recipe: str = DEFAULT_RECIPE, budget_kind: str = "cases") -> str:
    """``b<budget>[s<k>]-i<iters>-<recipe>``, the folder that keeps one leaderboard's runs together.

    A recipe lent by another method (``official:bcp``) is written ``official-bcp``: a ``:`` cannot be
    checked out on every file system. A sparse-slice budget (``budget_kind`` ``slices:<k>``) adds
    ``s<k>`` to the budget: ``b4s3-i600-shared`` is 4 labeled cases with every 3rd slice annotated.
    """
    kind = "" if budget_kind == "cases" else f"s{int(budget_kind.split(':')[1])}"
    return f"b{int(budget)}{kind}-i{int(iters)}-{recipe.replace(':', '-')}"


def result_dir(root: str | os.PathLike, suite: str, budget: int, iters: int, method: str, seed: int,
               recipe: str = DEFAULT_RECIPE, budget_kind: str = "cases") -> Path:
    """The folder of one run identity (see the module docstring)."""
    return Path(root) / suite / setting_name(budget, iters, recipe, budget_kind) / method / f"seed{int(seed)}"


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds every file of :data:`FILES`."""
    return all((Path(folder) / name).is_file() for name in FILES)


def missing(root: str | os.PathLike, suite: str, methods: Sequence[str], seeds: Sequence[int], budget: int,
            iters: int, recipe: str = DEFAULT_RECIPE, budget_kind: str = "cases") -> list[tuple[str, int]]:
    """The (method, seed) pairs of a setting whose result folder is absent or incomplete, in order."""
    return [(m, s) for m in methods for s in seeds
            if not is_complete(result_dir(root, suite, budget, iters, m, s, recipe, budget_kind))]


def _git(*args: str) -> Optional[str]:
    """Output of a git command in the package's own checkout; None when the package is not in one."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():  # an installed package: a surrounding repository is not its source
        return None
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_state() -> tuple[Optional[str], Optional[str]]:
    """(HEAD commit, ``git status --porcelain`` of tracked files) of the package's checkout, read on the
    first call of the process and kept: a run records the code it imported, not a later HEAD. The
    bench calls it before it trains, so a leaderboard that spans commits labels each run with the
    commit its process started from (None, None: not a git checkout)."""
    return _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")


def provenance(finished: Optional[float] = None) -> dict[str, Any]:
    """Where a result was made.

    Returns:
        ``commit`` (of the package's git checkout when this process first asked, :func:`code_state`;
        "unknown" for an installed package), ``uncommitted_changes`` (tracked files differed from that
        commit; None when unknown), ``torch`` version, ``cpu`` model, torch ``threads`` and the ``date``
        (``finished``, a POSIX time; None: now).
    """
    from .ops._build import cpu_model

    commit, dirty = code_state()
    when = datetime.datetime.fromtimestamp(finished, datetime.timezone.utc) if finished is not None \
        else datetime.datetime.now(datetime.timezone.utc)
    return {"commit": commit or "unknown", "uncommitted_changes": None if dirty is None else bool(dirty),
            "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "date": when.isoformat(timespec="seconds")}


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def differences(folder: str | os.PathLike, config: Mapping[str, Any]) -> list[str]:
    """The fields of ``config`` whose value differs from the result's ``config.json`` in ``folder``
    (output and device fields, :data:`NOT_COMPARED`, are not compared), sorted."""
    old = json.loads((Path(folder) / "config.json").read_text())
    return sorted(k for k in config if k not in NOT_COMPARED and old.get(k) != config[k])


def record(run: Run, root: str | os.PathLike = "results", name: Optional[str] = None) -> Path:
    """Copy a finished run's small files into its result folder (see the module docstring).

    The folder is written beside its final place and renamed into it, so a result folder is either
    complete or absent. An incomplete folder is replaced; a complete one is replaced only when it
    holds the same configuration (a re-run), otherwise nothing is written.

    Args:
        run: a finished run (``metrics.json``, ``test_cases.csv`` and ``log.csv`` present).
        root: the results folder.
        name: the method folder name (None: the run's method; an ablation gives its own label).

    Returns:
        The result folder.

    Raises:
        ValueError: the run is not finished, or a complete result folder for the same identity holds
            a different configuration (the differing fields are named).
    """
    saved, metrics = run.saved, run.metrics  # metrics: ValueError when the run has not finished
    if not (run.path / "test_cases.csv").is_file():
        raise ValueError(f"{run.path / 'test_cases.csv'} not found: the run has not been tested")
    suite = (saved.get("suite_spec") or {}).get("name") or saved["suite"]
    dest = result_dir(root, suite, saved["budget"], saved["max_iters"], name or saved["method"], saved["seed"],
                      saved.get("recipe", DEFAULT_RECIPE), saved.get("budget_kind", "cases"))
    if is_complete(dest):
        differ = differences(dest, saved)
        if differ:
            raise ValueError(f"{dest} already holds a result with another configuration (fields {differ} differ "
                             f"from {run.path / 'config.json'}); expected the same configuration, or record it "
                             f"under another name")
    curve = [{"step": r["step"], "val_dice": r["val_dice"]} for r in run.log if r.get("val_dice") is not None]
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_text_atomic(tmp / "config.json", json.dumps(saved, indent=2, sort_keys=True) + "\n")
    write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(run.path / "test_cases.csv", tmp / "test_cases.csv")
    write_text_atomic(tmp / "val_curve.csv", _csv_text(curve, ("step", "val_dice")))
    finished = (run.path / "metrics.json").stat().st_mtime
    write_text_atomic(tmp / "provenance.json", json.dumps(provenance(finished), indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def read_row(folder: str | os.PathLike) -> ResultRow:
    """The :class:`ResultRow` of one complete result folder.

    Raises:
        ValueError: the folder is incomplete (missing files named) or not at
            ``<suite>/b<budget>-i<iters>-<recipe>/<method>/seed<k>``.
    """
    folder = Path(folder)
    absent = [n for n in FILES if not (folder / n).is_file()]
    if absent:
        raise ValueError(f"{folder}: incomplete result folder, missing {absent}")
    setting = _SETTING.fullmatch(folder.parent.parent.name)
    seed = re.fullmatch(r"seed(\d+)", folder.name)
    if setting is None or seed is None:
        raise ValueError(f"{folder}: expected a folder <suite>/b<budget>[s<k>]-i<iters>-<recipe>/<method>/seed<k>")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'metrics.json'}: not valid JSON ({err})") from None
    with open(folder / "test_cases.csv", newline="") as f:
        units = {r.get("unit") or "px" for r in csv.DictReader(f)}
    summary = metrics.get("test") or {}
    if "dice" not in summary or "hd95" not in summary:
        raise ValueError(f"{folder / 'metrics.json'}: expected a 'test' entry with 'dice' and 'hd95', "
                         f"got {sorted(summary)}")
    # a peak measured from another baseline (none recorded: before the optimisers) is not comparable
    peak = metrics.get("peak_rss_mb") if metrics.get("peak_rss_from") == PEAK_FROM else None
    return ResultRow(suite=folder.parents[2].name, budget=int(setting[1]), iters=int(setting[3]), recipe=setting[4],
                     budget_kind="cases" if setting[2] is None else f"slices:{int(setting[2])}",
                     method=folder.parent.name, seed=int(seed[1]), dice=100 * summary["dice"]["mean"],
                     hd95=summary["hd95"]["mean"], hd95_unit="/".join(sorted(units)) or "px",
                     hc_error_mm=summary["hc_error_mm"]["mean"] if "hc_error_mm" in summary else None,
                     cpu_s_per_iter=metrics.get("cpu_seconds_per_iter"), peak_rss_mb=peak, path=folder)


def val_curve(row: ResultRow) -> tuple[np.ndarray, np.ndarray]:
    """(steps, validation Dice in points) of a recorded run."""
    if row.path is None:
        raise ValueError(f"{row.suite} {row.method} seed {row.seed}: expected a recorded result folder, got none")
    with open(row.path / "val_curve.csv", newline="") as f:
        pts = [(int(r["step"]), 100 * float(r["val_dice"])) for r in csv.DictReader(f)]
    steps, vals = (np.array(v) for v in zip(*pts)) if pts else (np.zeros(0), np.zeros(0))
    return steps, vals


def load(root: str | os.PathLike = "results") -> list[ResultRow]:
    """Every result under ``root``, sorted by suite, setting, method and seed.

    Raises:
        ValueError: a ``seed<k>`` folder is incomplete (see :func:`read_row`).
    """
    folders = sorted(p for p in Path(root).glob("*/*/*/seed*") if p.is_dir())
    rows = [read_row(p) for p in folders]
    return sorted(rows, key=lambda r: (r.suite, r.budget, r.iters, r.recipe, r.method, r.seed))


__all__ = ["DEFAULT_RECIPE", "FILES", "ResultRow", "differences", "is_complete", "load", "missing", "provenance",
           "read_row", "record", "result_dir", "setting_name", "val_curve"]
