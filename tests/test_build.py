"""minissl.ops._build: sources, cache key, build folder, the build lock, the build announcement, env
switches, fallback, and the wheel shipping the kernel sources and the dataset converters."""
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from minissl import ops
from minissl.ops import _build
from test_data_scripts import HC18_STEMS, write_hc18  # tiny raw HC18 folder

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from minissl.ops._build import build_lock
folder = Path(sys.argv[1])
with build_lock(folder, timeout=5):
    (folder / "lock").touch()  # torch's own baton, as a build killed inside cpp_extension.load leaves it
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def fresh_state(monkeypatch):
    """A build state as in a new process (restored afterwards, so the real extension stays loaded)."""
    monkeypatch.setattr(_build, "_state", {"tried": False, "path": None, "error": None, "seconds": None,
                                           "build_dir": None, "compiled": False})
    monkeypatch.setattr(_build, "_cuda", {"path": None, "why": None, "warned": False})
    monkeypatch.delenv("MINISSL_NO_EXT", raising=False)
    monkeypatch.delenv("MINISSL_REQUIRE_EXT", raising=False)


@pytest.fixture
def tiny_csrc(tmp_path, monkeypatch):
    """A one-file extension source tree (compiles in seconds) in place of csrc/, built under tmp_path."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "ops.cpp").write_text("extern \"C\" int minissl_tiny() { return 1; }\n")
    monkeypatch.setattr(_build, "CSRC", csrc)
    monkeypatch.setattr(_build, "CPU_SOURCES", ("ops.cpp",))
    monkeypatch.setattr(_build, "with_cuda", lambda: False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return csrc


def _start_holder(folder: Path) -> subprocess.Popen:
    """A process that takes the build lock of ``folder`` and keeps it until killed."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_sources_are_the_listed_files():
    names = [p.relative_to(_build.CSRC).as_posix() for p in _build.sources(cuda=False)]
    assert names == list(_build.CPU_SOURCES)
    assert [p.relative_to(_build.CSRC).as_posix() for p in _build.sources(cuda=True)][-3:] == list(_build.CUDA_SOURCES)
    flags = _build.build_flags()
    assert {"-O3", "-fopenmp", "-march=native"} <= set(flags["cflags"]) and "-fopenmp" in flags["ldflags"]


def test_missing_source_is_an_error(monkeypatch):
    monkeypatch.setattr(_build, "CPU_SOURCES", ("ops.cpp", "cpu/not_written.cpp"))
    with pytest.raises(FileNotFoundError, match=r"kernel source\(s\) cpu/not_written.cpp missing in .*csrc"):
        _build.sources(cuda=False)


