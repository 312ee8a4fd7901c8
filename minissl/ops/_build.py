"""JIT build of the C++/CUDA kernels in ``csrc/`` (ninja, on first use).

The shared object holds one ``TORCH_LIBRARY(minissl, m)`` schema block (``csrc/ops.cpp``) and the
``TORCH_LIBRARY_IMPL`` kernels of each backend: ``csrc/cpu/*.cpp`` always, ``csrc/cuda/*`` only when
torch was built with CUDA and ``nvcc`` is found. It is built once per (torch version, sources, flags)
into its own folder, so editing a kernel or upgrading torch rebuilds it instead of loading a stale
``.so``:

    $TORCH_EXTENSIONS_DIR/minissl-<torch>-<cpu|cuXY>-<hash>/     (when the variable is set)
    ~/.cache/minissl/torch_extensions/minissl-<torch>-<cpu|cuXY>-<hash>/   (otherwise)

Environment:
    MINISSL_NO_EXT=1       never build; every op uses ``minissl.ops.reference``.
    MINISSL_REQUIRE_EXT=1  a failed build raises instead of falling back (CI sets it).
    MINISSL_BUILD_VERBOSE=1  show the compiler commands.
Otherwise a failed build falls back to the reference ops with one warning.

Use ``get_kernel(name)``: the compiled implementation of a public op (same signature as its reference
twin), or None when the extension is disabled, failed to build, or has no kernel for that op yet.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

def _csrc() -> Path:
    """The kernel sources: ``csrc/`` at the repository root (editable install, source checkout), else
    the copy a regular install ships inside the package (``minissl/_csrc``, see setup.py)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package.parent / "csrc", package / "_csrc"):
        if (folder / "ops.cpp").is_file():
            return folder
    return package.parent / "csrc"


CSRC = _csrc()
CPU_SOURCES = ("ops.cpp", "cpu/dense.cpp", "cpu/geometry.cpp")  # at most ~3 heavy translation units
CUDA_SOURCES = ("cuda/dense.cu", "cuda/geometry.cu", "cuda/bindings.cpp")
STALE_LOCK_SECONDS = 300.0  # an older `lock` with no live builder is left over from a killed build

_state: dict = {"tried": False, "path": None, "error": None, "seconds": None, "build_dir": None}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def with_cuda() -> bool:
    """True when the CUDA sources can be compiled: torch has CUDA and nvcc is found."""
    if torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def sources(cuda: Optional[bool] = None) -> list[Path]:
    """The kernel sources of this build: those of CPU_SOURCES (+ CUDA_SOURCES) that exist."""
    names = CPU_SOURCES + (CUDA_SOURCES if (with_cuda() if cuda is None else cuda) else ())
    return [CSRC / n for n in names if (CSRC / n).is_file()]


def build_flags() -> dict[str, list[str]]:
    """Compiler and linker flags. OpenMP in both (at::parallel_for is serial without -fopenmp).

    ``-march=native`` is fine because the JIT build runs where the code runs; the at::vec CPU
    capability macros select the same SIMD width torch itself uses on the running CPU.
    """
    cflags = ["-O3", "-fopenmp", "-march=native"]
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512", "AVX2"):
        cflags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return {"cflags": cflags, "cuda_cflags": ["-O3", "-DMINISSL_WITH_CUDA"], "ldflags": ["-fopenmp"]}


def cache_key(srcs: list[Path], flags: dict[str, list[str]]) -> str:
    """Hash of the torch version, every source and header under csrc, and the flags."""
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_stale_lock(folder: Path, max_age: float = STALE_LOCK_SECONDS) -> None:
    """Raise a clear error if ``folder/lock`` was left by a build that is no longer running.

    torch's builder waits silently forever on such a file. We record the builder's pid next to it
    (``builder.pid``): the lock is stale when that process is gone, or, without a pid file, when the
    lock is older than ``max_age`` seconds.
    """
    lock = folder / "lock"
    if not lock.exists():
        return
    age = time.time() - lock.stat().st_mtime
    pid_file = folder / "builder.pid"
    alive = None
    if pid_file.exists():
        try:
            alive = _pid_alive(int(pid_file.read_text().split()[0]))
        except (ValueError, IndexError, OSError):
            alive = None
    if alive is False or (alive is None and age > max_age):
        raise RuntimeError(
            f"minissl: stale build lock {lock} (age {age:.0f} s, no build running): an earlier kernel build "
            f"was interrupted. Delete it (`rm {lock}`) or the whole folder {folder} and try again.")


def load() -> Optional[str]:
    """Build (if needed) and load the extension once per process. Returns the .so path or None."""
    if _state["tried"]:
        return _state["path"]
    _state["tried"] = True
    if _flag("MINISSL_NO_EXT"):
        return None
    start = time.perf_counter()
    try:
        _state["path"] = _build()
        _state["seconds"] = time.perf_counter() - start
        from . import _kernels  # noqa: F401  (registers fake kernels and autograd once the ops exist)
    except Exception as err:  # noqa: BLE001 - any build failure falls back (or raises, if required)
        _state["path"], _state["error"] = None, err
        if _flag("MINISSL_REQUIRE_EXT"):
            raise RuntimeError(f"minissl: building the C++ kernels failed and MINISSL_REQUIRE_EXT=1: {err}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"minissl: could not build the C++ kernels ({first}); using the pure-PyTorch reference "
                      "ops. Set MINISSL_REQUIRE_EXT=1 to make this an error or MINISSL_NO_EXT=1 to skip the build.",
                      RuntimeWarning, stacklevel=3)
    return _state["path"]


def _build() -> str:
    from torch.utils import cpp_extension

    cuda = with_cuda()
    srcs = sources(cuda)
    flags = build_flags()
    folder = build_directory(cache_key(srcs, flags), cuda)
    folder.mkdir(parents=True, exist_ok=True)
    _state["build_dir"] = folder
    check_stale_lock(folder)
    if cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no visible GPU: torch cannot pick the archs itself
    pid_file = folder / "builder.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        path = cpp_extension.load(
            name="minissl_ext_cuda" if cuda else "minissl_ext",
            sources=[str(s) for s in srcs],
            extra_cflags=flags["cflags"] + (["-DMINISSL_WITH_CUDA"] if cuda else []),
            extra_cuda_cflags=flags["cuda_cflags"],
            extra_ldflags=flags["ldflags"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(folder),
            with_cuda=cuda,
            is_python_module=False,
            verbose=_flag("MINISSL_BUILD_VERBOSE"),
        )
    finally:
        pid_file.unlink(missing_ok=True)
    return str(path)


def build_info() -> dict:
    """What happened: .so path, build/load seconds, build folder, error (None if fine)."""
    return {k: _state[k] for k in ("path", "seconds", "build_dir", "error")}


def get_kernel(name: str) -> Optional[Callable]:
    """Return the compiled implementation of public op ``name``, or None to use the reference.

    None when MINISSL_NO_EXT=1, when the build failed (one warning), or when this op has no compiled
    CPU kernel yet (e.g. its source file is not written): dispatch falls back per op.
    """
    if load() is None:
        return None
    from . import _kernels

    return _kernels.get(name)
