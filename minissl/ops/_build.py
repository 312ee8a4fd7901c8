"""JIT build of the C++/CUDA kernels in ``csrc/`` (ninja, on first use).

Two extensions, built and loaded separately so that a failing ``nvcc`` never costs the CPU kernels:
``minissl_ext`` holds the ``TORCH_LIBRARY(minissl, m)`` schema block (``csrc/ops.cpp``) and the CPU
kernels (``csrc/cpu/*.cpp``); ``minissl_ext_cuda`` (``csrc/cuda/*``, loaded after it) only the CUDA
kernels, built when torch has CUDA and ``nvcc`` is found. A CUDA tensor whose op has no CUDA kernel
runs the reference, with one warning per process saying why (torch without CUDA, no nvcc, or the CUDA
build's error and the path of its log). Each is built once per (torch version, sources, flags,
CPU model) into its own folder, so editing a kernel, upgrading torch or moving the cache to another
CPU type (the flags use ``-march=native``) rebuilds it instead of loading a stale ``.so``:

    $TORCH_EXTENSIONS_DIR/minissl-<torch>-<cpu|cuXY>-<hash>/     (when the variable is set)
    ~/.cache/minissl/torch_extensions/minissl-<torch>-<cpu|cuXY>-<hash>/   (otherwise)

Concurrent builds: a process holds an exclusive ``fcntl.flock`` on ``<folder>/build.lock`` while it
builds or loads; the OS drops the lock when its holder dies, so a build killed half-way is simply
redone by the next process (torch's own ``lock`` file left behind by the killed build is removed
under our lock). A waiter gives up after ``MINISSL_BUILD_LOCK_TIMEOUT`` seconds (default 900) with an
error naming the lock file.

Environment:
    MINISSL_NO_EXT=1       never build; every op uses ``minissl.ops.reference``.
    MINISSL_REQUIRE_EXT=1  a failed build raises instead of falling back (CI sets it).
    MINISSL_BUILD_VERBOSE=1  show the compiler commands.
    MINISSL_BUILD_LOCK_TIMEOUT=<seconds>  how long to wait for another process's build.
    MINISSL_DEBUG_CHECKS=1  also check label and box values of GPU tensors on the host (a synchronisation
                            per call; off by default: an out-of-range label makes the CUDA loss NaN).
Otherwise a failed build falls back to the reference ops with one warning; the next process tries
the build again.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch


def _csrc() -> Path:
    """The kernel sources: ``csrc/`` at the repository root (editable install, source checkout), else
    the copy a regular install ships inside the package (``minissl/_csrc``, see setup.py)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package.parent / "csrc", package / "_csrc"):
        if (folder / "ops.cpp").is_file():
            return folder
    return package / "_csrc"


CSRC = _csrc()
CPU_SOURCES = ("ops.cpp", "cpu/dense.cpp", "cpu/geometry.cpp")  # at most ~3 heavy translation units
CUDA_SOURCES = ("cuda/dense.cu", "cuda/geometry.cu", "cuda/bindings.cpp")  # the separate CUDA extension
LOCK_TIMEOUT_SECONDS = 900.0  # default wait for another process's build (MINISSL_BUILD_LOCK_TIMEOUT)

_state: dict = {"tried": False, "path": None, "error": None, "seconds": None, "build_dir": None,
                "compiled": False}
_cuda: dict = {"path": None, "why": None, "warned": False}  # the CUDA extension; why: reason it is not loaded


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def with_cuda() -> bool:
    """True when the CUDA sources can be compiled: torch has CUDA and nvcc is found."""
    if torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def sources(cuda: bool = False) -> list[Path]:
    """The sources of the CPU extension (CPU_SOURCES) or of the CUDA one (CUDA_SOURCES); every one must exist.

    Raises:
        FileNotFoundError: a source is missing (a broken checkout or install), naming it.
    """
    names = CUDA_SOURCES if cuda else CPU_SOURCES
    missing = [n for n in names if not (CSRC / n).is_file()]
    if missing:
        raise FileNotFoundError(f"minissl: kernel source(s) {', '.join(missing)} missing in {CSRC}; the checkout "
                                "or installation is incomplete (reinstall minissl)")
    return [CSRC / n for n in names]


def build_flags() -> dict[str, list[str]]:
    """Compiler and linker flags. OpenMP in both (at::parallel_for is serial without -fopenmp).

    ``-march=native`` is fine because the JIT build runs where the code runs (the CPU model is part of
    the cache key); the at::vec CPU capability macros select the SIMD width torch itself uses here.
    """
    cflags = ["-O3", "-fopenmp", "-march=native"]
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512", "AVX2"):
        cflags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return {"cflags": cflags, "cuda_cflags": ["-O3", "-DMINISSL_WITH_CUDA"], "ldflags": ["-fopenmp"]}


