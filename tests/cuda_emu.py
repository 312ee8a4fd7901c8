"""Build and drive the CUDA emulator: the real kernels of ``csrc/cuda/*.cu`` compiled as C++ and run on the CPU.

Each ``.cu`` file is rewritten only where C++ cannot parse it (kernel launches ``k<<<g, b, smem, s>>>(...)``,
``extern __shared__`` and static ``__shared__`` declarations; see ``csrc/emu/cuda_emu.h``), compiled with
g++ against the emulation header, and linked with ``csrc/emu/runtime.cpp`` and the C entry points of
``csrc/emu/capi.cpp`` into one shared library loaded with ctypes. No torch headers are involved, so the
build takes seconds; it is cached under ``~/.cache/minissl/emu/<hash of every input>`` and guarded by a
file lock (pytest-xdist workers build it once).

``Emulator`` runs every op through the device-agnostic glue of ``csrc/cuda/glue.h`` (``csrc/emu/glue.cpp``:
a small torch extension linked against the emulator library, ops ``torch.ops.minissl_emu.*`` on CPU tensors),
so the tests take the real CUDA path's checks, workspaces and flags; plus the emulator's controls (mode,
dry launch, architecture limits, launch log). ``python tests/cuda_emu.py --tsan``
runs the kernels under ThreadSanitizer (see ``csrc/emu/README.md``).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
MODES = {"sequential": 0, "shuffled": 1, "threads": 2}


# ---- source rewrite ---------------------------------------------------------------------------------------

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)((?:\s*\[[^\]]+\])*)\s*;")


def _matching(text: str, i: int, open_: str, close: str, step: int) -> int:
    """Index of the bracket matching ``text[i]`` scanning in direction ``step`` (+1 or -1)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced {open_}{close} in CUDA source")


