import json

import pytest

from minissl import cli
from minissl.methods import METHODS


def test_methods_lists_the_registry(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == sorted(METHODS)


def test_overrides_aliases_and_bare_flags():
    assert cli._overrides(["--iters", "300", "--resume", "--lr=0.1"]) == \
        ["--max_iters", "300", "--resume", "true", "--lr", "0.1"]


def test_train_then_eval(tiny_stores, tmp_path, capsys):
    args = ["train", "--method", "mean_teacher", "--data_root", str(tiny_stores["cardiac"]), "--iters", "4",
            "--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--out_dir", str(tmp_path),
            "--run_name", "r", "--progress", "false"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "best validation Dice" in out and "mean_teacher" in out
    per_class = json.loads((tmp_path / "r" / "metrics.json").read_text())["test_per_class"]
    assert sorted(per_class) == ["LV", "MYO", "RV"] and set(per_class["RV"]) == {"dice", "jaccard", "hd95", "asd"}
    assert cli.main(["eval", str(tmp_path / "r"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "dice:" in out and "per class" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["RV", "MYO", "LV"]
    rows = json.loads((tmp_path / "r" / "eval_val.json").read_text())["rows"]
    assert len(rows) == 2 * 3  # 2 validation cases x 3 foreground classes


@pytest.mark.parametrize("argv, match", [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--suite", "nope"], "unknown suite 'nope'"),
    (["train", "--lr_schedule", "x"], "lr_schedule: expected one of"),
])
def test_bad_input_is_one_clear_line(argv, match, capsys, tmp_path):
    assert cli.main(argv + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err and "Traceback" not in err


def test_data_make(tmp_path, capsys):
    assert cli.main(["data", "make", "fetal_head", "--root", str(tmp_path / "fh")]) == 0
    assert (tmp_path / "fh" / "suite.json").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "fh")


def test_bench_subcommand_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "methods", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: minissl bench methods" in out and "--seeds" in out and "--results" in out
