"""Tables and figures of minissl.report: the table text for given rows, and for figures the axes,
their titles and the pixel data of the image panels."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minissl import ops, report


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _run(test, rows=(), log=(), seconds=0.25):
    return SimpleNamespace(metrics={"test": test, "seconds_per_iter": seconds}, test_rows=list(rows), log=list(log))


def _images(fig):
    """(title, image array) of every axis that shows an image, in order."""
    return [(ax.get_title(), np.asarray(ax.images[0].get_array())) for ax in fig.axes if ax.images]


def test_format_table_aligns_and_rounds():
    text = report.format_table([{"m": "bcp", "d": 57.416}, {"m": "supervised", "d": 4.0, "x": 3}],
                               [("m", "method"), ("d", "Dice %")])
    assert text.splitlines() == ["method      Dice %",
                                 "----------  ------",
                                 "bcp          57.42",
                                 "supervised    4.00"]


def test_summary_row_and_columns_from_a_run():
    test = {"dice": {"mean": 0.5}, "hd95": {"mean": 3.25}, "hc_error_mm": {"mean": 7.5}}
    run = _run(test, rows=[{"unit": "mm"}])
    assert report.summary_row("bcp", run) == {"method": "bcp", "dice": 50.0, "hd95": 3.25, "s_per_iter": 0.25,
                                              "hc_error_mm": 7.5}
    assert report.table_columns(run) == [("method", "method"), ("dice", "Dice %"), ("hd95", "HD95 mm"),
                                         ("hc_error_mm", "HC err mm"), ("s_per_iter", "s/iter")]
    plain = _run({"dice": {"mean": 0.5}, "hd95": {"mean": 1.0}}, rows=[{"unit": "px"}])
    assert [h for _, h in report.table_columns(plain)] == ["method", "Dice %", "HD95 px", "s/iter"]
    text = report.format_table([report.summary_row("a", plain)], report.table_columns(plain))
    assert text.splitlines()[2].split() == ["a", "50.00", "1.00", "0.25"]


def _bench(method, seed, budget, dice, hd95=1.0, s=0.1, cpu=None, hc=None):
    return SimpleNamespace(method=method, seed=seed, budget=budget, dice=dice, hd95=hd95, hc_error_mm=hc,
                           s_per_iter=s, cpu_s_per_iter=cpu)


def test_bench_table_mean_std_over_seeds():
    runs = [_bench("mt", s, 4, d, h) for s, (d, h) in enumerate([(80.0, 2.0), (90.0, 4.0)])]
    text = report.bench_table(runs)
    assert "| mt | 4 | 2 | 85.00 ± 5.00 | - | 3.00 ± 1.00 | 0.100 |" in text
    assert "HC err" not in text and "wall s/iter" in text  # runs without CPU time: wall time, said so
    runs = [_bench("mt", s, 4, 80.0, 2.0, 0.5, cpu) for s, cpu in enumerate([0.1, 0.3])]
    assert "| mt | 4 | 2 | 80.00 ± 0.00 | - | 2.00 ± 0.00 | 0.200 |" in report.bench_table(runs)
    assert "CPU s/iter" in report.bench_table(runs)


def test_bench_table_gain_is_paired_by_seed_and_budget():
    runs = [_bench("supervised", s, 4, d) for s, d in enumerate([60.0, 80.0])]
    runs += [_bench("mt", s, 4, d) for s, d in enumerate([64.0, 78.0])]
    runs += [_bench("mt", 0, 8, 99.0)]  # no supervised run at budget 8
    text = report.bench_table(runs)
    assert "| mt | 4 | 2 | 71.00 ± 7.00 | +1.00 ± 3.00 (1/2) |" in text  # +4 and -2, not 71 - 70
    assert "| mt | 8 | 1 | 99.00 ± 0.00 | - |" in text
    assert "| supervised | 4 | 2 | 70.00 ± 10.00 | - |" in text


def test_selection_table_and_figure():
    steps, val, test = [10, 20, 30], [0.5, 0.7, 0.6], [0.55, 0.6, 0.8]
    lines = report.selection_table(steps, val, test).splitlines()
    assert lines[2].split() == ["validation", "20", "60.00"] and lines[3].split() == ["test", "30", "80.00"]
    fig = report.selection_figure(steps, val, test)
    ax = fig.axes[0]
    assert [list(line.get_ydata()) for line in ax.lines[::2]] == [val, test]
    assert [line.get_xdata()[0] for line in ax.lines[1::2]] == [20, 30]  # the chosen checkpoints
    with pytest.raises(ValueError, match="one val and one test score per step, got 3 steps, 2 val"):
        report.selection_table(steps, val[:2], test)


def test_panel_grid_shows_the_data():
    a, b = np.arange(12.0).reshape(3, 4), torch.tensor([[0, 1], [2, 1]])
    fig = report.panel_grid([[report.Panel(a, "first"), report.Panel(b, "labels", "label")],
                             [report.Panel(a, "map", "map")]])
    assert len(fig.axes) == 4  # 2 x 2 grid, the empty cell has no image
    shown = _images(fig)
    assert [t for t, _ in shown] == ["first", "labels", "map"]
    np.testing.assert_array_equal(shown[0][1], a)
    np.testing.assert_array_equal(shown[1][1], b.numpy())
    with pytest.raises(ValueError, match="Panel 'x': kind must be image, label, map or mask, got 'rgb'"):
        report.panel_grid([[report.Panel(a, "x", "rgb")]])
    with pytest.raises(ValueError, match="at least one panel"):
        report.panel_grid([])


def test_mix_figure_rows_and_outline():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g)  # (B, 1, H, W)
    y = torch.randint(0, 3, (2, 16, 16), generator=g)  # (B, H, W)
    boxes = torch.tensor([[2, 3, 10, 12], [0, 0, 8, 8]])  # (B, 4)
    region = ops.region_mask((16, 16), boxes=boxes)  # (B, H, W)
    w = region.float() + 0.5 * (1 - region.float())
    fig = report.mix_figure({"X_in": (x, y, w), "X_out": (1 - x, y, w)}, region, num_classes=3)
    shown = _images(fig)
    assert [t for t, _ in shown] == ["X_in [0]", "target", "weight map", "X_out [0]", "target", "weight map"]
    np.testing.assert_array_equal(shown[0][1], x[0, 0].numpy())
    np.testing.assert_array_equal(shown[3][1], (1 - x)[0, 0].numpy())
    np.testing.assert_array_equal(shown[2][1], w[0].numpy())
    assert all(ax.collections for ax in fig.axes)  # the box is outlined on every panel
    views = report.mix_figure({"view 1": (x, y, w > 0.9, region)}, n=2, weight_title="confidence mask")
    assert [t for t, _ in _images(views)][-1] == "confidence mask" and len(views.axes) == 6


def test_disagreement_and_uncertainty_figures():
    x = torch.rand(3, 1, 8, 8)
    pa = torch.zeros(3, 2, 8, 8)
    pa[:, 0] = 1  # (B, C, H, W) all class 0
    pb = pa.clone()
    pb[:, :, :4] = pb[:, :, :4].flip(1)  # top half class 1
    fig = report.disagreement_figure(x, pa, pb, names=("student", "peer"), n=2)
    shown = _images(fig)
    assert len(fig.axes) == 10 and [t for t, _ in shown[:5]] == ["image", "student", "peer", "argmax differs",
                                                                  "(p_a - p_b)^2"]
    expected = np.zeros((8, 8), np.uint8)
    expected[:4] = 1
    np.testing.assert_array_equal(shown[3][1], expected)
    np.testing.assert_allclose(shown[4][1], expected.astype(np.float32))  # ((1-0)^2 + (0-1)^2) / 2
    with pytest.raises(ValueError, match=r"got \(3, 2, 8, 8\) and \(3, 2, 8\)"):
        report.disagreement_figure(x, pa, pb[..., 0])
    u = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    fig = report.uncertainty_figure(x[:1], pb.argmax(1)[:1], u, threshold=0.5, num_classes=2)
    shown = _images(fig)
    assert shown[3][0] == "kept: u < 0.50"
    np.testing.assert_array_equal(shown[3][1], (u[0] < 0.5).numpy().astype(np.uint8))


def test_displacement_and_ellipse_figures():
    x = torch.rand(2, 1, 32, 32)
    conf = torch.rand(2, 32, 32)
    region = torch.zeros(2, 32, 32, dtype=torch.bool)
    region[:, 4:10, 4:10] = True
    fig = report.displacement_figure(x, conf, {"step 0": (0.5, x.flip(0), region.long(), region)}, num_classes=2)
    shown = _images(fig)
    assert shown[0][0] == "step 0: confidence" and shown[1][0] == "confidence < 0.50"
    np.testing.assert_array_equal(shown[3][1], x[1, 0].numpy())  # the displaced image of sample 0

    mask = torch.from_numpy(_disk((32, 32), 16, 15, 9))[None].repeat(2, 1, 1)  # (B, H, W)
    params, valid = ops.fit_ellipse(mask.to(torch.uint8))
    probs = mask.float() * 0.9
    valid[1] = False  # no outline, no axis
    fig = report.ellipse_figure(x, probs, mask, params, valid, threshold=0.6)
    shown = _images(fig)
    assert [t for t, _ in shown[:4]] == ["image", "probability", "p > 0.6", "refined"]
    assert fig.axes[3].collections and not fig.axes[7].collections and not fig.axes[7].lines
    np.testing.assert_allclose(shown[1][1], probs[0].numpy())
    axis = fig.axes[3].lines[0]  # the major axis through the fitted centre
    assert np.mean(axis.get_xdata()) == pytest.approx(float(params[0, 0]))


def test_curves_and_schedules():
    log = [{"step": 1, "loss": 2.0, "val_dice": None}, {"step": 2, "loss": 1.0, "val_dice": 0.4},
           {"step": 3, "loss": "", "val_dice": 0.6}]
    assert report.log_series(log, "val_dice") == ([2, 3], [0.4, 0.6])
    fig = report.curves({"a": _run({}, log=log), "b": _run({}, log=log[:2])}, keys=("loss", "val_dice"))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "val_dice"]
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[2.0, 1.0], [2.0, 1.0]]
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[0.4, 0.6], [0.4]]
    fig = report.schedule_figure({"w": lambda s: s / 10, "tau": lambda s: 0.5}, max_iters=10, points=11)
    assert [ax.get_title() for ax in fig.axes] == ["w", "tau"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), np.arange(11) / 10)


def _case(cid, image, label):
    return SimpleNamespace(id=cid, image=image.astype(np.float32), label=label)


def test_report_figure_cases_predictions_and_curves():
    rng = np.random.default_rng(0)
    labels = [_disk((32, 40), 16, 20, 8), np.stack([_disk((24, 24), 12, 12, r) * 2 for r in (0, 3, 6, 8, 4, 0)])]
    cases = [_case("c0", rng.random((32, 40)), labels[0]), _case("c1", rng.random((6, 24, 24)), labels[1])]
    preds = {"supervised": [np.roll(l, 2, -1) for l in labels], "mean_teacher": labels}
    log = [{"step": s, "loss": float(np.exp(-s / 50)), "val_dice": s / 99 if s % 30 == 0 else None}
           for s in range(0, 100, 10)]
    fig = report.report_figure(cases, preds, runs={"supervised": _run({}, log=log)}, class_names=["bg", "A", "B"])
    assert len(fig.axes) == 4 * 2 + 2  # image, truth, 2 predictions x 2 cases + 2 curve panels
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["c0", "c1 z=3", "loss", "validation Dice"]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), cases[0].image)
    np.testing.assert_array_equal(fig.axes[4].images[0].get_array(), cases[1].image[3])  # the fullest slice
    assert list(fig.axes[-1].lines[0].get_ydata()) == [0.0, 30 / 99, 60 / 99, 90 / 99]
    assert len(report.report_figure(cases[:1], [labels[0]]).axes) == 3  # one method, no curves
    with pytest.raises(ValueError, match="a prediction per case"):
        report.report_figure(cases, [labels[0]])


def test_gallery_shows_every_suite():
    from minissl.data import phantoms

    fig = report.gallery(n=1, seed=0)
    assert len(fig.axes) == 2 * len(phantoms.SUITES)
    assert [ax.get_title() for ax in fig.axes[::2]] == [f"{name} 0" for name in phantoms.SUITES]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), phantoms.generate_case("fetal_head", 0).image)


def test_demo_report_reads_runs(tiny_stores, tmp_path):
    from matplotlib.image import imread

    from minissl.config import load_config
    from minissl.demo import report as demo_report
    from minissl.engine import train
    from minissl.run import Run

    runs = []
    for method in ("supervised", "mean_teacher"):
        cfg = load_config(method=method, data_root=str(tiny_stores["fetal_head"]), max_iters=2, val_every=1, width=4,
                          depth=2, batch_size=4, labeled_bs=2, out_dir=str(tmp_path), progress=False)
        runs.append(Run(train(cfg).run_dir))
    rows = [report.summary_row(r.method_name, r) for r in runs]
    assert [r["method"] for r in rows] == ["supervised", "mean_teacher"]
    assert rows[0]["dice"] == pytest.approx(100 * runs[0].metrics["test"]["dice"]["mean"])
    png = imread(demo_report(runs, tmp_path / "report.png", n_cases=2))
    assert png.ndim == 3 and png.shape[0] > 300
