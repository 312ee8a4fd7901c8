import json

import numpy as np
import pytest
import torch

from minissl import cli
from minissl.data.sources import open_data
from minissl.data.store import read_case
from minissl.methods import METHODS, Method
from minissl.run import Run


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



class EntropyMethod(Method):
    """A supervised method whose uncertainty is the predictive entropy of its student."""

    semi_supervised = False
    has_uncertainty = True

    def training_step(self, batch, step):
        sup = self.supervised_loss(self.student(batch["x_l"]), batch["y_l"])
        return {"loss": sup, "sup": sup}

    @torch.no_grad()
    def uncertainty(self, x):
        p = torch.softmax(self.student(x), dim=1)  # (B, C, *S)
        return -(p * p.clamp_min(1e-12).log()).sum(1)  # (B, *S)


def test_eval_saves_uncertainty_maps_beside_the_predictions(tiny_stores, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "entropy_toy", EntropyMethod)
    monkeypatch.setattr(EntropyMethod, "name", "entropy_toy")
    common = ["--data_root", str(tiny_stores["cardiac"]), "--iters", "2", "--width", "4", "--depth", "2",
              "--out_dir", str(tmp_path), "--progress", "false"]
    assert cli.main(["train", "--method", "entropy_toy", "--run_name", "u"] + common) == 0
    assert cli.main(["eval", str(tmp_path / "u"), "--split", "val", "--save-uncertainty"]) == 0
    assert f"predictions and uncertainty maps: {tmp_path / 'u' / 'eval_val'}" in capsys.readouterr().out
    method = Run(tmp_path / "u").load_method()
    store = open_data(tiny_stores["cardiac"])
    for cid in store.split("val"):
        case = store.read(cid)  # (Z, 32, 32) volume, slices at the patch size: no resampling
        pred, unc = (read_case(tmp_path / "u" / "eval_val" / f"{cid}{end}.h5") for end in ("", "_uncertainty"))
        x = torch.as_tensor(case.image)[:, None]  # (Z, 1, 32, 32)
        assert np.array_equal(pred.label, method.predict(x).argmax(1).numpy())
        np.testing.assert_allclose(unc.image, method.uncertainty(x).numpy(), atol=1e-5)
        assert unc.image.shape == case.image.shape and unc.spacing == case.spacing and unc.image.max() > 0
    assert cli.main(["train", "--method", "supervised", "--run_name", "s"] + common) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "s"), "--save-uncertainty"]) == 2
    err = capsys.readouterr().err
    assert "--save-uncertainty: method 'supervised' of" in err and "has no uncertainty map; methods with one: " in err
    assert "entropy_toy" in err.split("methods with one: ")[1]
    assert not (tmp_path / "s" / "eval_test").exists()

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