def cpu_model() -> str:
    """The CPU the code is compiled for: architecture plus /proc/cpuinfo's first "model name" (if any)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{platform.machine()} {name or platform.processor()}".strip()


def cache_key(srcs: list[Path], flags: dict[str, list[str]]) -> str:
    """Hash of the torch version, the CPU model, the flags and every source and header under csrc."""
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(cpu_model().encode())
    h.update(repr(sorted(flags.items())).encode())
    headers = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))
    for p in list(srcs) + headers:
        h.update((p.relative_to(CSRC).as_posix() if p.is_relative_to(CSRC) else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_directory(key: str, cuda: bool) -> Path:
    """Folder of this build (see the module docstring)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "minissl" / "torch_extensions"
    variant = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    tag = torch.__version__.split("+")[0]
    return base / f"minissl-{tag}-{variant}-{key}"


def lock_timeout() -> float:
    """Seconds to wait for another process's build: MINISSL_BUILD_LOCK_TIMEOUT or LOCK_TIMEOUT_SECONDS."""
    raw = os.environ.get("MINISSL_BUILD_LOCK_TIMEOUT", "").strip()
    if not raw:
        return LOCK_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"minissl: MINISSL_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got {raw!r}")
    return value


@contextmanager
def build_lock(folder: Path, timeout: Optional[float] = None) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``folder/build.lock`` (released by the OS if this process dies).

    Waits up to ``timeout`` seconds (default ``lock_timeout()``) for another holder, saying so once on
    stderr. Under the lock no other minissl build runs, so torch's ``folder/lock`` is a leftover of a
    killed build and is removed (torch would otherwise wait on it forever).

    Raises:
        TimeoutError: the lock was not free within ``timeout`` seconds; the message names the lock file
            and the holder's pid.
    """
    timeout = lock_timeout() if timeout is None else timeout
    path = folder / "build.lock"
    with open(path, "a+") as f:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                f.seek(0)
                holder = f.read().strip() or "unknown"
                if waited >= timeout:
                    raise TimeoutError(
                        f"minissl: waited {waited:.0f} s for the kernel build lock {path} (held by pid {holder}, "
                        "another process building the kernels); let it finish, or raise "
                        "MINISSL_BUILD_LOCK_TIMEOUT (seconds)") from None
                if not told:
                    print(f"minissl: waiting for another process (pid {holder}) to build the kernels "
                          f"(lock {path})...", file=sys.stderr, flush=True)
                    told = True
                time.sleep(min(0.2, max(timeout - waited, 0.01)))
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            (folder / "lock").unlink(missing_ok=True)
            yield path
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load() -> Optional[str]:
    """Build (if needed) and load the extensions once per process. Returns the CPU .so path or None."""
    if _state["tried"]:
        return _state["path"]
    _state["tried"] = True
    if _flag("MINISSL_NO_EXT"):
        _cuda["why"] = "MINISSL_NO_EXT=1"
        return None
    start = time.perf_counter()
    try:
        _state["path"] = _build()
        _state["seconds"] = time.perf_counter() - start
        from . import _kernels  # noqa: F401  (registers fake kernels and autograd once the ops exist)
    except Exception as err:  # noqa: BLE001 - any build failure falls back (or raises, if required)
        _state["path"], _state["error"] = None, err
        _cuda["why"] = "the CPU extension, which holds the op schemas, failed to build"
        if _flag("MINISSL_REQUIRE_EXT"):
            raise RuntimeError(f"minissl: building the C++ kernels failed and MINISSL_REQUIRE_EXT=1: {err}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"minissl: could not build the C++ kernels ({first}); using the pure-PyTorch reference "
                      "ops. Set MINISSL_REQUIRE_EXT=1 to make this an error or MINISSL_NO_EXT=1 to skip the build.",
                      RuntimeWarning, stacklevel=3)
        return None
    _load_cuda()
    return _state["path"]


def _load_cuda() -> None:
    """Build and load the CUDA extension when torch has CUDA; on failure keep the reason (and the log)."""
    _cuda["path"], _cuda["why"] = None, cuda_build_blocker()
    if _cuda["why"] is not None:
        return
    try:
        _cuda["path"] = _build_cuda()
    except Exception as err:  # noqa: BLE001 - the CPU kernels stay; CUDA tensors run the reference
        log = build_directory(cache_key(sources(True), build_flags()), cuda=True) / "build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{type(err).__name__}: {err}\n")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _cuda["why"] = f"the CUDA kernels failed to build: {first} (log: {log})"
        if _flag("MINISSL_REQUIRE_EXT"):
            raise RuntimeError(f"minissl: {_cuda['why']} and MINISSL_REQUIRE_EXT=1") from err


def cuda_build_blocker() -> Optional[str]:
    """Why the CUDA extension cannot even be built here (None: it can)."""
    if torch.version.cuda is None:
        return "this torch was built without CUDA"
    if not with_cuda():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def _snapshot(folder: Path, srcs: list[Path]) -> tuple[list[Path], Path]:
    """Copy ``csrc`` into the build folder once and return the sources and include folder there.

    torch's JIT loader re-compiles whenever the source *paths* change, so two checkouts (or two virtual
    environments) with identical sources would rebuild each other's cache in turn; compiling the copy
    (the folder is per content hash) gives every checkout the same paths. Called under the build lock.
    """
    local = folder / "csrc"
    if not local.is_dir():
        tmp = folder / f"csrc.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(CSRC, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))
        os.replace(tmp, local)
    return [local / s.relative_to(CSRC) if s.is_relative_to(CSRC) else s for s in srcs], local


def _compile(name: str, srcs: list[Path], cuda: bool, what: str) -> tuple[str, Path, bool]:
    """Build (or load from the cache) one extension; returns its path, its folder and whether it compiled."""
    from torch.utils import cpp_extension

    flags = build_flags()
    folder = build_directory(cache_key(srcs, flags), cuda)
    folder.mkdir(parents=True, exist_ok=True)
    with build_lock(folder):
        compiling = not any(folder.glob(f"{name}*.so"))  # the folder is per source hash: a .so is a cache hit
        srcs, include = _snapshot(folder, srcs)
        if compiling:
            print(f"minissl: compiling the {what} (first use, about 1-2 minutes)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        path = cpp_extension.load(
            name=name,
            sources=[str(s) for s in srcs],
            extra_cflags=flags["cflags"],
            extra_cuda_cflags=flags["cuda_cflags"],
            extra_ldflags=flags["ldflags"],
            extra_include_paths=[str(include)],
            build_directory=str(folder),
            with_cuda=cuda,
            is_python_module=False,
            verbose=_flag("MINISSL_BUILD_VERBOSE"),
        )
        if compiling:
            print(f"minissl: compiled the {what} in {time.perf_counter() - start:.0f} s ({folder})",
                  file=sys.stderr, flush=True)
    return str(path), folder, compiling


def _build() -> str:
    """The CPU extension (schemas and CPU kernels)."""
    srcs = sources(False)
    _state["build_dir"] = build_directory(cache_key(srcs, build_flags()), cuda=False)
    path, _, compiled = _compile("minissl_ext", srcs, False, "C++ kernels")
    _state["compiled"] = _state["compiled"] or compiled
    return path


def _build_cuda() -> str:
    """The CUDA extension (CUDA kernels only; the schemas come from the CPU extension, loaded first)."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no visible GPU: torch cannot pick the archs itself
    return _compile("minissl_ext_cuda", sources(True), True, "CUDA kernels")[0]


