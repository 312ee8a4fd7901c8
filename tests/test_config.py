import json

import pytest

from minissl.config import Config, load_config, resolve_args
from minissl.methods.mean_teacher import MeanTeacherArgs


def test_defaults_and_cli_overrides_typed():
    cfg = load_config(overrides=["--method", "mean_teacher", "--max_iters", "300", "--lr", "0.02",
                                 "--resume", "true", "--budget", "none"])
    assert (cfg.method, cfg.max_iters, cfg.lr, cfg.resume, cfg.budget) == ("mean_teacher", 300, 0.02, True, None)
    assert Config().lr_schedule == "poly"


def test_file_then_cli_then_kwargs_priority(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: mean_teacher\nmax_iters: 100\nnoise_std: 0.2\n")
    cfg = load_config(str(f), ["--max_iters", "200"], seed=3)
    assert (cfg.method, cfg.max_iters, cfg.seed) == ("mean_teacher", 200, 3)
    assert cfg.method_args == {"noise_std": 0.2}  # unknown keys go to the method
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"method_args": {"noise_clip": 0.3}}))
    assert load_config(str(j), ["--method_args.noise_std", "0.5"]).method_args == {"noise_clip": 0.3, "noise_std": 0.5}


@pytest.mark.parametrize("tokens, match", [
    (["--lr_schedule", "step"], "lr_schedule: expected one of poly, cosine, constant, got 'step'"),
    (["--labeled_bs", "9"], "labeled_bs: expected 0 < labeled_bs <= batch_size=8, got 9"),
    (["--max_iters", "0"], "max_iters: expected a positive integer, got 0"),
    (["--rampup", "2"], r"rampup: expected a fraction of max_iters in \[0, 1\], got 2.0"),
    (["--resume", "maybe"], "--resume: expected a boolean"),
    (["--method"], "odd number of tokens"),
])
def test_bad_overrides_are_named(tokens, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=tokens)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_method_args_resolved_and_unknown_rejected():
    args = resolve_args(MeanTeacherArgs, {"noise_std": 1}, "mean_teacher")
    assert args.noise_std == 1.0 and isinstance(args.noise_std, float)
    with pytest.raises(ValueError, match=r"unknown option --thresh for method 'mean_teacher'"):
        resolve_args(MeanTeacherArgs, {"thresh": 0.5}, "mean_teacher")


def test_config_saved_as_json(tmp_path):
    cfg = load_config(method="mean_teacher")
    cfg.to_json(tmp_path / "config.json", {"method_resolved": {"noise_std": 0.1}})
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["method"] == "mean_teacher" and data["method_resolved"] == {"noise_std": 0.1}


def test_published_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(str(path))
        assert cfg.method_args == {}, f"{path.name}: unknown keys {cfg.method_args}"
        assert cfg.max_iters >= 10000 and cfg.device == "cuda"


def test_data_source_is_the_data_root_else_the_suite():
    from minissl.config import Config

    assert Config(suite="cardiac").data_source == "cardiac"
    assert Config(suite="cardiac", data_root="/data/acdc").data_source == "/data/acdc"