def test_missing_source_fails_the_build_with_its_name(fresh_state, monkeypatch):
    monkeypatch.setattr(_build, "CPU_SOURCES", ("ops.cpp", "cpu/not_written.cpp"))
    with pytest.warns(RuntimeWarning, match=r"could not build the C\+\+ kernels .*cpu/not_written.cpp missing"):
        assert _build.load() is None
    assert "cpu/not_written.cpp" in ops.kernel_status().error
    monkeypatch.setattr(_build, "_state", {**_build._state, "tried": False})
    monkeypatch.setenv("MINISSL_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="MINISSL_REQUIRE_EXT=1: minissl: kernel source"):
        _build.load()


def test_cache_key_follows_sources_flags_and_cpu(tmp_path, monkeypatch):
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    flags = _build.build_flags()
    key = _build.cache_key([src], flags)
    assert key == _build.cache_key([src], flags)
    assert key != _build.cache_key([src], {**flags, "cflags": flags["cflags"] + ["-DX"]})
    monkeypatch.setattr(_build, "cpu_model", lambda: "x86_64 Another CPU")  # -march=native code differs per CPU
    assert key != _build.cache_key([src], flags)
    monkeypatch.undo()
    src.write_text("int f() { return 2; }\n")
    assert key != _build.cache_key([src], flags)


def test_cpu_model_names_the_machine():
    model = _build.cpu_model()
    assert model.startswith(platform.machine())
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert len(model) > len(platform.machine()) + 1


def test_build_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _build.build_directory("abc123", cuda=False)
    assert folder.parent == tmp_path and folder.name == f"minissl-{torch.__version__.split('+')[0]}-cpu-abc123"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert ".cache/minissl" in _build.build_directory("abc123", cuda=False).as_posix()


def test_lock_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("MINISSL_BUILD_LOCK_TIMEOUT", raising=False)
    assert _build.lock_timeout() == _build.LOCK_TIMEOUT_SECONDS
    monkeypatch.setenv("MINISSL_BUILD_LOCK_TIMEOUT", "2.5")
    assert _build.lock_timeout() == 2.5
    monkeypatch.setenv("MINISSL_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MINISSL_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got 'soon'"):
        _build.lock_timeout()


def test_waiter_times_out_on_a_live_holder_with_the_lock_path(tmp_path, capsys):
    holder = _start_holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"waited 1 s for the kernel build lock {tmp_path}/build.lock "
                                               rf"\(held by pid {holder.pid}.*MINISSL_BUILD_LOCK_TIMEOUT"):
            with _build.build_lock(tmp_path, timeout=1.0):
                pytest.fail("the lock was taken while its holder is alive")
        assert time.monotonic() - start < 10
        assert f"waiting for another process (pid {holder.pid}) to build the kernels" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_waiter_takes_over_when_the_builder_is_killed(tmp_path):
    holder = _start_holder(tmp_path)
    threading.Timer(1.0, os.kill, (holder.pid, signal.SIGKILL)).start()  # killed while we wait
    try:
        with _build.build_lock(tmp_path, timeout=60):
            assert holder.wait(5) == -signal.SIGKILL
            assert not (tmp_path / "lock").exists(), "torch's baton of the killed build must be removed"
            assert (tmp_path / "build.lock").read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_killed_build_recovers_and_announces_only_a_compile(fresh_state, tiny_csrc, capsys):
    folder = _build.build_directory(_build.cache_key(_build.sources(False), _build.build_flags()), cuda=False)
    holder = _start_holder(folder)  # holds the lock and leaves torch's `lock` baton, as a killed build would
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (folder / "lock").exists()
    path = _build._build()  # (load() minus registering the real ops) would wait forever on torch's baton
    assert Path(path).is_file() and _build.build_info()["compiled"]
    err = capsys.readouterr().err
    assert "minissl: compiling the C++ kernels (first use, about 1-2 minutes)..." in err
    assert "minissl: compiled the C++ kernels in " in err and str(folder) in err
    _build._state["compiled"] = False  # as in a new process: a cache hit says nothing
    assert _build._build() == path and not _build.build_info()["compiled"]
    assert capsys.readouterr().err == ""


def test_identical_sources_at_another_path_reuse_the_build(fresh_state, tiny_csrc, tmp_path, monkeypatch, capsys):
    """Another checkout (or virtual environment) of the same sources must not re-compile: torch's loader
    versions a build by its source paths, so minissl compiles a copy kept in the build folder."""
    path = _build._build()
    assert _build.build_info()["compiled"] and (Path(path).parent / "csrc" / "ops.cpp").is_file()
    other = tmp_path / "checkout2" / "csrc"
    shutil.copytree(tiny_csrc, other)
    monkeypatch.setattr(_build, "CSRC", other)
    _build._state["compiled"] = False
    capsys.readouterr()
    assert _build._build() == path and not _build.build_info()["compiled"]
    assert "compiling" not in capsys.readouterr().err


def test_no_ext_forces_reference(fresh_state, monkeypatch):
    monkeypatch.setenv("MINISSL_NO_EXT", "1")
    monkeypatch.setattr(_build, "_build", lambda: pytest.fail("MINISSL_NO_EXT=1 must not build"))
    assert _build.get_kernel("dice_ce_entropy") is None and _build.get_kernel("mix", "cpu") is None
    status = ops.kernel_status()
    assert not status.enabled and status.path is None and status.kernels["mix"] == ()
    before = status.calls["mix"].get("reference", 0)
    ops.mix([torch.zeros(1, 4, 4)], [torch.ones(1, 4, 4)], boxes=torch.tensor([[0, 0, 2, 2]]))
    assert ops.kernel_status().calls["mix"]["reference"] == before + 1
    assert "ops run the reference" in str(ops.kernel_status())


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


