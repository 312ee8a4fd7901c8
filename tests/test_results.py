import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from minissl import engine, results
from minissl.config import load_config
from minissl.run import Run

FIXTURE = Path(__file__).parent / "data" / "results_fixture"


def test_load_reads_the_path_and_the_metrics():
    rows = results.load(FIXTURE)
    assert len(rows) == 14
    mt0 = next(r for r in rows if r.method == "mean_teacher" and r.seed == 0)
    assert (mt0.suite, mt0.budget, mt0.iters, mt0.recipe) == ("cardiac", 3, 600, "shared")
    assert mt0.setting == "b3-i600-shared" and mt0.method == "mean_teacher" and mt0.seed == 0
    assert mt0.dice == pytest.approx(73.0) and (mt0.hd95, mt0.hd95_unit) == (4.0, "px")
    assert mt0.cpu_s_per_iter == 0.2 and mt0.peak_rss_mb is None
    sup = {r.seed: r.peak_rss_mb for r in rows if r.method == "supervised" and r.iters == 600}
    assert sup == {0: 100, 1: 120, 2: None}  # seed 2's metrics do not name the baseline: not comparable


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


def test_provenance_keeps_the_commit_the_process_started_from(monkeypatch):
    """A leaderboard that runs while HEAD moves on labels its runs with the code they imported."""
    heads = iter(["a" * 40, "", "b" * 40, " M minissl/engine.py"])
    monkeypatch.setattr(results, "_git", lambda *args: next(heads))
    results.code_state.cache_clear()
    try:
        assert results.code_state() == ("a" * 40, "")  # first call: read from git
        first = results.provenance()
        assert (first["commit"], first["uncommitted_changes"]) == ("a" * 40, False)
        assert results.provenance()["commit"] == "a" * 40  # git is not asked again
        assert next(heads) == "b" * 40
    finally:
        results.code_state.cache_clear()


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


def test_sparse_slice_budgets_get_their_own_setting(tmp_path):
    assert results.setting_name(4, 600) == "b4-i600-shared"
    assert results.setting_name(4, 600, "shared", "slices:3") == "b4s3-i600-shared"
    src = FIXTURE / "cardiac" / "b3-i600-shared" / "supervised" / "seed0"
    shutil.copytree(src, tmp_path / "cardiac" / "b3s2-i600-shared" / "supervised" / "seed0")
    shutil.copytree(src, tmp_path / "cardiac" / "b3-i600-shared" / "supervised" / "seed0")
    rows = sorted(results.load(tmp_path), key=lambda r: r.setting)
    assert [(r.setting, r.budget, r.budget_kind) for r in rows] == [("b3-i600-shared", 3, "cases"),
                                                                   ("b3s2-i600-shared", 3, "slices:2")]
    assert results.result_dir(tmp_path, "cardiac", 3, 600, "supervised", 0, "shared", "slices:2") == \
        rows[1].path
    from minissl import report
    tables = report.render_all(tmp_path, docs="d")
    assert "3 labeled (one slice in 2 annotated), 600 iterations" in tables[Path("d/cardiac-b3s2-i600-shared.md")]
