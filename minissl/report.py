"""Every table and figure of minissl: the demo and bench tables, the report figure, the suite gallery,
training curves, the protocol figure and the per-method pictures the tutorials draw.

Tables are plain strings; figures are :class:`matplotlib.figure.Figure` objects built without pyplot
(no global state: safe in notebooks, threads and headless runs). Show one in a notebook by leaving it
as the cell's last value, or save it with ``fig.savefig(path)``.

Images are (Y, X) arrays or tensors; a batch argument is (B, 1, Y, X) for images and (B, Y, X) for
label, probability or mask maps, and a picture shows its first ``n`` samples, one per row.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .results import ResultRow, load, setting_name, val_curve
from .stats import mean_std, paired_interval, verdict

ArrayLike = Any  # numpy array or torch tensor


def _np(a: ArrayLike) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU) or of an array-like; bool as uint8."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.astype(np.uint8) if a.dtype == bool else a


# ---------------------------------------------------------------------------------------------- tables

def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` = [(key, header), ...]; floats with 2 decimals.

    The first column is left-aligned, the others right-aligned; a dashed line follows the header.
    """
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append([f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k, _ in columns])
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _test_summary(result: Any) -> Mapping[str, Any]:
    """The test summary of a RunResult (``.test``) or a Run (``.metrics["test"]``)."""
    return result.test if hasattr(result, "test") else result.metrics["test"]


def _seconds_per_iter(result: Any) -> float:
    return result.seconds_per_iter if hasattr(result, "seconds_per_iter") else result.metrics["seconds_per_iter"]


def summary_row(name: str, result: Any) -> dict[str, Any]:
    """One row of the comparison table: test means over cases (and classes) of each metric.

    Args:
        name: the row's method name.
        result: a finished run, as ``engine.train`` returns it or as a ``Run``.
    """
    t = _test_summary(result)
    row = {"method": name, "dice": 100 * t["dice"]["mean"], "hd95": t["hd95"]["mean"],
           "s_per_iter": _seconds_per_iter(result)}
    if "hc_error_mm" in t:
        row["hc_error_mm"] = t["hc_error_mm"]["mean"]
    return row


def table_columns(*results: Any) -> list[tuple[str, str]]:
    """Columns of the comparison table for these runs (HC error only when a run has it; HD95 in the
    unit of the first run's test rows)."""
    unit = results[0].test_rows[0].get("unit", "px") if results and results[0].test_rows else "px"
    cols = [("method", "method"), ("dice", "Dice %"), ("hd95", f"HD95 {unit}")]
    if any("hc_error_mm" in _test_summary(r) for r in results):
        cols.append(("hc_error_mm", "HC err mm"))
    return cols + [("s_per_iter", "s/iter")]


def _pm(values: Sequence[float], digits: int) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± " + (f"{std:.{digits}f}" if std is not None else "-")


def _mean(values: Sequence[Optional[float]], digits: int) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.{digits}f}" if known and len(known) == len(values) else "-"


def _max(values: Sequence[Optional[float]], digits: int) -> str:
    """The largest of the known values; "-" when none is known."""
    known = [v for v in values if v is not None]
    return f"{max(known):.{digits}f}" if known else "-"


def _gain(rows: Sequence[ResultRow], base: Mapping[int, float]) -> Optional[tuple[str, str, str]]:
    """Paired Dice difference to the baseline's Dice by seed: ("+m (n)", "[lo, hi]", mark), None if no pairs."""
    diffs = [r.dice - base[r.seed] for r in rows if r.seed in base]
    if not diffs:
        return None
    mean, lower, upper = paired_interval(diffs)
    interval = f"[{lower:+.2f}, {upper:+.2f}]" if lower is not None else "undefined (1 seed)"
    return f"{mean:+.2f} ({len(diffs)})", interval, verdict(lower, upper)


