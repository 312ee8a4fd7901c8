import json
import shutil
from pathlib import Path

import pytest

from minissl import bench, cli, engine, results
from minissl.config import load_config
from minissl.methods import get_method
from minissl.run import Run

FIXTURE = Path(__file__).parent / "data" / "results_fixture"


def test_run_is_recorded_and_read_back_not_retrained(tiny_stores, tmp_path, monkeypatch):
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "2"]
    store, runs, res = str(tiny_stores["fetal_head"]), tmp_path / "runs", tmp_path / "results"
    first = bench.run_one("fetal_head", "supervised", 0, None, 2, runs, store, over, results=res)
    assert (runs / "fetal_head" / "supervised-b2-i2-shared-s0" / "metrics.json").is_file()
    assert first.path == res / "fetal_head" / "b2-i2-shared" / "supervised" / "seed0"
    assert results.is_complete(first.path) and first.hc_error_mm is not None and 0 < first.cpu_s_per_iter
    assert first.peak_rss_mb is not None and first.peak_rss_mb >= 0  # the leaderboard's peak-memory column

    def no_training(cfg, **kw):
        raise AssertionError("a finished run must be read back")

    monkeypatch.setattr(engine, "train", no_training)
    (first.path / "val_curve.csv").unlink()  # an incomplete result is recorded again from the finished run
    assert bench.run_one("fetal_head", "supervised", 0, None, 2, runs, store, over, results=res) == first
    shutil.rmtree(runs)  # another machine: the committed results are enough
    assert bench.run_one("fetal_head", "supervised", 0, None, 2, runs, store, over, results=res) == first
    other = r"seed0 holds a result with another configuration \(fields \['width'\] differ\)"
    with pytest.raises(ValueError, match=other):  # a complete result is reused only for the same options
        bench.run_one("fetal_head", "supervised", 0, None, 2, runs, store, over + ["--width", "8"], results=res)
    text = bench.bench_methods("fetal_head", ["supervised"], [0], None, 2, str(runs), store, over, str(res))
    assert "| supervised | 1 | " in text and "**fetal_head**: 2 labeled, 2 iterations, shared recipe" in text
    monkeypatch.undo()  # another length in the same run folder: trained as its own run, not read back
    longer = bench.run_one("fetal_head", "supervised", 0, None, 4, runs, store, over, results=res)
    assert longer.iters == 4 and longer.path.parent.parent.name == "b2-i4-shared"
    assert Run(runs / "fetal_head" / "supervised-b2-i4-shared-s0").metrics["best_step"] in (2, 4)


def test_sparse_slice_budget_runs_in_their_own_setting(tiny_stores, tmp_path):
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "2"]
    store, runs, res = str(tiny_stores["cardiac"]), tmp_path / "runs", tmp_path / "results"
    text = bench.bench_methods("cardiac", ["supervised"], [0], None, 2, str(runs), store,
                               over + ["--budget_kind", "slices:2"], str(res))
    (row,) = results.load(res)
    assert row.budget_kind == "slices:2" and row.path.parent.parent.name.endswith("s2-i2-shared")
    assert "labeled (one slice in 2 annotated), 2 iterations" in text
    dense = bench.run_one("cardiac", "supervised", 0, None, 2, runs, store, over, results=res)  # not read back
    assert dense.budget_kind == "cases" and dense.path != row.path


