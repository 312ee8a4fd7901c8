"""Tables and figures of minissl.report: the table text for given rows, and for figures the axes,
their titles and the pixel data of the image panels."""
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minissl import ops, report, results


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


FIXTURE = Path(__file__).parent / "data" / "results_fixture"
FOOT = ("Mean ± std (ddof 1) over seeds of each run's test mean over cases. Δ: Dice of the method minus supervised "
        "with the same seed; Student-t 95 % interval with n - 1 degrees of freedom; ahead or behind only when the "
        "interval excludes 0. Peak MB: the largest over the seeds that recorded it of a run's peak RSS minus its "
        "RSS once the model and its optimisers are built.")

# Fixture (Dice of seeds 0, 1, 2): supervised 70, 68, 72; mean_teacher 73, 73, 75 (paired +3, +5, +3);
# cps 66, 69, 70 (-4, +1, -2); ua_mt 60, 62, 61 (-10, -6, -11); bcp seed 0 only: 80 (+10).
# Peak MB: supervised 100, 120 and 300 recorded without its baseline (ignored); cps 90 from seed 1 only.
# Half-width t_{0.975,2} * s / sqrt(3) with t_{0.975,2} = 4.3027: mean_teacher s = 1.1547 -> 2.868,
# cps s = 2.5166 -> 6.252, ua_mt s = 2.6458 -> 6.572.
EXPECTED = """**cardiac**: 3 labeled, 600 iterations, shared recipe

| method | seeds | Dice % | HD95 px | Δ Dice vs supervised (paired seeds) | 95 % interval | mark \
| CPU s/iter | peak MB |
|---|---|---|---|---|---|---|---|---|
| supervised | 3 | 70.00 ± 2.00 | 6.00 ± 1.00 | - | - | - | 0.100 | 120 |
| bcp | 1 | 80.00 ± - | 3.00 ± - | +10.00 (1) | undefined (1 seed) | inconclusive | 0.400 | - |
| cps | 3 | 68.33 ± 2.08 | 8.00 ± 0.00 | -1.67 (3) | [-7.92, +4.58] | inconclusive | 0.300 | 90 |
| mean_teacher | 3 | 73.67 ± 1.15 | 4.00 ± 0.00 | +3.67 (3) | [+0.80, +6.54] | ahead | 0.200 | - |
| ua_mt | 3 | 61.00 ± 1.00 | 9.00 ± 0.00 | -9.00 (3) | [-15.57, -2.43] | behind | 0.200 | - |

""" + FOOT + "\nNot applicable to cardiac: ersr, m3hl.\n"


def test_render_leaderboard_from_the_fixture():
    rows = [r for r in results.load(FIXTURE) if r.iters == 600]
    assert report.render_leaderboard(rows, not_applicable=["m3hl", "ersr"]) == EXPECTED


def test_render_all_gives_one_table_per_setting():
    tables = report.render_all(FIXTURE, docs="docs/results", not_applicable={"cardiac": ["m3hl", "ersr"]})
    assert sorted(map(str, tables)) == ["docs/results/cardiac-b3-i1200-shared.md",
                                        "docs/results/cardiac-b3-i600-shared.md"]
    assert tables[Path("docs/results/cardiac-b3-i600-shared.md")] == EXPECTED
    longer = tables[Path("docs/results/cardiac-b3-i1200-shared.md")]
    assert "| supervised | 1 | 75.00 ± - | 4.00 ± - | - | - | - | 0.100 | - |" in longer  # peak: no baseline named


def test_render_all_pairs_official_recipes_with_their_baseline(tmp_path):
    """--recipe official: bcp (setting official) against supervised on bcp's recipe (official-bcp), one table."""
    import shutil

    src = FIXTURE / "cardiac" / "b3-i600-shared"
    for method, setting in (("bcp", "b3-i600-official"), ("cps", "b3-i600-official"),
                            ("supervised", "b3-i600-official-bcp")):
        for seed in (0, 1, 2):
            if (src / method / f"seed{seed}").is_dir():
                shutil.copytree(src / method / f"seed{seed}", tmp_path / "cardiac" / setting / method / f"seed{seed}")
    tables = report.render_all(tmp_path, docs="d")
    assert list(tables) == [Path("d/cardiac-b3-i600-official.md")]  # the lent-recipe baseline has no file
    text = tables[Path("d/cardiac-b3-i600-official.md")]
    assert "**cardiac**: 3 labeled, 600 iterations, official:bcp recipe" in text
    assert "**cardiac**: 3 labeled, 600 iterations, official:cps recipe" in text
    bcp_table, cps_table = text.split("**cardiac**")[1:]
    assert "| supervised | 3 | 70.00 ± 2.00 |" in bcp_table and "| bcp | 1 | 80.00 ± - |" in bcp_table
    assert "+10.00 (1)" in bcp_table  # paired with supervised seed 0
    assert "| supervised" not in cps_table and "| cps | 3 |" in cps_table  # no baseline on cps's recipe


