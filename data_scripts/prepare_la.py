"""Convert the LA dataset (2018 Atrial Segmentation Challenge, LGE-MRI) into a minissl store.

Where to get it: https://www.cardiacatlas.org/atriaseg2018-challenge/ (training set of 100
volumes, "2018LA_Seg_Training Set"). Unpack it anywhere; every folder holding an ``lgemri.nrrd``
is a case, its folder name the case id::

    <raw>/2018LA_Seg_Training Set/0RZDK210BSMWAA6467LU/lgemri.nrrd   image (X, Y, Z), 0.625 mm
    <raw>/2018LA_Seg_Training Set/0RZDK210BSMWAA6467LU/laendo.nrrd   cavity = 255, background = 0

Command::

    python data_scripts/prepare_la.py RAW_DIR OUT_DIR     # [--force] [--margin 15] [--budgets 4 8 16]

Output (``minissl.data.store``)::

    OUT_DIR/suite.json                          suite "la": 3D, 2 classes, patch (80, 112, 112)
    OUT_DIR/cases/<ID>.h5                       image float32 (Z, Y, X) z-scored, label uint8 {0, 1}
    OUT_DIR/splits/{train,val,test}.txt         72 / 8 / 20 cases for the full set
    OUT_DIR/splits/labeled_<n>_seed<k>.txt      n = 4, 8, 16 cases, k = 0-4

Choices:

* Labels: 255 -> 1; any other value than 0 and 255 is an error naming the file.
* Intensity: z-score over the whole volume, before cropping (as UA-MT's ``la_heart_processing.py``).
* Crop (the UA-MT protocol): in X and Y, the atrium's bounding box plus ``margin`` voxels (default
  15; UA-MT draws 10-20 at random per side, here it is fixed so the output is reproducible), grown
  symmetrically to at least 112 voxels, clipped to the volume; Z is kept whole (UA-MT computes a Z
  box but does not apply it). The crop uses the ground truth, on test cases too: that is the
  community protocol, and it makes test volumes easier than a raw scan. Metadata records the box
  (``crop_start_zyx``, ``crop_stop_zyx``) and ``original_shape_zyx``.
* Axes: pynrrd gives (X, Y, Z); the store holds (Z, Y, X). Spacing from the header (``space
  directions`` or ``spacings``); a header without either gets ``--default-spacing`` (0.625 mm,
  the challenge's stated resolution) and ``spacing_from_header = 0``.
* Splits: the UA-MT lists (https://github.com/yulequan/UA-MT/tree/master/data, train.list /
  test.list: 80 / 20; the same lists in MC-Net and BCP) are stored below as data. The original
  protocol has no validation set and selects checkpoints on test; here 10% of the training cases
  (8 of 80, seeded, ``_common.hold_out``) become the validation split. Cases on neither list are
  split 80/20 by a seeded rule before that, and the script says how many.
* Budgets: 4 / 8 / 16 cases (one case per patient) for seeds 0-4 (``store.choose_labeled``), drawn
  from the 72 remaining training cases (UA-MT labels the first N of its 80-case list).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nrrd
import numpy as np

from minissl.data.store import Case, write_case

if __package__:
    from . import _common as common
else:  # run as a script: _common.py sits beside this file
    import _common as common

NAME = "prepare_la"
VERSION = 1
EXPECTED_CASES = 100
BUDGETS = (4, 8, 16)
CLASSES = ("background", "left atrium")
PATCH = (80, 112, 112)
# UA-MT lists, https://github.com/yulequan/UA-MT/tree/master/data (train.list, test.list).
UAMT_TRAIN = """
06SR5RBREL16DQ6M8LWS 0RZDK210BSMWAA6467LU 1D7CUD1955YZPGK8XHJX 1GU15S0GJ6PFNARO469W 1MHBF3G6DCPWHSKG7XCP
23X6SY44VT9KFHR7S7OC 2XL5HSFSE93RMOJDRGR4 38CWS74285MFGZZXR09Z 3C2QTUNI0852XV7ZH4Q1 3DA0T2V6JJ2NLUAV6FWM
4498CA6DZWELOXCBRYRF 45C45I6IXAFGNRO067W9 4CHFJGF6ZUM7CMZTNFQF 4EPVTT1HPA8U60CDUKXE 57SGAJMLCTCH92QUA0EE
5BHTH9RHH3PQT913I59W 5FKQL4K14KCB72Y8YMC2 5HH0WPWIY06DLAFOBQ4M 5QFK2PMHNX7UALK52NNA 5UB5KFD2PK38Z4LS6W80
6799D6LEBH3NSRV1KH27 78NJ5YFQF72BGC8RO51C 7FUCNXB39F78WTOP5K71 8GYK8A9MBRC9TV0FVSRA 8M99G0JLAXG9GLPV0O8G
8RE90C8H5DKF4V6HO8UU 8ZG2TRZ81MAWHZPN9KKG 9DCM2IB45SK6YKQNYUQY 9DHWWP5Y66VDMPXISZ13 9DQYTIU00I4JC0OEOKQQ
A11O45O3NAXWM7T2H8CH A4R1S23KR0KU2WSYHK2X A5RNNK0A891WUSC2V624 AT5CRO5JUDBWD4RUPXSQ BNK95S2SJXEGSW7VAKYU
BXJWOUYP2J3EN4U92517 BYSRSI3H4YTWKMM3MADP BZUFJX66T0W6ZPVTL9DU CB5P5W7X310NIIVU7UZV CBIJFVZ5L9BS0LKWE8YL
CCGAKN4EDT72KC8TTJ76 CLXFYOBQDCVXQ9P7YC07 CMPXO4J23G58J53Q98SZ CZPMV6KWZ4I7IJJP9FOK DLKXBV73A55ZTSZ0QQI2
DQ5UYBGR5QP6L692QSG6 DYXSCIWHLSUOZIDDSZ40 E2ZMO66WGS74UKXTZPPQ EJ5V7SPR4961JWD6SS8V FGM5NIWN3URY4HF4WNUW
GSC9KNY0VEZXFSGWNF25 HVE7DR3CUA2IM3RC6OMA HZZ4O0BRKF8S0YX3NNF7 I2VZ7N8H9QYNYT7ZZF1Y IDWWHGWJ5STOQXSDT6GU
IIY6TYJMTJIZRIZLB9YW IJJY51YW3W4YJJ7DTVTK IQYKPTWXVV9H0IHB8YXC JEC6HJ7SQJXBKVREX03F JGFOLWJF7YCYD8DPHQNH
K32FD6LRSUSSXGS1YUOX KM5RYAMP4P4ZP6XWP3Q2 KSNYHUBHHUJTYJ14UQZR LH4FVU3TQDEC87YGN6FL LJSDNMND9SHKM7Q4IRHJ
MFTDVMBWFNQ3F5KHBRDR MJHV7F65TB2A76CQLOC3 MVKIPGBKTNSENNP1S4HB O5TSIKRD4AIB8K84WIR9 OIRDLE32TXZX942FVZMM
P1OTI3IWJUIB5NRLULLH PVNXUK681N9BY14K4Z86 Q0MEX9ZIKAGJORSPLQ3Y Q7J0WYM695R9MA285ZW0 QZC1W0FNR19KJFLOCFLH
R8ER97O9UUN77C02VE2J RSZY41MT2FGDKHWWL5L2 SN4LF8SGBSRQUPTDSX78 TDDI6L3Y0L9VVFP9MNFS UZUZZT2W9IUSHL6ASOX3
""".split()
UAMT_TEST = """
UPT6DX9IQY9JAZ7HJKA7 UTBUJIWZMKP64E3N73YC ULHWPWKKLTE921LQLH1P V0MZOWJ6MU3RMRCV9EXR VDOF02M8ZHEAADFMS6NP
VG4C826RAAKVMV9BQLVD VIXBEFTNVHZWKAKURJBN VQ2L3WM8KEVF6L44E6G9 WBG9WYZ1B25WDT5WAT8T WMDG2EFA6L2SNDZXIRU0
WNPKE0W404QE9AELX1LR WSJB9P4JCXUVHBOYFVWL WW8F5CO4S4K5IM5Z7EXX X18LU5AOBNNDMLTA0JZL XYDLYJ5CS19FDBVLJIPI
Y7ZU0B2APPF54WG6PDMF YDKD1HVHSME6NVMA8I39 Z9GMG63CJLL0VW893BB1 ZIJLJAVQV3FJ6JSQOH1E ZQPMJ4XEC5A4BISD45P1
""".split()


def read_nrrd(path: Path, what: str, default_spacing: float) -> tuple[np.ndarray, tuple[float, ...], bool]:
    """A 3D NRRD volume in store order.

    Returns:
        data (Z, Y, X) as stored, spacing (dz, dy, dx) mm, whether the spacing came from the header.
    """
    def load(p: Path) -> tuple[np.ndarray, dict]:
        data, header = nrrd.read(str(p))
        if data.ndim != 3:
            raise ValueError(f"expected a 3D volume (X, Y, Z), got shape {data.shape}")
        return data, header

    data, header = common.read_raw(path, what, load)
    if header.get("space directions") is not None:
        dirs = np.asarray(header["space directions"], dtype=np.float64)
        sp = [float(np.linalg.norm(d)) for d in dirs]
    elif header.get("spacings") is not None:
        sp = [float(s) for s in header["spacings"]]
    else:
        sp = []
    from_header = len(sp) == 3 and all(np.isfinite(sp)) and all(s > 0 for s in sp)
    if not from_header:
        sp = [default_spacing] * 3
    return data.transpose(2, 1, 0), (sp[2], sp[1], sp[0]), from_header


def find_cases(raw_dir: Path) -> dict[str, Path]:
    """{case id: folder} of every ``<ID>/lgemri.nrrd`` under ``raw_dir``."""
    found = common.index_by_name(((p.parent.name, p.parent) for p in sorted(raw_dir.rglob("lgemri.nrrd"))), "case")
    if not found:
        raise ValueError(f"{raw_dir}: no LA cases found (expected <ID>/lgemri.nrrd with <ID>/laendo.nrrd)")
    return found


def prepare(raw_dir: str | Path, out_dir: str | Path, *, margin: int = 15, min_size: int = 112,
            default_spacing: float = 0.625, budgets: Sequence[int] = BUDGETS, force: bool = False) -> Path:
    """Convert the raw LA folder into a store at ``out_dir`` (see the module docstring).

    Args:
        raw_dir: folder holding the ``<ID>/`` case folders (at any depth).
        out_dir: new, empty, or earlier output of this converter.
        margin: voxels kept around the atrium's bounding box in X and Y.
        min_size: smallest crop in X and Y (voxels), the training patch.
        default_spacing: mm per voxel for a header without spacing.
        budgets: labeled budgets (cases) whose lists are saved for seeds 0-4.
        force: rebuild even when the output is up to date.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a missing, unreadable or inconsistent raw file (the message names it), or a
            non-empty ``out_dir`` this converter did not write.
    """
    raw_dir = Path(raw_dir)
    cases = find_cases(raw_dir)
    print(common.count_line("LA", len(cases), EXPECTED_CASES, "volumes"))
    options = {"version": VERSION, "margin": margin, "min_size": min_size, "default_spacing": default_spacing,
               "budgets": list(budgets)}
    files = [f for d in cases.values() for f in (d / "lgemri.nrrd", d / "laendo.nrrd") if f.is_file()]
    digest = common.fingerprint(raw_dir, files, options)

    def build(root: Path) -> None:
        for cid, folder in cases.items():
            image_path, label_path = folder / "lgemri.nrrd", folder / "laendo.nrrd"
            raw, spacing, from_header = read_nrrd(image_path, "NRRD image", default_spacing)
            lab, _, _ = read_nrrd(label_path, "NRRD label", default_spacing)
            common.check_same_shape(raw, lab, image_path, label_path)
            common.check_labels(lab, (0, 255), label_path)
            label = (lab == 255).astype(np.uint8)
            image = common.zscore(raw.astype(np.float32), image_path)
            box = common.crop_around_label(label, margin, min_size, label_path)
            meta = {"patient_id": cid, "crop_start_zyx": [s.start for s in box],
                    "crop_stop_zyx": [s.stop for s in box], "original_shape_zyx": list(raw.shape),
                    "spacing_from_header": int(from_header), "source": str(image_path.relative_to(raw_dir))}
            write_case(root / "cases" / f"{cid}.h5", Case(cid, image[box], label[box], spacing, meta), len(CLASSES))
        split = common.assign_splits(cases, {"train": UAMT_TRAIN, "test": UAMT_TEST}, {"test": 0.2, "train": 0.8},
                                     "LA: cases on neither UA-MT list")
        written = common.write_suite(
            root, split, common.count_budgets(budgets), converter=NAME, digest=digest, options=options, classes=CLASSES,
            split_rule="UA-MT 80/20 lists, val = seeded 10% of train; other cases seeded 80/20",
            name="la", spatial_dims=3, patch_size=PATCH, default_budget=max(1, min(8, len(split["train"]))),
            default_iters=15000, intensity="zscore",
            description="LA LGE-MRI (2018 challenge), cropped around the atrium, z-scored (UA-MT lists)")
        print(f"LA: train/val/test {common.split_sizes(split)} (expected 72/8/20); "
              f"labeled lists for budgets {written} x seeds 0-4")

    return common.publish(out_dir, NAME, digest, build, force)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python data_scripts/prepare_la.py RAW_DIR OUT_DIR [options]``."""
    p = common.parser(__doc__, NAME, budgets=BUDGETS, of="cases")
    common.add_crop_options(p, margin=15, min_size=112, around="the atrium")
    p.add_argument("--default-spacing", type=float, default=0.625, help="mm per voxel if the header has none")
    return common.run_main(prepare, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