def test_wheel_ships_the_kernel_sources_and_the_converters(tmp_path):
    """A regular (non-editable) install gets csrc/ as minissl/_csrc, where _build finds it, and
    data_scripts/ as minissl/_data_scripts, from where ``minissl data prepare`` runs a converter."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "_csrc", "_data_scripts")
    for name in ("minissl", "csrc", "data_scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        if (ROOT / name).is_file():
            (src / name).write_bytes((ROOT / name).read_bytes())
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("minissl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"minissl/_csrc/{p.relative_to(ROOT / 'csrc').as_posix()}" for p in (ROOT / "csrc").rglob("*")
                if p.is_file() and p.suffix in (".cpp", ".cu", ".h")}
    assert {"minissl/_csrc/ops.cpp", "minissl/_csrc/checks.h", "minissl/_csrc/cuda/bindings.cpp"} <= expected
    assert expected <= names, sorted(expected - names)
    assert "minissl/ops/_build.py" in names and "minissl/ops/benchmark.py" in names
    scripts = {f"minissl/_data_scripts/{p.name}" for p in (ROOT / "data_scripts").glob("*.py")}
    assert {"minissl/_data_scripts/_common.py", "minissl/_data_scripts/prepare_hc18.py"} <= scripts <= names
    site = tmp_path / "site"  # the wheel unpacked, away from the source checkout
    zipfile.ZipFile(wheel).extractall(site)
    write_hc18(tmp_path / "raw", HC18_STEMS)
    res = subprocess.run([sys.executable, "-m", "minissl.cli", "data", "prepare", "hc18", str(tmp_path / "raw"),
                          str(tmp_path / "hc18")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site), "MINISSL_NO_EXT": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HC18: 11 annotated images" in res.stdout and (tmp_path / "hc18" / "suite.json").is_file()


def test_failed_cuda_build_keeps_the_cpu_kernels_and_warns_once_why(monkeypatch, tmp_path):
    """Finding 7: one extension held both, so an nvcc failure also disabled the CPU kernels."""
    def broken():
        raise RuntimeError("Error building extension 'minissl_ext_cuda'\nnvcc fatal : Unsupported gpu architecture")

    cpu_path = _build.load()  # the real CPU extension, loaded once per process (a second build would re-register)
    if cpu_path is None:
        pytest.skip("MINISSL_NO_EXT=1: compiled kernels disabled")
    monkeypatch.delenv("MINISSL_REQUIRE_EXT", raising=False)  # CI requires the kernels; this test is the fallback
    monkeypatch.setattr(_build, "_state", {"tried": False, "path": None, "error": None, "seconds": None,
                                           "build_dir": None, "compiled": False})
    monkeypatch.setattr(_build, "_cuda", {"path": None, "why": None, "warned": False})
    monkeypatch.setattr(_build, "_build", lambda: cpu_path)
    real_dir, real_blocker = _build.build_directory, _build.cuda_build_blocker
    monkeypatch.setattr(_build, "build_directory", lambda key, cuda: tmp_path / key if cuda else real_dir(key, cuda))
    monkeypatch.setattr(_build, "cuda_build_blocker", lambda: None)  # as with a CUDA torch and nvcc
    monkeypatch.setattr(_build, "_build_cuda", broken)
    assert _build.load() is not None and _build.get_kernel("mix", "cpu") is not None
    log = tmp_path / _build.cache_key(_build.sources(True), _build.build_flags()) / "build.log"
    assert "nvcc fatal : Unsupported gpu architecture" in log.read_text()
    why = (r"no CUDA kernels \(the CUDA kernels failed to build: Error building extension 'minissl_ext_cuda' "
           rf"\(log: {re.escape(str(log))}\)\); ops on CUDA tensors run the pure-PyTorch reference")
    with pytest.warns(RuntimeWarning, match=why) as rec:
        assert _build.get_kernel("mix", "cuda") is None
        assert _build.get_kernel("dice_ce_entropy", "cuda") is None
    assert len(rec) == 1
    assert "failed to build" in ops.kernel_status().cuda
    monkeypatch.setattr(torch.version, "cuda", None)
    assert real_blocker() == "this torch was built without CUDA"
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(_build, "with_cuda", lambda: False)
    assert real_blocker() == "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"


def test_cuda_loss_above_32_channels_runs_the_reference_with_one_warning(monkeypatch):
    """The CUDA kernel refuses C > 32; the dispatch decision is the Python side's: the reference, one warning."""
    kernel = object()
    monkeypatch.setattr(_build, "get_kernel", lambda name, device_type="cpu": kernel)
    monkeypatch.setattr(ops, "_warned", set())
    cuda = torch.device("cuda")
    assert ops._dce_kernel(cuda, 32) is kernel and ops._dce_kernel(torch.device("cpu"), 33) is kernel
    with pytest.warns(RuntimeWarning, match=r"dice_ce_entropy: the CUDA kernel takes at most 32 channels, got "
                                            r"C = 33; using the pure-PyTorch reference") as rec:
        assert ops._dce_kernel(cuda, 33) is None
        assert ops._dce_kernel(cuda, 40) is None
    assert len(rec) == 1


def test_value_checks_on_a_gpu_only_with_the_debug_switch(monkeypatch):
    """Finding 5: reading labels or boxes of GPU tensors on the host is a synchronisation per call."""
    monkeypatch.delenv("MINISSL_DEBUG_CHECKS", raising=False)
    assert ops.reads_values(torch.device("cpu")) and not ops.reads_values(torch.device("cuda"))
    monkeypatch.setenv("MINISSL_DEBUG_CHECKS", "1")
    assert ops.reads_values(torch.device("cuda"))