def test_render_refuses_mixed_settings_and_nothing():
    with pytest.raises(ValueError, match=r"expected rows of one suite and setting, got "
                                         r"\[\('cardiac', 'b3-i1200-shared'\), \('cardiac', 'b3-i600-shared'\)\]"):
        report.render_leaderboard(results.load(FIXTURE))
    with pytest.raises(ValueError, match="expected at least one result row, got none"):
        report.render_leaderboard([])


def test_render_summary_is_method_by_suite():
    rows = [r for r in results.load(FIXTURE) if r.iters == 600]
    rows += [dataclasses.replace(r, suite="atrium", budget=4, dice=r.dice + 1) for r in rows
             if r.method in ("supervised", "mean_teacher")]
    assert report.render_summary(rows) == """| method | atrium (b4-i600-shared) | cardiac (b3-i600-shared) |
|---|---|---|
| supervised | 71.00 ± 2.00 | 70.00 ± 2.00 |
| bcp | - | +10.00 (1) undefined (1 seed) inconclusive |
| cps | - | -1.67 (3) [-7.92, +4.58] inconclusive |
| mean_teacher | +3.67 (3) [+0.80, +6.54] ahead | +3.67 (3) [+0.80, +6.54] ahead |
| ua_mt | - | -9.00 (3) [-15.57, -2.43] behind |

supervised: test Dice % (mean ± std over seeds); others: Dice minus supervised with the same seed, mean (seeds) \
[Student-t 95 % interval] and mark.
"""
    with pytest.raises(ValueError, match=r"expected one setting per suite, "
                                         r"got \{'cardiac': \['b3-i1200-shared', 'b3-i600-shared'\]\}"):
        report.render_summary(results.load(FIXTURE))


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


def test_per_class_table_for_acdc_like_results(tmp_path):
    """RV / MYO / LV each get Dice % and HD95 per method (mean ± std over seeds); one-class suites get none."""
    import shutil

    base = FIXTURE / "cardiac" / "b3-i600-shared"
    for method, seed, dice in (("supervised", 0, (0.8, 0.6, 0.9)), ("supervised", 1, (0.6, 0.4, 0.7)),
                               ("bcp", 0, (0.9, 0.7, 1.0))):
        folder = tmp_path / "acdc" / "b3-i600-shared" / method / f"seed{seed}"
        shutil.copytree(base / "supervised" / "seed0", folder)
        lines = ["case,class,unit,dice,jaccard,hd95,asd"]
        for case in ("p1", "p2"):
            lines += [f"{case},{c},mm,{d},0.5,{3.0 + i},1.0" for i, (c, d) in enumerate(zip(("RV", "MYO", "LV"), dice))]
        (folder / "test_cases.csv").write_text("\n".join(lines) + "\n")
    rows = results.load(tmp_path)
    text = report.render_per_class(rows)
    assert "| method | seeds | RV Dice % | MYO Dice % | LV Dice % | RV HD95 mm | MYO HD95 mm | LV HD95 mm |" in text
    assert "| bcp | 1 | 90.00 ± - | 70.00 ± - | 100.00 ± - | 3.00 ± - | 4.00 ± - | 5.00 ± - |" in text
    sup = next(line for line in text.splitlines() if line.startswith("| supervised"))
    assert sup.split(" | ")[2] == "70.00 ± 14.14"  # RV: 80 and 60 over two seeds, ddof 1
    table = report.render_all(tmp_path, docs="d")[Path("d/acdc-b3-i600-shared.md")]
    assert table.endswith(text) and table.startswith("**acdc**")
    assert report.render_per_class(results.load(FIXTURE)) == ""  # one foreground class
