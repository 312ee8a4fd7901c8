"""Reliability of the run folder: crafted checkpoints never run code, failed writes leave nothing
behind, a changed config never resumes silently."""
import errno
import os
from pathlib import Path

import pytest
import torch

from minissl import cli, engine
from minissl.config import load_config
from minissl.run import Run, load_checkpoint, save_checkpoint


class _Payload:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny(root, out, **kw):
    base = dict(data_root=str(root), out_dir=str(out), width=4, depth=2, batch_size=4, labeled_bs=2,
                max_iters=2, val_every=1, log_every=1, progress=False, run_name="r")
    return load_config(**(base | kw))


@pytest.fixture()
def trained(tiny_stores, tmp_path):
    engine.train(_tiny(tiny_stores["fetal_head"], tmp_path / "runs"))
    return tmp_path / "runs" / "r"


def _craft(path, marker):
    torch.save({"method": {}, "step": 1, "evil": _Payload(marker)}, path)


def test_crafted_best_checkpoint_is_refused_by_eval(trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _craft(trained / "best.pt", marker)
    assert cli.main(["eval", str(trained)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {trained / 'best.pt'} holds objects other than tensors and plain data and was refused" in err
    assert not marker.exists()
    with pytest.raises(ValueError, match="was refused"):
        Run(trained).load_method()
    assert not marker.exists()


def test_crafted_last_checkpoint_is_refused_by_resume(trained, tiny_stores, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _craft(trained / "last.pt", marker)
    argv = ["train", "--data_root", str(tiny_stores["fetal_head"]), "--out_dir", str(tmp_path / "runs"),
            "--run_name", "r", "--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2",
            "--max_iters", "2", "--val_every", "1", "--log_every", "1", "--progress", "false", "--resume"]
    assert cli.main(argv) == 2
    assert "last.pt holds objects other than tensors and plain data and was refused" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoints_hold_plain_data_only(trained):
    ckpt = load_checkpoint(trained / "last.pt")  # weights_only=True: would raise on any object
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["run_name"] == "r"
    assert isinstance(ckpt["rng"]["python"], list) and torch.is_tensor(ckpt["rng"]["torch"])


def test_full_disk_leaves_no_temporary_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("minissl.atomic.os.fsync", full)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device"):
        save_checkpoint({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("content, match", [
    (b"", "is not a readable torch checkpoint"),
    (b"not a checkpoint at all", "is not a readable torch checkpoint"),
])
def test_corrupt_checkpoint_is_named(tmp_path, content, match):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'x.pt'} {match}"):
        load_checkpoint(tmp_path / "x.pt")


def test_checkpoint_that_is_not_a_dict_is_named(tmp_path):
    torch.save([1, 2], tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: expected a dict, got list"):
        load_checkpoint(tmp_path / "x.pt")


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(ValueError, match=f"{tmp_path} is not a run folder: expected .*config.json"):
        Run(tmp_path)
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def _resume(root, out, **kw):
    return engine.train(_tiny(root, out, resume=True, **kw))


@pytest.mark.parametrize("change, match", [
    ({"lr": 0.02}, r"lr: 0.01 -> 0.02"),
    ({"max_iters": 4}, r"max_iters: 2 -> 4"),
    ({"cons_weight": 0.5}, r"cons_weight: 0.1 -> 0.5"),
    ({"method": "mean_teacher"}, r"method: 'supervised' -> 'mean_teacher'"),
    ({"val_every": 2}, r"val_every: 1 -> 2\); resume with the same values; to allow val_every pass "
                       r"--resume_override val_every"),
])
def test_resume_with_another_config_is_refused_naming_the_fields(trained, tiny_stores, tmp_path, change, match):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"--resume: the run in .* was trained with another configuration \(.*" + match):
        _resume(tiny_stores["fetal_head"], tmp_path / "runs", **change)
    after = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    assert after == before  # config.json and the checkpoints are untouched


def test_resume_override_allows_a_safe_field(trained, tiny_stores, tmp_path):
    res = _resume(tiny_stores["fetal_head"], tmp_path / "runs", val_every=2, resume_override="val_every")
    assert Run(res.run_dir).config.val_every == 2 and res.best_step >= 1


def test_resume_cannot_override_a_training_field(tiny_stores, tmp_path):
    with pytest.raises(ValueError, match="resume_override: expected comma-separated names among val_every"):
        _resume(tiny_stores["fetal_head"], tmp_path / "runs", lr=0.02, resume_override="lr")


def test_checkpoint_of_another_method_is_a_clear_error(trained, tmp_path):
    from minissl.run import load_state
    from minissl.methods import get_method

    run = Run(trained)
    cfg = load_config(method="cps", max_iters=2, width=4, depth=2)
    other = get_method("cps")(cfg, run.suite_spec())
    with pytest.raises(ValueError, match=f"checkpoint {trained / 'best.pt'} does not fit method 'cps'"):
        load_state(other, run.checkpoint("best.pt"), trained / "best.pt")


KILLER = """
import os, signal, sys
from minissl import engine
from minissl.config import load_config
from minissl.methods import Method

real = Method.update

def update(self, batch, step, optimizers):
    if step == 5:  # after the checkpoint of iteration 4, in the middle of the run
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch, step, optimizers)

Method.update = update
engine.train(load_config(**eval(sys.argv[1])))
"""


def test_resume_after_kill_9_matches_uninterrupted(tiny_stores, tmp_path):
    import subprocess
    import sys

    kw = dict(data_root=str(tiny_stores["cardiac"]), out_dir=str(tmp_path), width=4, depth=2, batch_size=4,
              labeled_bs=2, max_iters=8, val_every=2, log_every=1, progress=False, method="mean_teacher")
    full = engine.train(load_config(**kw, run_name="full"))
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same float rounding as here
                        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, repr(kw | {"run_name": "cut"})], capture_output=True,
                          env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    resumed = engine.train(load_config(**kw, run_name="cut", resume=True))
    a, b = load_checkpoint(full.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert resumed.test == full.test and Run(resumed.run_dir).log == Run(full.run_dir).log


def test_full_disk_during_training_is_one_clear_line(tiny_stores, tmp_path, monkeypatch, capsys):
    real = torch.save

    def full_for_last(obj, f):
        real(obj, f)  # the bytes are written, then the disk is full
        if Path(f.name).name.startswith(".last.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_for_last)
    argv = ["train", "--data_root", str(tiny_stores["fetal_head"]), "--out_dir", str(tmp_path), "--run_name", "r",
            "--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--max_iters", "2",
            "--progress", "false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"minissl train: error: [Errno 28] could not write {tmp_path / 'r' / 'last.pt'}: No space left" in err
    assert not [p.name for p in (tmp_path / "r").iterdir() if ".tmp" in p.name]
