"""Bad command lines of ``minissl train``: one clear line naming the option and what was expected,
exit status 2, no traceback, and no run folder left behind."""
import pytest
import torch

from minissl import cli

BAD = [
    (["--ema_decay", "2"], r"--ema_decay: expected a number in [0, 1], got 2.0"),
    (["--cons_weight", "-1"], r"--cons_weight: expected a finite number >= 0, got -1.0"),
    (["--lr", "nan"], r"--lr: expected a finite number > 0, got nan"),
    (["--lr", "0"], r"--lr: expected a finite number > 0, got 0.0"),
    (["--log_every", "0"], r"--log_every: expected a positive integer, got 0"),
    (["--depth", "7"], r"--depth: expected at most 5 down-samplings for the patch size (32, 32)"),
    (["--seed", "-1"], r"--seed: expected an integer in [0, 2**32), got -1"),
    (["--method_args", "5"], r'--method_args: expected a mapping such as {"threshold": 0.9}, got 5'),
    (["--device", "tpu"], "--device: expected a torch device (\"cpu\", \"cuda\", \"cuda:1\", \"mps\"), got 'tpu'"),
    (["--run_name", "../x"], r"--run_name: expected a folder name inside out_dir (relative, without '..'), got '../x'"),
    (["--run_name", "/tmp/elsewhere"], r"--run_name: expected a folder name inside out_dir"),
    (["--max_iters", "2.5"], r"--max_iters: expected an integer, got '2.5'"),
    (["--max_iters", "0"], r"--max_iters: expected a positive integer, got 0"),
    (["--lrr", "0.1"], r"unknown option --lrr for method 'supervised' (did you mean --lr?)"),
    (["--method", "mean_teacher", "--noise_std", "abc"], r"method 'mean_teacher': --noise_std: expected a number, got 'abc'"),
    (["--method", "mean_teacher", "--noise_std", "nan"], r"method 'mean_teacher': --noise_std: expected a finite number"),
    (["--method", "mean_teacher", "--noise_sdt", "0.2"], r"unknown option --noise_sdt for method 'mean_teacher' (did you mean --noise_std, --noise_clip?)"),
    (["--labeled_bs", "9"], r"--labeled_bs: expected 0 < labeled_bs <= batch_size=8, got 9"),
    (["--lr_schedule", "step"], r"--lr_schedule: expected one of poly, cosine, constant, got 'step'"),
    (["--momentum", "1"], r"--momentum: expected a number in [0, 1), got 1.0"),
    (["--weight_decay", "-0.1"], r"--weight_decay: expected a finite number >= 0, got -0.1"),
    (["--budget", "0"], r"--budget: expected at least 1 labeled case, got 0"),
    (["--rampup", "1.5"], r"--rampup: expected a fraction of max_iters in [0, 1], got 1.5"),
    (["--val_every", "0"], r"--val_every: expected a positive integer (or none), got 0"),
    (["--resume", "maybe"], r"--resume: expected a boolean (true/false), got 'maybe'"),
    (["--resume_override", "lr"], r"--resume_override: expected comma-separated names among val_every, log_every"),
    (["--width", "0"], r"--width: expected a positive integer (channels), got 0"),
    (["--batch_size", "true"], r"--batch_size: expected an integer, got 'true'"),
    (["--method", "nope"], r"unknown method 'nope': expected one of"),
    (["--budget", "99"], r"budget"),
    (["--config", "missing.yaml"], r"config file missing.yaml does not exist"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_train_option_is_one_clear_line(argv, match, tiny_stores, tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli.main(["train", "--data_root", str(tiny_stores["fetal_head"]), "--out_dir", str(out),
                     "--progress", "false", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("minissl train: error: ") and match in err, err
    assert not out.exists()  # nothing was created


@pytest.mark.parametrize("text, match", [
    ("lr: 0.1\nmax_iters: [1\nseed: 2\n", "not valid YAML at line 3"),
    ('max_iters: "abc"\n', "max_iters: expected an integer, got 'abc'"),
    ("lr: [0.1]\n", "lr: expected a number, got [0.1]"),
    ("- lr\n", "expected a mapping of field -> value, got list"),
    ("method_args: 3\n", 'method_args: expected a mapping such as {"threshold": 0.9}, got 3'),
])
def test_bad_config_file_names_the_file(text, match, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    out = tmp_path / "runs"
    assert cli.main(["train", "--config", str(path), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}" in err and match in err and "Traceback" not in err, err
    assert not out.exists()


def test_cuda_without_cuda_is_refused_before_anything(tiny_stores, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "runs"
    assert cli.main(["train", "--data_root", str(tiny_stores["fetal_head"]), "--out_dir", str(out),
                     "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch build has no CUDA" in err or "--device cuda: no CUDA GPU is visible" in err
    assert "expected --device cpu" in err
    assert not out.exists()


def test_unknown_command_names_it_and_the_closest(capsys):
    assert cli.main(["tran"]) == 2
    err = capsys.readouterr().err
    assert ("unknown command 'tran'; expected one of demo, train, eval, predict, data, methods, bench "
            "(did you mean train?)") in err


def test_train_help_lists_every_option_with_default_and_comment(capsys):
    from dataclasses import fields

    from minissl.config import Config

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    for f in fields(Config):
        assert f"--{f.name}" in lines, f.name
    assert lines["--lr"].split()[1:4] == ["FLOAT", "0.01", "initial"]
    assert "--noise_std" not in lines


def test_train_help_of_a_method_adds_its_options(capsys):
    assert cli.main(["train", "--method", "bcp", "--help"]) == 0
    out = capsys.readouterr().out
    assert "options of method 'bcp':" in out
    line = next(l for l in out.splitlines() if l.startswith("  --u_weight"))
    assert line.split()[1:3] == ["FLOAT", "0.5"] and "pseudo-labelled region" in line
    assert "--lr " in out  # the Config options are listed too


def test_misspelled_option_of_eval_names_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", str(tmp_path), "--splt", "val"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --splt val (did you mean --split?)" in capsys.readouterr().err
