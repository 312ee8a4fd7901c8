"""minissl.ops._build: cache key, build folder, stale-lock detection, env switches and fallback."""
import os
import time
import warnings

import pytest
import torch

from minissl.ops import _build


@pytest.fixture
def fresh_state(monkeypatch):
    """A build state as in a new process (restored afterwards, so the real extension stays loaded)."""
    monkeypatch.setattr(_build, "_state", {"tried": False, "path": None, "error": None, "seconds": None,
                                           "build_dir": None})
    monkeypatch.delenv("MINISSL_NO_EXT", raising=False)
    monkeypatch.delenv("MINISSL_REQUIRE_EXT", raising=False)


def test_sources_are_the_existing_files(monkeypatch):
    names = [p.relative_to(_build.CSRC).as_posix() for p in _build.sources(cuda=False)]
    assert names[:2] == ["ops.cpp", "cpu/dense.cpp"] and not any(n.startswith("cuda/") for n in names)
    monkeypatch.setattr(_build, "CPU_SOURCES", ("ops.cpp", "cpu/not_written_yet.cpp"))
    assert [p.name for p in _build.sources(cuda=False)] == ["ops.cpp"]
    flags = _build.build_flags()
    assert {"-O3", "-fopenmp"} <= set(flags["cflags"]) and "-fopenmp" in flags["ldflags"]


def test_cache_key_follows_sources_and_flags(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    flags = _build.build_flags()
    key = _build.cache_key([src], flags)
    assert key == _build.cache_key([src], flags)
    assert key != _build.cache_key([src], {**flags, "cflags": flags["cflags"] + ["-DX"]})
    src.write_text("int f() { return 2; }\n")
    assert key != _build.cache_key([src], flags)


def test_build_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _build.build_directory("abc123", cuda=False)
    assert folder.parent == tmp_path and folder.name == f"minissl-{torch.__version__.split('+')[0]}-cpu-abc123"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert ".cache/minissl" in _build.build_directory("abc123", cuda=False).as_posix()


def test_stale_lock_is_reported(tmp_path):
    _build.check_stale_lock(tmp_path)  # no lock: fine
    lock = tmp_path / "lock"
    lock.touch()
    _build.check_stale_lock(tmp_path)  # fresh lock, maybe a build in progress: wait as torch does
    old = time.time() - 2 * _build.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=r"stale build lock .*lock.*Delete it \(`rm "):
        _build.check_stale_lock(tmp_path)
    (tmp_path / "builder.pid").write_text(f"{os.getpid()}\n")  # the builder is alive: not stale
    _build.check_stale_lock(tmp_path)
    lock.touch()
    (tmp_path / "builder.pid").write_text("999999999\n")  # the builder is gone: stale at once
    with pytest.raises(RuntimeError, match="stale build lock"):
        _build.check_stale_lock(tmp_path)


def test_no_ext_forces_reference(fresh_state, monkeypatch):
    monkeypatch.setenv("MINISSL_NO_EXT", "1")
    monkeypatch.setattr(_build, "_build", lambda: pytest.fail("MINISSL_NO_EXT=1 must not build"))
    assert _build.get_kernel("dice_ce_entropy") is None and _build.get_kernel("mix") is None


def test_failed_build_warns_once_and_falls_back(fresh_state, monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'minissl_ext'\ndetails")

    monkeypatch.setattr(_build, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not build the C\\+\\+ kernels .*Error building extension") as rec:
        assert _build.get_kernel("dice_ce_entropy") is None
        assert _build.get_kernel("mix") is None
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1


def test_required_build_failure_raises(fresh_state, monkeypatch):
    monkeypatch.setenv("MINISSL_REQUIRE_EXT", "1")

    def broken():
        raise RuntimeError("Error building extension 'minissl_ext'")

    monkeypatch.setattr(_build, "_build", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="MINISSL_REQUIRE_EXT=1"):
            _build.get_kernel("dice_ce_entropy")