def test_a_tagged_ablation_keeps_its_options_off_the_baseline(tiny_stores, tmp_path, capsys):
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "2"]
    store, runs, res = str(tiny_stores["cardiac"]), tmp_path / "runs", tmp_path / "results"
    argv = ["bench", "methods", "--suite", "cardiac", "--data_root", store, "--methods", "supervised,mean_teacher",
            "--seeds", "0", "--iters", "2", "--out", str(runs), "--results", str(res), *over]
    assert cli.main(argv) == 0  # the baseline and the method as they are
    # the ablation: supervised is read back (its config unchanged), mean_teacher trained again under a new name
    assert cli.main(argv + ["--tag", "ema0.9", "--tag_options=--ema_decay 0.9"]) == 0
    rows = {r.method: r for r in results.load(res)}
    assert sorted(rows) == ["mean_teacher", "mean_teacher+ema0.9", "supervised"]
    assert len({r.setting for r in rows.values()}) == 1  # one table
    config = {m: json.loads((r.path / "config.json").read_text()) for m, r in rows.items()}
    assert config["mean_teacher+ema0.9"]["ema_decay"] == 0.9
    assert config["mean_teacher"]["ema_decay"] is None and config["supervised"]["ema_decay"] is None
    assert (runs / "cardiac" / f"mean_teacher+ema0.9-{rows['supervised'].setting}-s0" / "metrics.json").is_file()
    assert "| mean_teacher+ema0.9 | 1 | " in capsys.readouterr().out
    with pytest.raises(ValueError, match="--tag: expected letters, digits and . _ = -, got 'a/b'"):
        bench.bench_methods("cardiac", ["mean_teacher"], [0], None, 2, str(runs), store, over, str(res), tag="a/b")


def test_bench_render_writes_and_checks_the_tables(tmp_path, capsys):
    docs = tmp_path / "docs"
    argv = ["bench", "render", "--results", str(FIXTURE), "--docs", str(docs)]
    assert cli.main(argv + ["--check"]) == 1  # nothing written yet
    assert cli.main(argv) == 0
    assert sorted(p.name for p in docs.iterdir()) == ["cardiac-b3-i1200-shared.md", "cardiac-b3-i600-shared.md"]
    assert cli.main(argv + ["--check"]) == 0
    table = docs / "cardiac-b3-i600-shared.md"
    table.write_text(table.read_text().replace("ahead", "behind"))
    capsys.readouterr()
    assert cli.main(argv + ["--check"]) == 1
    assert f"differs from its rendering: {table}" in capsys.readouterr().out


def test_bench_render_summary_prints_the_compact_table_of_the_named_settings(capsys, tmp_path):
    from minissl import report

    rows = [r for r in results.load(FIXTURE) if r.setting == "b3-i600-shared"]
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    setting = root / "cardiac" / "b3-i600-shared"
    shutil.copytree(setting / "mean_teacher", setting / "mean_teacher+x")  # an ablation: not in the summary
    argv = ["bench", "render", "--results", str(root), "--summary", "cardiac:b3-i600-shared"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == report.render_summary(rows)
    assert "| mean_teacher | " in report.render_summary(rows)
    with pytest.raises(ValueError, match=r"found none for \['cardiac:b3-i999-shared'\]"):
        bench.summary(["cardiac:b3-i600-shared", "cardiac:b3-i999-shared"], FIXTURE)
    with pytest.raises(ValueError, match=r"expected items <suite>:<setting>.*got \['cardiac'\]"):
        bench.summary(["cardiac"], FIXTURE)


def test_budget_all_counts_only_training_patients_with_labels(tiny_stores, tmp_path):
    import h5py

    from minissl.data.sources import open_data

    root = tmp_path / "store"
    shutil.copytree(tiny_stores["fetal_head"], root)
    train = open_data(root).split("train")
    with h5py.File(root / "cases" / f"{train[0]}.h5", "a") as f:  # an unlabeled-only training case
        del f["label"]
    assert bench.all_labels_budget(open_data(root)) == len(train) - 1


def test_methods_that_do_not_apply_are_named_not_run():
    from minissl.bench import not_applicable
    from minissl.data.phantoms import SUITES

    cardiac, fetal = not_applicable(SUITES["cardiac"]), not_applicable(SUITES["fetal_head"])
    assert "ersr" in cardiac and "2D binary suite" in cardiac["ersr"]
    assert "ersr" not in fetal and "supervised" not in cardiac
    with pytest.raises(ValueError, match="ersr: does not apply to suite 'cardiac': expected a 2D binary suite"):
        get_method("ersr")(load_config(method="ersr", max_iters=10), SUITES["cardiac"])
