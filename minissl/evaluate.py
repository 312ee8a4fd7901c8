"""Per-case evaluation tables (CSV/JSON) and their summary (the report figure is :mod:`minissl.report`).

``evaluate`` predicts every case with :func:`minissl.inference.predict_case` and scores it with
:func:`minissl.metrics.case_metrics` on the whole image or volume (3D surface distances for 2D-trained
volume cases, as SSL4MIS/BCP do). One row per (case, foreground class)::

    {"case": id, "class": name, "unit": "mm" | "px", "dice", "jaccard", "hd95", "asd"[, "hc_error_mm", "hc_signed_mm"]}

``unit`` says how hd95/asd are measured: "mm" when the case has a physical spacing, "px" (spacing 1)
when it has none or its metadata says ``spacing_unit: "pixel"`` (SSL4MIS files hold no spacing).
``hc_error_mm`` and ``hc_signed_mm`` (absolute and signed head circumference difference, prediction minus
reference, HC18's ADF and DF) are added for binary 2D cases whose metadata gives ``pixel_size_mm``
(the ``fetal_head`` suite, HC18 stores). Empty masks score the defined values documented in :mod:`minissl.metrics`, so every row
is finite and every case counts in the means.

Multi-class suites (ACDC: RV, MYO, LV) are summarised both ways: ``summarise(rows)`` averages the classes
of a case first (the usual single number), ``summarise(rows, by_class=True)`` gives each class its own
mean; ``format_summary`` prints both (``minissl eval``, ``metrics.json`` keys ``test`` and ``test_per_class``).

With ``save_dir`` each case's prediction is written beside the tables in the store's case format
(``<case>.h5``: the case's image, spacing and metadata, the predicted mask as its ``label``), and with
``uncertainty`` (a method's ``uncertainty(x) -> (B, *S)``, ``minissl eval --save-uncertainty``) its
uncertainty map as ``<case>_uncertainty.h5`` of the same shape, spacing and metadata (the float32 map is
the file's ``image``; no label), predicted slice- or window-wise as the mask is
(:func:`minissl.inference.predict_uncertainty`).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minissl.atomic import write_text_atomic
from minissl.data.datasets import TaskStore, tasks
from minissl.data.store import Case, CaseStore, write_case
from minissl.inference import predict_case, predict_uncertainty
from minissl.metrics import METRICS, case_metrics, hc_difference_mm

COLUMNS = ("case", "class", "unit", *METRICS, "hc_error_mm", "hc_signed_mm")


def _class_names(spec: Any) -> list[str]:
    names = list(getattr(spec, "class_names", None) or [])
    return names if len(names) == spec.num_classes else [str(c) for c in range(spec.num_classes)]


def case_rows(pred: np.ndarray, case: Any, spec: Any) -> list[dict[str, Any]]:
    """Rows of one predicted case.

    Args:
        pred: label map, same shape as ``case.label``.
        case: object with ``id``, ``label``, ``spacing`` (tuple or None) and ``meta`` (dict).
        spec: object with ``num_classes`` and optionally ``class_names``.
    """
    if case.label is None:
        raise ValueError(f"case {case.id} has no label to evaluate against")
    meta = getattr(case, "meta", None) or {}
    spacing = tuple(case.spacing) if getattr(case, "spacing", None) else None
    if meta.get("spacing_unit") in ("pixel", "px"):
        spacing = None  # distances in pixels, whatever placeholder spacing the case carries
    scores = case_metrics(pred, case.label, spec.num_classes, spacing)
    names = _class_names(spec)
    rows = [{"case": case.id, "class": names[c], "unit": "mm" if spacing else "px", **m} for c, m in scores.items()]
    if spec.num_classes == 2 and np.ndim(pred) == 2 and meta.get("pixel_size_mm"):
        signed = hc_difference_mm(pred == 1, case.label == 1, float(meta["pixel_size_mm"]))
        rows[0].update(hc_error_mm=abs(signed), hc_signed_mm=signed)
    return rows


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], cases: Sequence[Any], spec: Any,
             device: str | torch.device = "cpu", batch_size: int = 8, overlap: float = 0.5,
             save_dir: str | Path | None = None,
             uncertainty: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Predict and score every case.

    Args:
        model: callable x (B, 1, *P) -> logits (B, C, *P), on ``device``.
        cases: objects with ``id``, ``image``, ``label``, ``spacing``, ``meta`` (``minissl.data.store.Case``).
        spec: object with ``spatial_dims``, ``num_classes``, ``patch_size``, ``class_names`` (and ``zoom``).
        device: where inference runs.
        batch_size: slices or windows per forward pass.
        overlap: 3D sliding-window overlap.
        save_dir: when given, the folder of the predicted cases (module docstring).
        uncertainty: callable x (B, 1, *P) -> (B, *P) whose maps are saved beside the predictions (needs ``save_dir``).

    Returns:
        One row per (case, foreground class), see the module docstring.
    """
    if uncertainty is not None and save_dir is None:
        raise ValueError("evaluate: an uncertainty map is written beside the predictions; "
                         "expected a save_dir, got None")
    rows = []
    geometry = (spec.spatial_dims, spec.patch_size, batch_size, device, overlap, getattr(spec, "zoom", False))
    for case in cases:
        pred = predict_case(model, case.image, *geometry)
        rows += case_rows(pred, case, spec)
        if save_dir is not None:
            write_case(Path(save_dir) / f"{case.id}.h5", Case(case.id, case.image, pred, case.spacing, case.meta))
        if uncertainty is not None:
            u = predict_uncertainty(uncertainty, case.image, *geometry)  # (*image.shape)
            write_case(Path(save_dir) / f"{case.id}_uncertainty.h5", Case(case.id, u, None, case.spacing, case.meta))
    return rows


