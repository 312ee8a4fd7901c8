import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from minissl import engine, results
from minissl.config import load_config
from minissl.run import Run

FIXTURE = Path(__file__).parent / "data" / "results_fixture"
FOOT = ("Mean ± std (ddof 1) over seeds of each run's test mean over cases. Δ: Dice of the method minus supervised "
        "with the same seed; Student-t 95 % interval with n - 1 degrees of freedom; ahead or behind only when the "
        "interval excludes 0. Peak MB: peak RSS of the run minus RSS once the model is built.")

# Fixture (Dice of seeds 0, 1, 2): supervised 70, 68, 72; mean_teacher 73, 73, 75 (paired +3, +5, +3);
# cps 66, 69, 70 (-4, +1, -2); ua_mt 60, 62, 61 (-10, -6, -11); bcp seed 0 only: 80 (+10).
# Half-width t_{0.975,2} * s / sqrt(3) with t_{0.975,2} = 4.3027: mean_teacher s = 1.1547 -> 2.868,
# cps s = 2.5166 -> 6.252, ua_mt s = 2.6458 -> 6.572.
EXPECTED = """**cardiac**: 3 labeled, 600 iterations, shared recipe

| method | seeds | Dice % | HD95 px | Δ Dice vs supervised (paired seeds) | 95 % interval | mark \
| CPU s/iter | peak MB |
|---|---|---|---|---|---|---|---|---|
| supervised | 3 | 70.00 ± 2.00 | 6.00 ± 1.00 | - | - | - | 0.100 | 110 |
| bcp | 1 | 80.00 ± - | 3.00 ± - | +10.00 (1) | undefined (1 seed) | inconclusive | 0.400 | - |
| cps | 3 | 68.33 ± 2.08 | 8.00 ± 0.00 | -1.67 (3) | [-7.92, +4.58] | inconclusive | 0.300 | - |
| mean_teacher | 3 | 73.67 ± 1.15 | 4.00 ± 0.00 | +3.67 (3) | [+0.80, +6.54] | ahead | 0.200 | - |
| ua_mt | 3 | 61.00 ± 1.00 | 9.00 ± 0.00 | -9.00 (3) | [-15.57, -2.43] | behind | 0.200 | - |

""" + FOOT + "\nNot applicable to cardiac: ersr, m3hl.\n"


def test_render_leaderboard_from_the_fixture():
    rows = [r for r in results.load(FIXTURE) if r.iters == 600]
    assert results.render_leaderboard(rows, not_applicable=["m3hl", "ersr"]) == EXPECTED


def test_render_all_gives_one_table_per_setting():
    tables = results.render_all(FIXTURE, docs="docs/results", not_applicable={"cardiac": ["m3hl", "ersr"]})
    assert sorted(map(str, tables)) == ["docs/results/cardiac-b3-i1200-shared.md",
                                        "docs/results/cardiac-b3-i600-shared.md"]
    assert tables[Path("docs/results/cardiac-b3-i600-shared.md")] == EXPECTED
    longer = tables[Path("docs/results/cardiac-b3-i1200-shared.md")]
    assert "| supervised | 1 | 75.00 ± - | 4.00 ± - | - | - | - | 0.100 | 100 |" in longer


def test_load_reads_the_path_and_the_metrics():
    rows = results.load(FIXTURE)
    assert len(rows) == 14
    mt0 = next(r for r in rows if r.method == "mean_teacher" and r.seed == 0)
    assert (mt0.suite, mt0.budget, mt0.iters, mt0.recipe) == ("cardiac", 3, 600, "shared")
    assert mt0.setting == "b3-i600-shared" and mt0.method == "mean_teacher" and mt0.seed == 0
    assert mt0.dice == pytest.approx(73.0) and (mt0.hd95, mt0.hd95_unit) == (4.0, "px")
    assert mt0.cpu_s_per_iter == 0.2 and mt0.peak_rss_mb is None


def test_render_refuses_mixed_settings_and_nothing():
    with pytest.raises(ValueError, match=r"expected rows of one suite and setting, got "
                                         r"\[\('cardiac', 'b3-i1200-shared'\), \('cardiac', 'b3-i600-shared'\)\]"):
        results.render_leaderboard(results.load(FIXTURE))
    with pytest.raises(ValueError, match="expected at least one result row, got none"):
        results.render_leaderboard([])