def _split_top(text: str) -> list[str]:
    """Split ``text`` at commas outside (), [] and {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def rewrite_launches(src: str) -> str:
    """``kernel<targs><<<grid, block[, smem[, stream]]>>>(args)`` -> ``::emu::launch<kernel<targs>>(...)``."""
    out, pos = [], 0
    while (i := src.find("<<<", pos)) >= 0:
        j = i - 1
        while src[j].isspace():
            j -= 1
        if src[j] == ">":  # template arguments of the kernel
            j = _matching(src, j, ">", "<", -1) - 1
        k = j
        while k >= 0 and (src[k].isalnum() or src[k] in "_:"):
            k -= 1
        start = k + 1
        kernel = re.sub(r"\s+", " ", src[start:i].strip())
        end_cfg = src.index(">>>", i)
        cfg = _split_top(src[i + 3:end_cfg])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"kernel launch of {kernel}: expected 2 to 4 launch parameters, got {cfg}")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        p = end_cfg + 3
        while src[p].isspace():
            p += 1
        if src[p] != "(":
            raise ValueError(f"kernel launch of {kernel}: expected '(' after '>>>'")
        close = _matching(src, p, "(", ")", 1)
        args = src[p + 1:close].strip()
        call = f'::emu::launch<{kernel}>("{kernel}", {", ".join(cfg)}{", " + args if args else ""})'
        original = src[start:close + 1]
        out += [src[pos:start], call, "\n" * (original.count("\n") - call.count("\n"))]
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


def rewrite(src: str, path: Path) -> str:
    """The C++ text of one .cu file for the emulator (line numbers kept, errors point at the .cu file)."""
    src = _EXTERN_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = ::emu::dynamic_shared<{m[1]}>();", src)
    src = _STATIC_SHARED.sub(
        lambda m: f"static char {m[2]}_emu_key; auto& {m[2]} = ::emu::static_shared<{m[1]}{m[3]}>(&{m[2]}_emu_key);",
        src)
    return f'#line 1 "{path}"\n' + rewrite_launches(src)


def global_kernels(src: str) -> set[str]:
    """Names of the ``__global__`` functions defined in a CUDA source."""
    return set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", src))


# ---- build ----------------------------------------------------------------------------------------------

def _flags() -> list[str]:
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-I", str(EMU / "include"), "-I", str(CSRC / "cuda"),
             "-I", str(CSRC)]
    return flags


def _cache_key(inputs: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    h.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    for p in sorted(inputs):
        h.update(p.relative_to(CSRC).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(cache: Optional[Path] = None) -> Path:
    """Compile the emulator library (cached by the hash of every input); returns the .so path."""
    cus = sorted((CSRC / "cuda").glob("*.cu"))
    headers = sorted(p for p in CSRC.rglob("*.h"))
    flags = _flags()
    key = _cache_key([*cus, *headers, *(EMU / n for n in ("runtime.cpp", "capi.cpp", "selftest.cu"))], flags)
    folder = (cache or Path(os.environ.get("MINISSL_EMU_CACHE", Path.home() / ".cache" / "minissl" / "emu"))) / key
    folder.mkdir(parents=True, exist_ok=True)
    so = folder / "libminissl_emu.so"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.exists():
            return so
        units = [EMU / "runtime.cpp", EMU / "capi.cpp"]
        for cu in [*cus, EMU / "selftest.cu"]:
            unit = folder / f"{cu.stem}.emu.cpp"
            unit.write_text(rewrite(cu.read_text(encoding="utf-8"), cu), encoding="utf-8")
            units.append(unit)

        def compile_one(unit: Path) -> Path:
            obj = folder / f"{unit.stem}.o"
            res = subprocess.run(["g++", *flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"emulator build of {unit} failed:\n{res.stderr[-6000:]}")
            return obj

        with ThreadPoolExecutor(2) as pool:
            objs = list(pool.map(compile_one, units))
        tmp = folder / f"{so.name}.{os.getpid()}"
        res = subprocess.run(["g++", *flags, "-shared", "-Wl,--no-undefined", f"-Wl,-soname,{so.name}", "-o", str(tmp),
                              *map(str, objs)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulator link failed:\n{res.stderr[-6000:]}")
        tmp.rename(so)
        return so


def run_tsan(cache: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Build ``csrc/emu/tsan_main.cpp`` with every unit under ThreadSanitizer and run it (OS-thread mode).

    By hand, not in CI: ``PYTHONPATH=$PWD python tests/cuda_emu.py --tsan``.
    """
    folder = (cache or Path.home() / ".cache" / "minissl" / "emu") / "tsan"
    folder.mkdir(parents=True, exist_ok=True)
    flags = [*_flags(), "-fsanitize=thread", "-g"]
    units = [EMU / "runtime.cpp", EMU / "tsan_main.cpp"]
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        unit = folder / f"{cu.stem}.emu.cpp"
        unit.write_text(rewrite(cu.read_text(encoding="utf-8"), cu), encoding="utf-8")
        units.append(unit)
    exe = folder / "tsan_main"
    subprocess.run(["g++", *flags, "-o", str(exe), *map(str, units)], check=True)
    env = {**os.environ, "TSAN_OPTIONS": f"suppressions={EMU / 'tsan.supp'} halt_on_error=0"}
    return subprocess.run([str(exe)], env=env)


# ---- ctypes driver --------------------------------------------------------------------------------------

class EmulatorError(RuntimeError):
    """A launcher returned an error (launch limit, failed rendezvous, ...)."""


@dataclass(frozen=True)
class Launch:
    """One entry of the launch log."""

    kernel: str  # as written at the launch = the instance, e.g. "dce_fwd_kernel<T> = dce_fwd_kernel<float>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int  # dynamic shared memory, bytes
    status: str  # "ran", "dry", "refused: ...", "failed: ...", "skipped: ..."

    @property
    def name(self) -> str:
        """The kernel's function name without template arguments."""
        return self.kernel.split("<")[0].split(" = ")[0].strip()

    @property
    def instance(self) -> str:
        """The instantiated kernel, e.g. "dce_fwd_kernel<float>"."""
        return self.kernel.split(" = ", 1)[-1]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


