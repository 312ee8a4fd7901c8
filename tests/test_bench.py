import pytest

from minissl import bench, engine


def test_table_mean_std_over_seeds():
    runs = [bench.BenchRun("mt", s, 4, d, h, None, 0.1) for s, (d, h) in enumerate([(80.0, 2.0), (90.0, 4.0)])]
    text = bench.table(runs)
    assert "| mt | 4 | 2 | 85.00 ± 5.00 | - | 3.00 ± 1.00 | 0.100 |" in text
    assert "HC err" not in text and "wall s/iter" in text  # runs without CPU time: wall time, said so
    runs = [bench.BenchRun("mt", s, 4, 80.0, 2.0, None, 0.5, cpu) for s, cpu in enumerate([0.1, 0.3])]
    assert "| mt | 4 | 2 | 80.00 ± 0.00 | - | 2.00 ± 0.00 | 0.200 |" in bench.table(runs)
    assert "CPU s/iter" in bench.table(runs)


def test_table_gain_is_paired_by_seed_and_budget():
    runs = [bench.BenchRun("supervised", s, 4, d, 1.0, None, 0.1) for s, d in enumerate([60.0, 80.0])]
    runs += [bench.BenchRun("mt", s, 4, d, 1.0, None, 0.1) for s, d in enumerate([64.0, 78.0])]
    runs += [bench.BenchRun("mt", 0, 8, 99.0, 1.0, None, 0.1)]  # no supervised run at budget 8
    text = bench.table(runs)
    assert "| mt | 4 | 2 | 71.00 ± 7.00 | +1.00 ± 3.00 (1/2) |" in text  # +4 and -2, not 71 - 70
    assert "| mt | 8 | 1 | 99.00 ± 0.00 | - |" in text
    assert "| supervised | 4 | 2 | 70.00 ± 10.00 | - |" in text


def test_run_is_read_back_not_retrained(tiny_stores, tmp_path, monkeypatch):
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "2"]
    first = bench.run_one("fetal_head", "supervised", 0, None, 2, tmp_path, str(tiny_stores["fetal_head"]), over)
    assert (tmp_path / "fetal_head" / "supervised-b2-s0" / "metrics.json").is_file()

    def no_training(cfg):
        raise AssertionError("a finished run must be read back")

    monkeypatch.setattr(engine, "train", no_training)
    again = bench.run_one("fetal_head", "supervised", 0, None, 2, tmp_path, str(tiny_stores["fetal_head"]), over)
    assert again == first and first.hc_error_mm is not None
    assert 0 < first.cpu_s_per_iter and 0 < first.s_per_iter
