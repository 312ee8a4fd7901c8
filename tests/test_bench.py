from minissl import bench, engine


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