def predictor(method: Any, task: int | None = None,
              num_classes: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What predicts a suite's cases: ``method.predict``, or with a task (several suites trained together)
    ``method.predict(x, task=task)`` restricted to the suite's first ``num_classes`` channels."""
    if task is None:
        return method.predict
    return lambda x: method.predict(x, task=task)[:, :num_classes]  # (B, num_classes, *P)


def evaluate_split(method: Any, store: CaseStore, split: str, device: str | torch.device = "cpu",
                   save_dir: str | Path | None = None, uncertainty: bool = False) -> list[dict[str, Any]]:
    """:func:`evaluate` a method (in eval mode) on a split of its store: per suite for a ``TaskStore``, each
    suite with its task prompt, its own spec (classes, names) and case ids ``<suite>/<id>``.

    Args:
        method: a trained ``Method``; store: its data; split: "val" or "test"; device: where inference runs.
        save_dir, uncertainty: as :func:`evaluate` (``uncertainty=True`` uses ``method.uncertainty``).
    """
    rows = []
    for task, sub in tasks(store):
        multi = isinstance(store, TaskStore)
        cases = [store.read(f"{sub.spec.name}/{c}") if multi else store.read(c) for c in sub.split(split)]
        rows += evaluate(predictor(method, task if multi else None, sub.spec.num_classes), cases, sub.spec,
                         device=device, save_dir=save_dir, uncertainty=method.uncertainty if uncertainty else None)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], by_class: bool = False) -> dict[str, Any]:
    """Mean and std (population, ddof=0) over cases of every metric in the rows.

    The value of a case is the mean over its foreground classes (``by_class=False``), so a case counts
    once whatever its number of classes.

    Returns:
        ``{metric: {"mean", "std", "n"}}`` (n = cases), or with ``by_class=True``
        ``{class: {metric: {"mean", "std", "n"}}}``.
    """
    if not rows:
        raise ValueError("summarise needs at least one row, got none")
    if by_class:
        return {name: summarise([r for r in rows if r["class"] == name])
                for name in dict.fromkeys(r["class"] for r in rows)}
    by_case: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    out = {}
    for m in COLUMNS[3:]:
        values = [np.mean([r[m] for r in rs if m in r]) for rs in by_case.values() if any(m in r for r in rs)]
        if values:
            out[m] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return out


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean ± std over cases of every metric, then (more than one foreground class) a table per class.

    Returns:
        Lines such as ``        dice: 0.8712 ± 0.0521   (40 cases)``, then per class
        ``RV      0.8410 ± 0.0900     ...`` (columns dice, jaccard, hd95, asd).
    """
    summary = summarise(rows)
    units = sorted({r.get("unit", "px") for r in rows})
    lines = [f"{m:>12s}: {v['mean']:.4f} ± {v['std']:.4f}   ({v['n']} cases"
             f"{', ' + '/'.join(units) if m in ('hd95', 'asd') else ''})" for m, v in summary.items()]
    per_class = summarise(rows, by_class=True)
    if len(per_class) > 1:
        width = max(len(str(c)) for c in per_class) + 2
        lines.append("per class (mean ± std over cases):")
        lines.append((f"{'class':<{width}s}" + "".join(f"{m:>9s}{'':11s}" for m in METRICS)).rstrip())
        for name, s in per_class.items():
            lines.append((f"{str(name):<{width}s}" + "".join(f"{s[m]['mean']:9.4f} ± {s[m]['std']:<8.4f}"
                                                            for m in METRICS)).rstrip())
    return "\n".join(lines)


def write_rows(rows: Sequence[Mapping[str, Any]], csv_path: str | Path, json_path: str | Path | None = None) -> None:
    """Write the rows as CSV (columns of :data:`COLUMNS` that occur, blank when absent) and, when
    ``json_path`` is given, as JSON ``{"rows", "summary": summarise(rows), "per_class": summarise(rows, True)}``;
    both atomically."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)] or list(COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, buf.getvalue())
    if json_path is not None:
        payload = {"rows": list(rows), "summary": summarise(rows) if rows else None,
                   "per_class": summarise(rows, by_class=True) if rows else None}
        write_text_atomic(json_path, json.dumps(payload, indent=1))