def test_an_incomplete_folder_is_missing_and_refused_by_load(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    assert results.missing(root, "cardiac", ["supervised", "bcp"], [0, 1], 3, 600) == [("bcp", 1)]
    (root / "cardiac" / "b3-i600-shared" / "cps" / "seed2" / "val_curve.csv").unlink()
    assert results.missing(root, "cardiac", ["cps"], [0, 1, 2], 3, 600) == [("cps", 2)]
    assert results.missing(root, "cardiac", ["cps"], [0], 3, 1200) == [("cps", 0)]  # another setting
    with pytest.raises(ValueError, match=r"cps/seed2: incomplete result folder, missing \['val_curve.csv'\]"):
        results.load(root)


@pytest.fixture(scope="module")
def finished_run(tiny_stores, tmp_path_factory) -> Run:
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "1"]
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(overrides=over, method="supervised", data_root=str(tiny_stores["fetal_head"]), max_iters=2,
                      out_dir=str(out), run_name="r", progress=False)
    engine.train(cfg)
    return Run(out / "r")


def test_record_writes_the_small_files_and_load_reads_them_back(finished_run, tmp_path):
    folder = results.record(finished_run, tmp_path / "results")
    saved = finished_run.saved
    assert folder == tmp_path / "results" / "fetal_head" / f"b{saved['budget']}-i2-shared" / "supervised" / "seed0"
    assert sorted(p.name for p in folder.iterdir()) == sorted(results.FILES)  # no checkpoints
    assert json.loads((folder / "config.json").read_text()) == saved
    assert json.loads((folder / "metrics.json").read_text()) == finished_run.metrics
    assert (folder / "test_cases.csv").read_text() == (finished_run.path / "test_cases.csv").read_text()
    with open(folder / "val_curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [1, 2]
    logged = [r["val_dice"] for r in finished_run.log if r.get("val_dice") is not None]
    assert [float(r["val_dice"]) for r in curve] == logged
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["torch"] == torch.__version__ and prov["threads"] == torch.get_num_threads()
    if (Path(results.__file__).parent.parent / ".git").exists():  # the package is a git checkout
        assert len(prov["commit"]) == 40 and isinstance(prov["uncommitted_changes"], bool)
    else:
        assert prov["commit"] == "unknown" and prov["uncommitted_changes"] is None
    assert prov["cpu"] and prov["date"].endswith("+00:00")
    (row,) = results.load(tmp_path / "results")
    assert row.dice == pytest.approx(100 * finished_run.metrics["test"]["dice"]["mean"])
    assert row.hc_error_mm == pytest.approx(finished_run.metrics["test"]["hc_error_mm"]["mean"])
    todo = results.missing(tmp_path / "results", "fetal_head", ["supervised"], [0, 1], saved["budget"], 2)
    assert todo == [("supervised", 1)]


def test_record_replaces_a_rerun_and_refuses_another_configuration(finished_run, tmp_path):
    root = tmp_path / "results"
    folder = results.record(finished_run, root)
    (folder / "val_curve.csv").write_text("step,val_dice\n")
    assert results.record(finished_run, root) == folder  # same configuration: replaced
    assert (folder / "val_curve.csv").read_text().count("\n") == 3
    config = json.loads((folder / "config.json").read_text())
    config["width"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"already holds a result with another configuration "
                                         r"\(fields \['width'\] differ"):
        results.record(finished_run, root)
    ablation = results.record(finished_run, root, name="supervised-w4")
    assert ablation.parent.name == "supervised-w4" and results.is_complete(ablation)
    assert not list(folder.parent.parent.glob(".*"))  # no temporary folder left


def test_record_refuses_an_unfinished_run(tmp_path):
    run = Run.create(tmp_path / "run", load_config())
    with pytest.raises(ValueError, match="metrics.json not found: the run has not finished"):
        results.record(run, tmp_path / "results")


def test_render_summary_is_method_by_suite():
    rows = [r for r in results.load(FIXTURE) if r.iters == 600]
    rows += [dataclasses.replace(r, suite="atrium", budget=4, dice=r.dice + 1) for r in rows
             if r.method in ("supervised", "mean_teacher")]
    assert results.render_summary(rows) == """| method | atrium (b4-i600-shared) | cardiac (b3-i600-shared) |
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
        results.render_summary(results.load(FIXTURE))