def cuda_unavailable_reason() -> Optional[str]:
    """Why CUDA tensors have no compiled kernels in this process (None when the CUDA extension is loaded)."""
    load()
    return None if _cuda["path"] else _cuda["why"] or "the CUDA extension was not loaded"


def build_info() -> dict:
    """What happened: .so path, build/load seconds, build folder, whether it compiled, error (None if fine)."""
    return {k: _state[k] for k in ("path", "seconds", "build_dir", "compiled", "error")}


def has_kernel(name: str, device_type: str) -> bool:
    """True when op ``minissl::name`` has a compiled kernel for ``device_type`` ('cpu' or 'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"minissl::{name}", key)


def get_kernel(name: str, device_type: str = "cpu") -> Optional[Callable]:
    """``torch.ops.minissl.<name>`` when it has a compiled kernel for ``device_type``, else None.

    Builds the extensions on the first call (``load``); None when MINISSL_NO_EXT=1, when the build
    failed (one warning), or when the op has no kernel for that device. The first CUDA request without a
    CUDA kernel warns once, saying why (``cuda_unavailable_reason``).
    """
    if load() is not None and has_kernel(name, device_type):
        return getattr(torch.ops.minissl, name)
    if device_type == "cuda" and not _cuda["warned"] and not _flag("MINISSL_NO_EXT"):
        _cuda["warned"] = True
        warnings.warn(f"minissl: no CUDA kernels ({cuda_unavailable_reason()}); ops on CUDA tensors run the "
                      "pure-PyTorch reference", RuntimeWarning, stacklevel=3)
    return None