def render_leaderboard(rows: Sequence[ResultRow], baseline: str = "supervised",
                       not_applicable: Sequence[str] = ()) -> str:
    """Markdown leaderboard of one setting (one suite, budget, length and recipe).

    Per method: seeds, test Dice % and HD95 as mean ± std (ddof 1) over seeds, the paired difference
    of Dice to ``baseline`` over the seeds both have, its Student-t 95 % interval and the mark
    (:func:`minissl.stats.verdict`), CPU seconds per iteration (mean) and peak memory (MB, the largest
    over the seeds that recorded it: what a run needs; "-" when none did). The baseline comes first,
    the others in name order.

    Args:
        rows: results of one setting (see :func:`minissl.results.load`).
        baseline: the method the others are paired with.
        not_applicable: methods that do not apply to the suite, named below the table.

    Raises:
        ValueError: ``rows`` is empty or mixes settings (the settings found are named).
    """
    if not rows:
        raise ValueError("render_leaderboard: expected at least one result row, got none")
    settings = sorted({(r.suite, r.setting) for r in rows})
    if len(settings) > 1:
        raise ValueError(f"render_leaderboard: expected rows of one suite and setting, got {settings}")
    suite, setting = settings[0]
    by_method: dict[str, list[ResultRow]] = {}
    for r in sorted(rows, key=lambda r: (r.method != baseline, r.method, r.seed)):
        by_method.setdefault(r.method, []).append(r)
    base = {r.seed: r.dice for r in by_method.get(baseline, [])}
    has_hc = any(r.hc_error_mm is not None for r in rows)
    units = "/".join(sorted({r.hd95_unit for r in rows}))
    head = ["method", "seeds", "Dice %", f"HD95 {units}"] + (["HC err mm"] if has_hc else []) + [
        f"Δ Dice vs {baseline} (paired seeds)", "95 % interval", "mark", "CPU s/iter", "peak MB"]
    r0 = rows[0]
    sparse = "" if r0.budget_kind == "cases" else f" (one slice in {r0.budget_kind.split(':')[1]} annotated)"
    title = f"**{suite}**: {r0.budget} labeled{sparse}, {r0.iters} iterations, {r0.recipe} recipe"
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rs in by_method.items():
        cells = [method, str(len(rs)), _pm([r.dice for r in rs], 2), _pm([r.hd95 for r in rs], 2)]
        if has_hc:
            hc = [r.hc_error_mm for r in rs]
            cells.append(_pm(hc, 2) if None not in hc else "-")
        gain = _gain(rs, base) if method != baseline else None
        cells += list(gain) if gain else ["-", "-", "-"]
        cells += [_mean([r.cpu_s_per_iter for r in rs], 3), _max([r.peak_rss_mb for r in rs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± std (ddof 1) over seeds of each run's test mean over cases. Δ: Dice of the method minus "
                  f"{baseline} with the same seed; Student-t 95 % interval with n - 1 degrees of freedom; "
                  f"ahead or behind only when the interval excludes 0. Peak MB: the largest over the seeds that "
                  f"recorded it of a run's peak RSS minus its RSS once the model and its optimisers are built."]
    if not_applicable:
        lines.append(f"Not applicable to {suite}: {', '.join(sorted(not_applicable))}.")
    return "\n".join(lines) + "\n"


def render_summary(rows: Sequence[ResultRow], baseline: str = "supervised") -> str:
    """Compact markdown table, method x suite: the paired Dice gain over ``baseline``, its 95 % interval
    and mark (the baseline's row gives its Dice % as mean ± std); "-" where a method has no run.

    Args:
        rows: results with one setting per suite (e.g. each suite's default budget and length).
        baseline: the method the others are paired with.

    Raises:
        ValueError: ``rows`` is empty or a suite has results of several settings (named).
    """
    if not rows:
        raise ValueError("render_summary: expected at least one result row, got none")
    settings: dict[str, set[str]] = {}
    for r in rows:
        settings.setdefault(r.suite, set()).add(r.setting)
    mixed = {suite: sorted(s) for suite, s in settings.items() if len(s) > 1}
    if mixed:
        raise ValueError(f"render_summary: expected one setting per suite, got {mixed}")
    suites = sorted(settings)
    methods = sorted({r.method for r in rows}, key=lambda m: (m != baseline, m))
    runs = {(s, m): [r for r in rows if r.suite == s and r.method == m] for s in suites for m in methods}
    lines = ["| method | " + " | ".join(f"{s} ({next(iter(settings[s]))})" for s in suites) + " |",
             "|" + "---|" * (len(suites) + 1)]
    for m in methods:
        cells = []
        for s in suites:
            rs, base = runs[(s, m)], {r.seed: r.dice for r in runs[(s, baseline)]}
            gain = _gain(rs, base) if m != baseline else None
            cells.append(_pm([r.dice for r in rs], 2) if m == baseline and rs
                         else f"{gain[0]} {gain[1]} {gain[2]}" if gain else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"{baseline}: test Dice % (mean ± std over seeds); others: Dice minus {baseline} with the same "
                  f"seed, mean (seeds) [Student-t 95 % interval] and mark."]
    return "\n".join(lines) + "\n"


def class_means(result: ResultRow) -> dict[str, dict[str, float]]:
    """Per foreground class, the mean over test cases of each metric of a recorded run
    (its ``test_cases.csv``): ``{class: {"dice", "jaccard", "hd95", "asd"}}``, classes in table order."""
    import csv

    if result.path is None:
        raise ValueError(f"class_means: the result {result.method} seed {result.seed} has no folder")
    with open(Path(result.path) / "test_cases.csv", newline="") as f:
        table = list(csv.DictReader(f))
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in table:
        by_class.setdefault(r["class"], []).append(r)
    return {c: {m: float(np.mean([float(r[m]) for r in rs])) for m in ("dice", "jaccard", "hd95", "asd")}
            for c, rs in by_class.items()}


def render_per_class(rows: Sequence[ResultRow]) -> str:
    """Markdown table of Dice % and HD95 per foreground class (ACDC: RV, MYO, LV), one line per method,
    mean ± std (ddof 1) over seeds of each run's per-class test mean; "" when the suite has one class.

    Args:
        rows: results of one suite and setting (as :func:`render_leaderboard`), each with its folder.
    """
    means = [(r, class_means(r)) for r in rows]
    classes = list(dict.fromkeys(c for _, m in means for c in m))
    if len(classes) < 2:
        return ""
    units = "/".join(sorted({r.hd95_unit for r in rows}))
    head = ["method", "seeds"] + [f"{c} Dice %" for c in classes] + [f"{c} HD95 {units}" for c in classes]
    lines = ["Per class:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_method: dict[str, list[dict[str, dict[str, float]]]] = {}
    for r, m in sorted(means, key=lambda rm: (rm[0].method, rm[0].seed)):
        by_method.setdefault(r.method, []).append(m)
    for method, ms in by_method.items():
        cells = [method, str(len(ms))]
        cells += [_pm([100 * m[c]["dice"] for m in ms], 2) if all(c in m for m in ms) else "-" for c in classes]
        cells += [_pm([m[c]["hd95"] for m in ms], 2) if all(c in m for m in ms) else "-" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_all(root: str | Path = "results", docs: str | Path = "docs/results",
               baseline: str = "supervised",
               not_applicable: Optional[Mapping[str, Sequence[str]]] = None) -> dict[Path, str]:
    """Every leaderboard of a results folder: ``{docs/<suite>-<setting>.md: markdown}``, followed by the
    per-class table (:func:`render_per_class`) for suites of several foreground classes.

    Runs of ``bench methods --recipe official`` (setting ``...-official``) give one table per method, each
    paired with the baseline's runs on that method's recipe (setting ``...-official-<method>``), which get
    no table of their own.

    Args:
        root: the results folder.
        docs: the folder the tables are written to.
        baseline: see :func:`render_leaderboard`.
        not_applicable: per suite, the methods that do not apply to it.
    """
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in load(root):
        groups.setdefault((r.suite, r.setting), []).append(r)
    skip = not_applicable or {}
    tables = {}
    for (suite, setting), rs in groups.items():
        b, n, kind = rs[0].budget, rs[0].iters, rs[0].budget_kind
        if rs[0].recipe.startswith("official-") and (suite, setting_name(b, n, "official", kind)) in groups:
            continue  # the baseline on a method's official recipe: rendered in that method's table
        if rs[0].recipe == "official":  # --recipe official: one table per method, paired with its baseline
            text = "\n".join(render_leaderboard(
                [replace(r, recipe=f"official:{m}") for r in rs if r.method == m]
                + [replace(r, recipe=f"official:{m}") for r in groups.get((suite, setting_name(b, n, f"official:{m}", kind)), [])
                   if r.method == baseline], baseline) for m in sorted({r.method for r in rs} - {baseline}))
        else:
            text = render_leaderboard(rs, baseline, skip.get(suite, ()))
        per_class = render_per_class(rs)
        tables[Path(docs) / f"{suite}-{setting}.md"] = text + ("\n" + per_class if per_class else "")
    return tables


def selection_table(steps: Sequence[int], val: Sequence[float], test: Sequence[float]) -> str:
    """What checkpoint selection reports: the test Dice of the checkpoint chosen on validation (the
    honest number) and of the one chosen on the test split itself (inflated), with their iterations.

    Args:
        steps: iteration of each checkpoint.
        val: validation Dice of each checkpoint (0-1).
        test: test Dice of each checkpoint (0-1).
    """
    if not (len(steps) == len(val) == len(test)) or not steps:
        raise ValueError(f"selection_table needs one val and one test score per step, got {len(steps)} steps, "
                         f"{len(val)} val, {len(test)} test")
    by_val, by_test = int(np.argmax(val)), int(np.argmax(test))
    rows = [{"chosen on": "validation", "iteration": steps[by_val], "test Dice %": 100 * float(test[by_val])},
            {"chosen on": "test", "iteration": steps[by_test], "test Dice %": 100 * float(test[by_test])}]
    return format_table(rows, [("chosen on", "chosen on"), ("iteration", "iteration"), ("test Dice %", "test Dice %")])


# ---------------------------------------------------------------------------------------------- panels

@dataclass
class Panel:
    """One image panel of a picture.

    Attributes:
        data: (Y, X) array or tensor.
        title: panel title.
        kind: ``"image"`` (gray, own range), ``"label"`` (class map, classes 0..``num_classes``-1),
            ``"map"`` (continuous, e.g. probability or loss; magma) or ``"mask"`` (0/1, gray).
        outline: optional (Y, X) 0/1 region drawn as a red contour (a pasted box, blocks, an ellipse).
    """

    data: ArrayLike
    title: str
    kind: str = "image"
    outline: Optional[ArrayLike] = None


_STYLE = {"image": dict(cmap="gray"), "map": dict(cmap="magma"), "mask": dict(cmap="gray", vmin=0, vmax=1)}


def panel_grid(rows: Sequence[Sequence[Panel]], num_classes: Optional[int] = None, size: float = 2.6) -> Figure:
    """A grid of image panels, one list per row (rows may differ in length), axes off.

    Args:
        rows: the panels, row by row.
        num_classes: colour range of ``"label"`` panels (default: the largest label shown + 1).
        size: inches per panel.
    """
    if not rows or not any(rows):
        raise ValueError("panel_grid needs at least one panel, got none")
    n_cols = max(len(r) for r in rows)
    labels = [_np(p.data) for r in rows for p in r if p.kind == "label"]
    top = (num_classes or int(max([lab.max() for lab in labels] + [1])) + 1) - 1
    fig = Figure(figsize=(size * n_cols, size * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_axis_off()
            if j >= len(row):
                continue
            p = row[j]
            if p.kind not in (*_STYLE, "label"):
                raise ValueError(f"Panel {p.title!r}: kind must be image, label, map or mask, got {p.kind!r}")
            style = _STYLE.get(p.kind) or dict(cmap="viridis", vmin=0, vmax=max(top, 1), interpolation="nearest")
            ax.imshow(_np(p.data), **style)
            if p.outline is not None:
                ax.contour(_np(p.outline).astype(float), levels=[0.5], colors="red", linewidths=1)
            ax.set_title(p.title, fontsize=8)
    fig.tight_layout()
    return fig


def _region(region: Optional[ArrayLike], i: int) -> Optional[ArrayLike]:
    return None if region is None else region[i]


def mix_figure(mixes: Mapping[str, Sequence[ArrayLike]], region: Optional[ArrayLike] = None,
               num_classes: Optional[int] = None, n: int = 1, weight_title: str = "weight map") -> Figure:
    """Mixed (copy-paste, CutMix, block-mask) images with their targets and weights, one row per mix
    and sample: image, target, weight map; the pasted region outlined in red.

    BCP shows its two mixes ``X_in``/``X_out`` with the box, M3HL its mutual mixes with the block mask,
    UniMatch its strong views with their boxes (``weight_title="confidence mask"``).

    Args:
        mixes: ``{name: (x, y, weight)}`` or ``{name: (x, y, weight, region)}``: x (B, 1, Y, X),
            y (B, Y, X) targets, weight (B, Y, X) in [0, 1], region (B, Y, X) 0/1 of this mix.
        region: (B, Y, X) 0/1 pasted region shared by every mix without its own (None: no outline).
        num_classes: colour range of the targets.
        n: samples shown per mix.
    """
    rows = []
    for name, (x, y, weight, *own) in mixes.items():
        reg = own[0] if own else region
        for i in range(min(n, len(x))):
            out = _region(reg, i)
            rows.append([Panel(x[i, 0], f"{name} [{i}]", "image", out), Panel(y[i], "target", "label", out),
                         Panel(weight[i], weight_title, "mask", out)])
    return panel_grid(rows, num_classes)


def disagreement_figure(x: ArrayLike, probs_a: ArrayLike, probs_b: ArrayLike,
                        names: Sequence[str] = ("student", "teacher"), n: int = 2) -> Figure:
    """Two networks on the same images: each argmax, where the argmaxes differ, and the squared
    difference of the softmaxes (the Mean Teacher consistency per voxel), one row per sample.

    Args:
        x: (B, 1, Y, X) images.
        probs_a, probs_b: (B, C, Y, X) softmax of each network.
        names: the two networks' names.
        n: samples shown.
    """
    pa, pb = torch.as_tensor(_np(probs_a)), torch.as_tensor(_np(probs_b))
    if pa.shape != pb.shape or pa.dim() != 4:
        raise ValueError(f"disagreement_figure needs two (B, C, Y, X) maps of one shape, got {tuple(pa.shape)} "
                         f"and {tuple(pb.shape)}")
    a, b = pa.argmax(1), pb.argmax(1)  # (B, Y, X) each
    sq = (pa - pb).pow(2).mean(1)  # (B, Y, X)
    rows = [[Panel(x[i, 0], "image"), Panel(a[i], names[0], "label"), Panel(b[i], names[1], "label"),
             Panel(a[i] != b[i], "argmax differs", "mask"), Panel(sq[i], "(p_a - p_b)^2", "map")]
            for i in range(min(n, len(pa)))]
    return panel_grid(rows, pa.shape[1])


def uncertainty_figure(x: ArrayLike, pred: ArrayLike, uncertainty: ArrayLike, threshold: float,
                       num_classes: Optional[int] = None, n: int = 2) -> Figure:
    """UA-MT: image, the teacher's prediction, its uncertainty and the mask ``uncertainty < threshold``
    that keeps the consistency loss, one row per sample.

    Args:
        x: (B, 1, Y, X) images.
        pred: (B, Y, X) teacher labels.
        uncertainty: (B, Y, X) e.g. predictive entropy in nats.
        threshold: the uncertainty threshold.
        num_classes: colour range of the prediction.
        n: samples shown.
    """
    u = torch.as_tensor(_np(uncertainty))
    rows = [[Panel(x[i, 0], "image"), Panel(pred[i], "teacher prediction", "label"),
             Panel(u[i], "uncertainty", "map"), Panel(u[i] < threshold, f"kept: u < {threshold:.2f}", "mask")]
            for i in range(min(n, len(u)))]
    return panel_grid(rows, num_classes)


def displacement_figure(x: ArrayLike, confidence: ArrayLike, displaced: Mapping[str, Sequence[ArrayLike]],
                        num_classes: Optional[int] = None, index: int = 0) -> Figure:
    """CAD: low-confidence regions replaced by confident content, one row per setting (e.g. an early
    and a late step of the schedule): the confidence with the voxels under the threshold, the image,
    the displaced image and its pseudo-label; the replaced box outlined in red.

    Args:
        x: (B, 1, Y, X) unlabeled images.
        confidence: (B, Y, X) the teachers' confidence.
        displaced: ``{title: (tau, x_d, pseudo_d, region)}``: threshold, (B, 1, Y, X) displaced images,
            (B, Y, X) their pseudo-labels and (B, Y, X) 0/1 replaced region.
        num_classes: colour range of the pseudo-labels.
        index: the sample shown.
    """
    conf = torch.as_tensor(_np(confidence))
    rows = []
    for title, (tau, x_d, pl_d, region) in displaced.items():
        out = region[index]
        rows.append([Panel(conf[index], f"{title}: confidence", "map", out),
                     Panel(conf[index] < tau, f"confidence < {tau:.2f}", "mask", out),
                     Panel(x[index, 0], "image", "image", out), Panel(x_d[index, 0], "displaced", "image", out),
                     Panel(pl_d[index], "displaced pseudo-label", "label", out)])
    return panel_grid(rows, num_classes)


def _ellipse_axis(params: Sequence[float]) -> tuple[list[float], list[float]]:
    """End points (xs, ys) of the major axis of ``[cx, cy, a, b, theta]``."""
    cx, cy, a, _, t = (float(v) for v in params)
    dx, dy = a * np.cos(t), a * np.sin(t)
    return [cx - dx, cx + dx], [cy - dy, cy + dy]


def ellipse_figure(x: ArrayLike, probs: ArrayLike, pseudo: ArrayLike, params: ArrayLike, valid: ArrayLike,
                   threshold: float = 0.6, n: int = 2) -> Figure:
    """ERSR: a probability map, its plain threshold and the ellipse-refined pseudo-label with the fitted
    ellipse (red) and its major axis (yellow, the symmetry axis), one row per sample.

    Args:
        x: (B, 1, Y, X) images.
        probs: (B, Y, X) foreground probability.
        pseudo: (B, Y, X) refined pseudo-labels.
        params: (B, 5) fitted ellipses ``[cx, cy, a, b, theta]`` (pixels, radians).
        valid: (B,) bool, whether each fit succeeded.
        threshold: the probability threshold of the plain pseudo-label.
        n: samples shown.
    """
    from minissl import ops

    p = torch.as_tensor(_np(probs))
    params_t, valid_t = torch.as_tensor(_np(params)).double(), torch.as_tensor(_np(valid)).bool()
    outline = ops.ellipse_mask(params_t, valid_t, tuple(p.shape[1:]))  # (B, Y, X)
    rows = []
    for i in range(min(n, len(p))):
        ring = outline[i] if valid_t[i] else None
        rows.append([Panel(x[i, 0], "image"), Panel(p[i], "probability", "map"),
                     Panel(p[i] > threshold, f"p > {threshold}", "mask"), Panel(pseudo[i], "refined", "mask", ring)])
    fig = panel_grid(rows)
    for i in range(len(rows)):
        if valid_t[i]:
            xs, ys = _ellipse_axis(params_t[i].tolist())
            fig.axes[i * len(rows[0]) + 3].plot(xs, ys, "y-", lw=1)
    return fig


# ---------------------------------------------------------------------------------------------- curves

def log_series(log: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of one column of a run's log (rows where the column is empty are skipped)."""
    pairs = [(int(float(r["step"])), float(r[key])) for r in log if r.get(key) not in (None, "")]
    return [s for s, _ in pairs], [v for _, v in pairs]


def curves(runs: Mapping[str, Any], keys: Sequence[str] = ("loss", "val_dice"), log_scale: bool = False) -> Figure:
    """Training curves from the runs' logs: one panel per log column, one line per run.

    Args:
        runs: ``{name: run}``: objects with ``log`` (list of row dicts with ``step``), e.g. ``Run``.
        keys: log columns, one panel each (e.g. ``"loss"``, ``"sup"``, ``"unsup"``, ``"val_dice"``).
        log_scale: logarithmic y axes.
    """
    fig = Figure(figsize=(4 * len(keys), 3))
    for key, ax in zip(keys, fig.subplots(1, len(keys), squeeze=False)[0]):
        for name, run in runs.items():
            steps, values = log_series(run.log, key)
            if values:
                ax.plot(steps, values, label=name)
        ax.set(title=key, xlabel="iteration", yscale="log" if log_scale else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def schedule_figure(schedules: Mapping[str, Callable[[int], float]], max_iters: int, points: int = 50) -> Figure:
    """Schedules over a run (consistency weight, thresholds, EMA decay, ...): one panel each.

    Args:
        schedules: ``{title: f(step) -> value}``.
        max_iters: the run's length.
        points: steps sampled.
    """
    steps = sorted(set(np.linspace(0, max_iters, points).round().astype(int).tolist()))
    fig = Figure(figsize=(4 * len(schedules), 3))
    for (title, fn), ax in zip(schedules.items(), fig.subplots(1, len(schedules), squeeze=False)[0]):
        ax.plot(steps, [fn(s) for s in steps])
        ax.set(title=title, xlabel="iteration")
    fig.tight_layout()
    return fig


def embedding_figure(features: Mapping[str, ArrayLike], labels: ArrayLike, label_name: str = "label") -> Figure:
    """Feature vectors projected on their first two principal components, one panel per set, points
    coloured by a label (e.g. SPCL's slice-position partition, before and after pre-training).

    Args:
        features: ``{title: (N, D) features}``, the same N items in every set.
        labels: (N,) integer label of each item.
        label_name: the colour bar's title.
    """
    labels = _np(labels)
    fig = Figure(figsize=(3.6 * len(features), 3.2))
    for (title, f), ax in zip(features.items(), fig.subplots(1, len(features), squeeze=False)[0]):
        f = _np(f).astype(np.float64)
        if f.ndim != 2 or len(f) != len(labels):
            raise ValueError(f"embedding_figure {title!r}: expected ({len(labels)}, D) features, got {f.shape}")
        centred = f - f.mean(0)
        xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # (N, 2) principal coordinates
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="viridis", s=12)
        ax.set(title=title, xticks=[], yticks=[])
        fig.colorbar(dots, ax=ax, label=label_name)
    fig.tight_layout()
    return fig


def selection_figure(steps: Sequence[int], val: Sequence[float], test: Sequence[float]) -> Figure:
    """Validation and test Dice of the same checkpoints, with the checkpoint each split would choose."""
    table = selection_table(steps, val, test)  # validates the lengths
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, ys, marker in (("validation", val, "o"), ("test", test, "s")):
        ax.plot(steps, ys, marker=marker, ms=3, label=f"{name} Dice")
        k = int(np.argmax(ys))
        ax.axvline(steps[k], ls="--", lw=0.8, color=ax.lines[-1].get_color(), label=f"best on {name}")
    ax.set(xlabel="iteration", ylabel="mean Dice", title="checkpoint selection")
    ax.legend(fontsize=7)
    ax.text(0.01, -0.35, table, transform=ax.transAxes, family="monospace", fontsize=7, va="top")
    fig.tight_layout()
    return fig


def convergence_figure(groups: Mapping[str, Sequence[ResultRow]]) -> Figure:
    """Validation curves of recorded runs: per group the seed mean (thick) and each seed (thin).

    Args:
        groups: ``{label: rows}``, e.g. the budget at N and 2N and all labels at N
            (:func:`minissl.convergence.converge`).
    """
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.subplots()
    for label, rows in groups.items():
        curves = [val_curve(r) for r in rows]
        if not curves:
            continue
        mean = np.mean([v for _, v in curves], axis=0)
        line, = ax.plot(curves[0][0], mean, lw=2, label=f"{label} ({len(rows)} seeds)")
        for steps, vals in curves:
            ax.plot(steps, vals, lw=0.6, alpha=0.4, color=line.get_color())
    ax.set(xlabel="iteration", ylabel="validation Dice (points)", title="supervised baseline: validation curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- reports

def _show_slice(label: np.ndarray) -> Optional[int]:
    """Index of the (Z, Y, X) slice with the most foreground (None for a 2D image)."""
    return None if label.ndim == 2 else int((label.reshape(label.shape[0], -1) > 0).sum(1).argmax())


def _class_colours(n_foreground: int) -> ListedColormap:
    return ListedColormap(colormaps["tab10"].colors[: max(n_foreground, 1)])


_REPORT_CURVES = (("loss", "loss"), ("val_dice", "validation Dice"))


def report_figure(cases: Sequence[Any], preds: Sequence[ArrayLike] | Mapping[str, Sequence[ArrayLike]],
                  runs: Optional[Mapping[str, Any]] = None, class_names: Optional[Sequence[str]] = None,
                  max_cases: int = 4) -> Figure:
    """The report of finished runs: one column per case (at most ``max_cases``); rows image, ground
    truth, then one prediction row per method (label overlays); below, loss and validation Dice vs
    iteration from the runs' logs.

    Args:
        cases: objects with ``id``, ``image`` and ``label``, (Y, X) or (Z, Y, X); volumes show the slice with
            the most ground-truth foreground.
        preds: per case predicted label maps, or ``{method: [per case]}`` for several methods.
        runs: ``{method: run}`` with ``log`` rows (e.g. ``Run``) for the curve panels; None for none.
        class_names: legend names, class 0 (background) first.
        max_cases: columns shown.
    """
    methods = dict(preds) if isinstance(preds, Mapping) else {"prediction": preds}
    n = min(len(cases), max_cases)
    if n == 0 or any(len(p) < n for p in methods.values()):
        raise ValueError(f"report_figure needs >= 1 case and a prediction per case, got {len(cases)} cases, "
                         f"{[len(p) for p in methods.values()]} predictions")
    labels = [np.asarray(c.label) for c in cases[:n]]
    names = list(class_names) if class_names else [str(k) for k in range(int(max(l.max() for l in labels)) + 1)]
    colours = _class_colours(len(names) - 1)
    series = {name: {key: log_series(run.log, key) for key, _ in _REPORT_CURVES} for name, run in (runs or {}).items()}
    panels = [(key, title) for key, title in _REPORT_CURVES if any(s[key][1] for s in series.values())]
    rows = 2 + len(methods)
    fig = Figure(figsize=(2.4 * max(n, 2), 2.2 * rows + (2.6 if panels else 0)))
    grid = fig.add_gridspec(rows + (1 if panels else 0), 1, height_ratios=[1] * rows + ([1.1] if panels else []))
    top = grid[:rows].subgridspec(rows, n)
    for j, case in enumerate(cases[:n]):
        z = _show_slice(labels[j])

        def pick(a: ArrayLike) -> np.ndarray:
            return np.asarray(a) if z is None else np.asarray(a)[z]

        for i, (title, lab) in enumerate([("image", None), ("ground truth", labels[j])]
                                         + [(m, p[j]) for m, p in methods.items()]):
            ax = fig.add_subplot(top[i, j])
            ax.imshow(pick(case.image), cmap="gray")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(pick(lab), 0), cmap=colours, vmin=1, vmax=max(len(names) - 1, 1),
                          alpha=0.5, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title)
            if i == 0:
                ax.set_title(str(case.id) + ("" if z is None else f" z={z}"))
    fig.legend(handles=[Patch(color=colours(k - 1), label=names[k]) for k in range(1, len(names))],
               loc="upper right", fontsize=8)
    if panels:
        bottom = grid[rows].subgridspec(1, len(panels))
        for k, (key, title) in enumerate(panels):
            ax = fig.add_subplot(bottom[0, k])
            for method, s in series.items():
                if s[key][1]:
                    ax.plot(*s[key], label=method)
            ax.set_xlabel("iteration"), ax.set_title(title), ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    return fig


def gallery(n: int = 4, seed: int = 0) -> Figure:
    """The first ``n`` cases of every embedded suite: image, then image with the label overlay
    (cardiac: a mid slice; atrium: the axial slice through the label's centre).

    Args:
        n: cases per suite.
        seed: generation seed.
    """
    from minissl.data.phantoms import SUITES, generate_case

    cmap = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.45), (0.2, 1, 0.2, 0.45), (0.2, 0.5, 1, 0.45)])
    fig = Figure(figsize=(2 * n * 1.6, len(SUITES) * 1.75))
    axes = fig.subplots(len(SUITES), 2 * n, squeeze=False)
    for r, name in enumerate(SUITES):
        for i in range(n):
            case = generate_case(name, i, seed)
            img, lab = case.image, case.label
            if img.ndim == 3:
                k = len(img) // 2 if name == "cardiac" else int(np.argwhere(lab)[:, 0].mean())
                img, lab = img[k], lab[k]
            for j, show_label in enumerate((False, True)):
                ax = axes[r, 2 * i + j]
                ax.imshow(img, cmap="gray", interpolation="nearest")
                if show_label:
                    ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
            axes[r, 2 * i].set_title(f"{name} {i}", fontsize=7)
    fig.tight_layout()
    return fig
