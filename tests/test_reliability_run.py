"""Reliability of the run folder: crafted checkpoints never run code, failed writes leave nothing
behind, a changed config never resumes silently."""
import errno
import os

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