def build_glue(so: Path) -> str:
    """Compile ``csrc/emu/glue.cpp`` (the glue of ``csrc/cuda/glue.h`` on CPU tensors, ops ``minissl_emu``)
    against the emulator library ``so`` and load it; returns the extension's path. Cached next to ``so``."""
    from torch.utils import cpp_extension

    folder = so.parent / "glue"
    folder.mkdir(exist_ok=True)
    with open(so.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return cpp_extension.load(
            name="minissl_emu_glue", sources=[str(EMU / "glue.cpp")], extra_cflags=["-O1"],
            extra_include_paths=[str(CSRC)], build_directory=str(folder), is_python_module=False,
            extra_ldflags=[f"-L{so.parent}", "-lminissl_emu", f"-Wl,-rpath,{so.parent}"])


class Emulator:
    """The CUDA path of every op on CPU tensors: the glue of ``csrc/cuda/glue.h`` (checks, workspaces,
    flags) calling the emulated launchers of ``csrc/cuda/launchers.h``; and the emulator's controls."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))  # first: the glue extension links this very library
        build_glue(path)
        self.ops = torch.ops.minissl_emu
        self.lib.emu_largest_component.argtypes = [_P, _P, ctypes.c_int] + [_I64] * 5 + [_P]
        self.lib.emu_largest_component.restype = ctypes.c_char_p
        self.lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong, _F]
        self.lib.emu_log_text.restype = ctypes.c_char_p
        self.lib.emu_take_error.restype = ctypes.c_char_p
        self.lib.emu_virtual_alloc.restype = _P
        self.lib.emu_virtual_alloc.argtypes = [ctypes.c_ulonglong]
        self.lib.emu_largest_component_workspace.restype = ctypes.c_size_t
        self.lib.emu_largest_component_workspace.argtypes = [_I64] * 3
        self.lib.emu_ellipse_refine_f64.argtypes = [_P] * 3 + [_I64] * 3 + [_F] * 4 + [_P, _P]
        self.lib.emu_ellipse_mask.argtypes = [_P] * 2 + [_I64] * 3 + [_P]
        for fn in (self.lib.emu_ellipse_refine_f64, self.lib.emu_ellipse_mask):
            fn.restype = ctypes.c_char_p

    # -- controls --
    def configure(self, mode: str = "sequential", *, dry: bool = False, arch: int = 86, seed: int = 0,
                  watchdog: float = 10.0) -> None:
        """Set the block scheduling mode, dry launches, the architecture whose limits apply; clears opt-ins."""
        if self.lib.emu_configure(MODES[mode], int(dry), arch, seed, watchdog) != 0:
            raise ValueError(f"emulator: expected a mode in {list(MODES)} and arch in 80/86/89/90, got {mode}, {arch}")
        self.lib.emu_take_error()

    def launches(self) -> list[Launch]:
        """The launch log since the last ``clear_log``."""
        out = []
        for line in self.lib.emu_log_text().decode().splitlines():
            kernel, grid, block, smem, status = line.split("\t", 4)
            out.append(Launch(kernel, tuple(map(int, grid.split())), tuple(map(int, block.split())), int(smem), status))
        return out

    def clear_log(self) -> None:
        self.lib.emu_log_clear()

    def virtual(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor backed by address space only (pages read as zero until written): virtual extents.

        The mapping lives as long as the process (tests make a few).
        """
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        addr = self.lib.emu_virtual_alloc(nbytes)
        if not addr:
            raise MemoryError(f"emulator: cannot reserve {nbytes} bytes of address space")
        buf = (ctypes.c_byte * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=dtype, count=n).view(*shape)

    def _call(self, op: str, *args):
        """``torch.ops.minissl_emu.<op>(*args)``; a launcher's error string becomes EmulatorError."""
        try:
            return getattr(self.ops, op)(*args)
        except RuntimeError as err:
            if "minissl CUDA kernel failed" not in str(err):
                raise
            self.lib.emu_take_error()
            raise EmulatorError(str(err).splitlines()[0]) from None

    # -- ops through the glue --
    def dice_ce_entropy(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        squared: bool = False) -> tuple[torch.Tensor, ...]:
        """Forward sums (intersect, pred_sum, target_sum, ce, entropy, weight_sum) as in reference.py."""
        return tuple(self._call("dice_ce_entropy", logits, target, weight, squared))

    def dice_ce_entropy_backward(self, grads: Sequence[torch.Tensor], logits: torch.Tensor, target: torch.Tensor,
                                 weight: Optional[torch.Tensor] = None, squared: bool = False) -> torch.Tensor:
        """Gradient w.r.t. the logits given the gradients (gI, gP, gCE, gH) of the forward sums (cast to the
        logits' dtype, as the autograd of minissl/ops/_kernels.py does)."""
        return self._call("dice_ce_entropy_backward", *(g.to(logits.dtype) for g in grads), logits, target, weight,
                          squared)

    def mix(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, boxes: Optional[torch.Tensor] = None,
            blocks: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Region paste of each (B, [L,] *S) pair, as reference.mix."""
        return list(self._call("mix", list(a), list(b), boxes, blocks))

    def largest_component(self, labels: torch.Tensor, num_classes: Optional[int] = None,
                          out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Largest component per class of (B, H, W) / (B, D, H, W) uint8, bool or int64 labels.

        With ``out`` and ``workspace`` (virtual tensors of a dry launch, beyond what the glue would
        allocate) the launcher is called directly.
        """
        if num_classes is None:
            num_classes = 2 if labels.dtype == torch.bool else int(labels.max()) + 1 if labels.numel() else 1
        if out is None and workspace is None:
            return self._call("largest_component", labels, num_classes)
        x = labels.contiguous()
        B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
        D = x.shape[1] if x.ndim == 4 else 1
        err = self.lib.emu_largest_component(_ptr(x), _ptr(out), x.element_size(), B, D, H, W, num_classes,
                                             _ptr(workspace))
        if err is not None:
            self.lib.emu_take_error()
            raise EmulatorError(err.decode())
        return out

    def ellipse_unchecked(self, probs: torch.Tensor, params: torch.Tensor,
                          valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float64 refine launcher (default ERSR constants) and the mask launcher, around the glue: for
        parameters its checks refuse (semi-axis 0). -> refined (B, H, W), pseudo (B, H, W), mask (B, H, W)."""
        P, prm = probs.contiguous(), params.contiguous()
        refined, pseudo, mask = torch.empty_like(P), torch.empty(P.shape, dtype=torch.uint8), torch.empty(
            P.shape, dtype=torch.uint8)
        for err in (self.lib.emu_ellipse_refine_f64(_ptr(P), _ptr(prm), _ptr(valid), *P.shape, 0.6, 0.6, 2.0, 0.5,
                                                    _ptr(refined), _ptr(pseudo)),
                    self.lib.emu_ellipse_mask(_ptr(prm), _ptr(valid), *P.shape, _ptr(mask))):
            if err is not None:
                self.lib.emu_take_error()
                raise EmulatorError(err.decode())
        return refined, pseudo, mask

    def fit_ellipse(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ellipse of the largest component of each (B, H, W) mask -> params (B, 5) f64, valid (B,) bool."""
        return tuple(self._call("fit_ellipse", masks))

    def fit_ellipse_points(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ellipse fit of (n, 2) float64 points -> params (5,), valid ()."""
        return tuple(self._call("fit_ellipse_points", points.to(torch.float64)))

    def ellipse_refine(self, probs: torch.Tensor, params: torch.Tensor, valid: torch.Tensor, *, threshold: float = 0.6,
                       fill_base: float = 0.6, fill_power: float = 2.0,
                       decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """ERSR refinement of (B, H, W) probabilities -> refined (B, H, W), pseudo (B, H, W) uint8."""
        return tuple(self._call("ellipse_refine", probs, params, valid, threshold, fill_base, fill_power, decay))

    def ellipse_mask(self, params: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Filled ellipses (B, H, W) uint8."""
        return self._call("ellipse_mask", params, valid, *shape)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--tsan"]:
        sys.exit("usage: python tests/cuda_emu.py --tsan")
    sys.exit(run_tsan().returncode)
