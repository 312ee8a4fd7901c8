"""Embedded synthetic suites: fetal-head ultrasound, cardiac cine MRI, left-atrium LGE-MRI.

Each suite is generated deterministically from a seed (case ``i`` draws from
``numpy.random.default_rng([seed, suite_key, i])``), written in the store format (``store.py``) and
cached under ``$MINISSL_DATA`` (default ``~/.cache/minissl/suites``) as ``<name>-v<VERSION>-s<seed>``.

What makes unlabeled data useful in real data is that every case has its own acquisition and its own
anatomy. So every case here draws, from broad distributions, its gain / contrast / noise level /
bias field / blur / artefacts and its size / shape / pose, and each suite has distractors that look
like the target. The levels (stated in each generator's docstring) follow the modality's literature.
Splits are i.i.d. draws: a small labeled budget cannot cover the variation seen in the unlabeled
pool and in the test split.

    >>> root = make_suite("fetal_head")          # ~1 s the first time, then cached
    >>> SUITES["cardiac"].patch_size
    (64, 64)
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .store import Case, SuiteSpec, write_case, write_store

VERSION = 2
GENERATOR_PREFIX = "minissl.data.phantoms."  # suite.json 'generator' of the folders written here

SUITES: dict[str, SuiteSpec] = {
    "fetal_head": SuiteSpec(
        name="fetal_head", spatial_dims=2, num_classes=2, patch_size=(64, 64), n_train=60, n_val=20, n_test=40,
        default_budget=6, default_iters=600, class_names=("background", "head"),
        description="2D fetal-head ultrasound: speckled skull ellipse, shadows, dropout, distractor echoes "
                    "(HC18-like; pixel size in mm for head circumference)"),
    "cardiac": SuiteSpec(
        name="cardiac", spatial_dims=2, num_classes=4, patch_size=(64, 64), n_train=40, n_val=10, n_test=20,
        default_budget=4, default_iters=600, class_names=("background", "RV", "MYO", "LV"),
        description="2D short-axis cine MRI (bSSFP): stacks of 6-10 slices base to apex, RV/MYO/LV (ACDC-like)"),
    "atrium": SuiteSpec(
        name="atrium", spatial_dims=3, num_classes=2, patch_size=(16, 32, 32), n_train=20, n_val=8, n_test=16,
        default_budget=2, default_iters=1000, class_names=("background", "left atrium"),
        description="3D LGE-MRI: left-atrium blob with pulmonary-vein stubs, aorta and LV distractors (LA-like)"),
}
_KEYS = {"fetal_head": 1, "cardiac": 2, "atrium": 3}


# ----------------------------------------------------------------------------- shared helpers
def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 4) -> np.ndarray:
    """Smooth random field of unit standard deviation: Gaussian bumps centred on a coarse random grid.

    Args:
        rng: random generator.
        shape: output shape (2D or 3D).
        cells: coarse-grid cells per axis (larger = finer structure).

    Returns:
        float64 array of ``shape``, zero mean, unit std.
    """
    f = rng.standard_normal(tuple(cells + 2 for _ in shape))
    for axis, n in enumerate(shape):  # separable: one (n, cells + 2) weight matrix per axis
        pos = np.linspace(0.5, cells + 0.5, n)[:, None] - np.arange(cells + 2)[None]
        w = np.exp(-0.5 * (pos / 0.7) ** 2)
        f = np.moveaxis(np.tensordot(w / w.sum(1, keepdims=True), np.moveaxis(f, axis, 0), axes=1), 0, axis)
    return (f - f.mean()) / (f.std() + 1e-12)


def ellipse_coords(x: np.ndarray, y: np.ndarray, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in an ellipse frame (contract of ``ops.ellipse_mask``): major axis at angle theta from +x to +y."""
    c, s = np.cos(theta), np.sin(theta)
    return (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex MR signal with i.i.d. Gaussian noise (std ``sigma``) in both channels."""
    return np.hypot(signal + sigma * rng.standard_normal(signal.shape), sigma * rng.standard_normal(signal.shape))


def _soft(d: np.ndarray, width: float = 0.7) -> np.ndarray:
    """Partial-volume step: ~1 where the signed distance d < 0 (inside), ~0 outside."""
    return 1.0 / (1.0 + np.exp(np.clip(d / max(width, 1e-3), -30, 30)))


def _ramanujan(a: float, b: float) -> float:
    h = (a - b) ** 2 / (a + b) ** 2
    return float(np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))))


# ----------------------------------------------------------------------------- fetal head (2D US)
def fetal_head_case(rng: np.random.Generator, case_id: str, size: int = 64) -> Case:
    """One 2D fetal-head ultrasound image (B-mode, transabdominal, HC plane), binary head label.

    Imaging model (envelope detection of a complex scattering field, then log compression):
    amplitude reflectivity map A(x) (dB values below) -> complex circular Gaussian scatterers
    z = A * n, n ~ CN(0, 1) (fully developed speckle, Burckhardt 1978) -> anisotropic Gaussian PSF
    (axial sigma 0.5-0.9 px, lateral 0.9-1.8 px: lateral resolution 1.5-3x the axial one) ->
    envelope |z| (Rayleigh; point SNR mean/std = 1.91 in homogeneous tissue, Wagner et al. 1983) ->
    electronic noise floor at -50 to -40 dB -> gain -6..+6 dB and imperfect TGC (residual depth slope
    -8..+6 dB over the image) -> log compression to a dynamic range of 45-60 dB (log-compressed
    speckle std 5.6 dB, i.e. 0.09-0.12 of the display range) -> sector (fan) mask.

    Echo levels (dB re skull): skull (bone, specular, angle dependent: x(0.25 + 0.75 |cos i|^1.5)
    for incidence angle i, so lateral skull segments are up to 12 dB weaker) -10..0 per case
    (ossification, probe angle); falx/midline
    -22..-14; near-field abdominal-wall layers -16..-8; placenta -16..-10; uterine/maternal soft
    tissue -30..-20 (+-2.5 dB texture); brain parenchyma -38..-28 (skull-to-brain contrast 28-38 dB,
    bone-soft tissue reflection ~ -6 dB vs ~ -40 dB soft-soft interfaces); amniotic fluid, bladder,
    cavum septi pellucidi -50..-40 (anechoic). Artefacts: 1-4 boundary dropout arcs (20-70 deg,
    -20..-10 dB), 0-3 acoustic shadow wedges (4-14 deg wide, -20..-6 dB) behind the near skull or a
    rib/limb; display map gamma 0.7-1.5 (scanner presets). Distractors: 1-2 ellipse-like echoes
    beside the head, of head-like size (0.6-1.15 a): a fetal abdomen section (interior -34..-24 dB,
    rib rim -10..0 dB as bright as the skull, stomach bubble, spine echo) or the maternal bladder
    (anechoic, wall -14..-4 dB); a placenta arc (p = 0.5).

    Anatomy: head centre anywhere leaving the skull inside the fan, angle uniform in [0, pi), semi-major
    axis 0.16-0.36 of the image, axis ratio b/a in [0.7, 0.95]; skull thickness 1.2-2.6 px inside the
    label boundary (HC18 annotates the outer skull ellipse). Head circumference HC ~ U(150, 350) mm sets
    the pixel size: ``pixel_size_mm = HC / Ramanujan perimeter in px``.

    Args:
        rng: the case's random generator.
        case_id: id of the case.
        size: image side (pixels).

    Returns:
        Case with image float32 (size, size) in [0, 1], label uint8 filled ellipse, spacing (ps, ps),
        meta patient_id, pixel_size_mm, hc_mm, ellipse (cx, cy, a, b, theta in px, as ops.fit_ellipse).
    """
    S = size
    y, x = np.mgrid[0:S, 0:S].astype(np.float64)
    u = rng.uniform
    db = lambda v: 10.0 ** (np.asarray(v) / 20.0)  # noqa: E731  amplitude from dB

    # probe geometry: convex array, apex above the image
    apex = np.array([S / 2 + u(-0.1, 0.1) * S, -u(0.25, 0.5) * S])
    half = np.deg2rad(u(32, 45))
    rx, ry = x - apex[0], y - apex[1]
    depth = np.hypot(rx, ry)
    phi = np.arctan2(rx, ry)
    r_min = depth[0].min() + u(0.0, 0.06) * S
    fan = (np.abs(phi) <= half) & (depth >= r_min)

    # anatomy: head ellipse
    a = u(0.16, 0.36) * S
    b = a * u(0.70, 0.95)
    theta = u(0.0, np.pi)
    for _ in range(20):
        cx, cy = u(0.9 * a, S - 0.9 * a), u(0.9 * a, S - 0.9 * a)
        ang = np.arctan2(cx - apex[0], cy - apex[1])
        if abs(ang) < half - 0.1:
            break
    xe, ye = ellipse_coords(x, y, cx, cy, theta)
    d = (xe / a) ** 2 + (ye / b) ** 2
    label = (d <= 1.0).astype(np.uint8)
    rho = np.sqrt(d) + 1e-9
    dist_c = np.hypot(xe, ye)
    r_boundary = dist_c / rho  # px from the centre to the boundary along the ray
    depth_in = r_boundary - dist_c  # >0 inside: distance to the boundary along the ray

    # reflectivity (dB re skull)
    tissue_db = u(-30, -20) + 2.5 * smooth_field(rng, (S, S), 5)
    amp = db(tissue_db)
    # abdominal wall layers near the probe
    layers = np.sin(depth / u(1.5, 3.0) + u(0, 6.3)) > 0.6
    near = depth < r_min + u(0.05, 0.15) * S
    amp = np.where(near & layers, db(u(-16, -8)), amp)
    # amniotic fluid around the head (irregular)
    fluid_margin = u(0.1, 0.6) + 0.15 * smooth_field(rng, (S, S), 3)
    fluid = rho < 1.0 + fluid_margin
    # distractors (placed outside the head, the head occludes them)
    for _ in range(int(rng.integers(1, 3))):  # ellipse-like echoes: fetal abdomen / limb section or bladder
        a2 = a * u(0.6, 1.15)
        b2 = a2 * u(0.6, 0.95)
        side = u(0, 2 * np.pi)
        dist2 = (a + a2) * u(0.75, 1.2)
        c2 = (cx + dist2 * np.cos(side), cy + dist2 * np.sin(side))
        t2 = u(0, np.pi)
        x2, y2 = ellipse_coords(x, y, c2[0], c2[1], t2)
        rho2 = np.sqrt((x2 / a2) ** 2 + (y2 / b2) ** 2)
        rim = np.abs(rho2 - 1.0) * np.sqrt(a2 * b2) < u(0.7, 1.8)
        inside2 = rho2 < 1.0
        if u() < 0.6:  # abdomen: mid-level interior, ribs/spine rim as bright as a thin skull, stomach bubble
            amp = np.where(inside2, db(u(-34, -24) + 2.0 * smooth_field(rng, (S, S), 6)), amp)
            amp = np.where(rim, db(u(-10, 0)), amp)
            sa = u(-np.pi, np.pi)
            stomach = np.hypot(x2 - 0.35 * a2 * np.cos(sa), y2 - 0.35 * b2 * np.sin(sa)) < u(0.15, 0.3) * b2
            amp = np.where(stomach & inside2, db(u(-50, -40)), amp)
            spine = np.hypot(x2 + 0.8 * a2 * np.cos(sa), y2 + 0.8 * b2 * np.sin(sa)) < u(0.1, 0.18) * b2
            amp = np.where(spine, db(u(-4, 0)), amp)
        else:  # bladder: anechoic interior, bright wall
            amp = np.where(inside2, db(u(-50, -40)), amp)
            amp = np.where(rim, db(u(-14, -4)), amp)
        fluid &= ~(inside2 | rim)
    if u() < 0.5:  # placenta: a thick granular arc
        R = u(0.8, 1.6) * S
        pc = np.array([cx, cy]) + R * np.array([np.cos(t := u(0, 2 * np.pi)), np.sin(t)])
        dd = np.hypot(x - pc[0], y - pc[1])
        band = (dd > R - a - u(0.25, 0.45) * a * 1.5) & (dd < R - a - 0.1 * a)
        amp = np.where(band, db(u(-16, -10) + 3 * smooth_field(rng, (S, S), 8)), amp)
        fluid &= ~band
    amp = np.where(fluid, db(u(-50, -40)), amp)
    # head interior: brain, midline (falx), cavum septi pellucidi, thalami
    brain = db(u(-38, -28) + 2.0 * smooth_field(rng, (S, S), 6))
    falx = (np.abs(ye) < 0.7) & (np.abs(xe) < 0.85 * a)
    csp = (np.abs(ye) < 0.09 * b) & (xe > 0.15 * a) & (xe < 0.4 * a)
    thal = ((xe + 0.05 * a) / (0.22 * a)) ** 2 + (np.abs(ye) - 0.22 * b) ** 2 / (0.16 * b) ** 2 < 1
    inner = np.where(falx, db(u(-22, -14)), brain)
    inner = np.where(thal, brain * db(-4), inner)
    inner = np.where(csp, db(-45), inner)
    amp = np.where(d < 1.0, inner, amp)
    # skull: bright band inside the boundary, specular (angle-dependent), with dropout arcs
    thick = u(1.2, 2.6)
    skull = (depth_in >= -0.3) & (depth_in <= thick)
    gx, gy = xe / a ** 2, ye / b ** 2  # normal in the ellipse frame
    nx = gx * np.cos(theta) - gy * np.sin(theta)
    ny = gx * np.sin(theta) + gy * np.cos(theta)
    cos_i = np.abs(nx * rx + ny * ry) / (np.hypot(nx, ny) * depth + 1e-9)
    skull_amp = db(u(-10, 0)) * (0.25 + 0.75 * cos_i ** 1.5)
    par = np.arctan2(ye / b, xe / a)
    for _ in range(rng.integers(1, 5)):
        c0, w = u(-np.pi, np.pi), np.deg2rad(u(20, 70))
        dphi = np.angle(np.exp(1j * (par - c0)))
        skull_amp = skull_amp * np.where(np.abs(dphi) < w / 2, db(u(-20, -10)), 1.0)
    amp = np.where(skull, skull_amp, amp)
    # acoustic shadows (wedges in fan angle), behind the near skull or anywhere
    for _ in range(rng.integers(0, 4)):
        c0, w = u(-half, half), np.deg2rad(u(4, 14))
        start = np.hypot(cx - apex[0], cy - apex[1]) - a if u() < 0.6 else u(r_min, r_min + S)
        amp = amp * np.where((np.abs(phi - c0) < w / 2) & (depth > start), db(u(-20, -6)), 1.0)

    # acquisition: speckle, PSF, noise floor, gain, TGC residue, log compression
    n = (rng.standard_normal((2, S, S)) / np.sqrt(2.0)) * amp
    sig = (u(0.5, 0.9), u(0.9, 1.8))  # (axial = rows, lateral = columns)
    delta = np.zeros((15, 15))
    delta[7, 7] = 1.0
    norm = np.sqrt((ndi.gaussian_filter(delta, sig) ** 2).sum())
    z = np.stack([ndi.gaussian_filter(c, sig) for c in n]) / norm
    floor = db(u(-50, -40)) * rng.standard_normal((2, S, S)) / np.sqrt(2.0)
    env = np.hypot(z[0] + floor[0], z[1] + floor[1])
    gain_db = u(-6, 6) + u(-8, 6) * (depth - r_min) / S
    dr = u(45, 60)
    img = (20 * np.log10(env + 1e-6) + gain_db + dr) / dr
    img = ndi.gaussian_filter(np.clip(img, 0, 1), u(0.2, 0.5)) ** u(0.7, 1.5)  # scan conversion, display map
    img = np.where(fan, img, 0.0).astype(np.float32)

    hc_mm = u(150, 350)
    ps = hc_mm / _ramanujan(a, b)
    meta = {"patient_id": case_id, "pixel_size_mm": ps, "hc_mm": hc_mm,
            "ellipse": np.array([cx, cy, a, b, theta])}
    return Case(case_id, img, label, (ps, ps), meta)


# ----------------------------------------------------------------------------- cardiac (2D cine MRI)
def cardiac_case(rng: np.random.Generator, case_id: str, size: int = 64) -> Case:
    """One short-axis cine-MRI stack (bSSFP), base to apex, labels 0 BG, 1 RV, 2 MYO, 3 LV.

    Intensities (units of blood-pool signal, bSSFP, 1.5 T): blood 1.0; myocardium 0.22-0.45 (blood /
    myocardium ratio 2.2-4.5, typical of bSSFP where blood-myocardium CNR is high); epicardial /
    pericardial / subcutaneous fat 0.8-1.1 (as bright as blood: the classic distractor); liver
    0.3-0.5; chest wall / muscle 0.2-0.35; lung 0.03-0.1; air 0. Noise: Rician (magnitude of complex
    Gaussian) with blood SNR 12-45 (reported blood SNR of cine bSSFP at 1.5 T is ~20-60, CNR
    blood-myocardium ~15-40; the low end models fast / parallel-imaging acquisitions). Multiplicative
    bias field (surface-coil shading) exp(s * f), s in 0.1-0.45; in-plane blur sigma 0.3-0.9 px;
    breath-hold misregistration: per-slice heart shift N(0, 0.8 px); per-case display gamma 0.75-1.35.
    Normalisation as SSL4MIS ACDC: the stack is divided by its 99.5th percentile and clipped to [0, 1].

    Anatomy: 6-10 slices at positions s = 0 (base) .. 0.85-1 (apex); LV endocardial radius at base
    20-30 mm at end-diastole (ED), x0.6-0.8 at end-systole (ES), wall x1.25-1.5 at ES, shrinking
    as sqrt(1 - (s/1.08)^2.2) towards the apex; wall 7-11 mm at ED; LV slightly elliptic with 2nd/3rd-order shape
    harmonics; papillary muscles (labeled LV, as in ACDC); RV a crescent wrapping the septum, shrinking
    to nothing at s 0.65-0.95; heart rotated +-25 deg; distractors: 1-3 epicardial fat pads beside the
    heart, descending aorta (bright disk), liver dome in apical slices, subcutaneous fat ring. In-plane
    pixel 1.8-2.6 mm (a 64 px image is a 115-165 mm field of view around the heart), slice
    spacing 8-10 mm.

    Returns:
        Case with image float32 (Z, size, size) in [0, 1], label uint8 (Z, size, size), spacing
        (dz, ps, ps), meta patient_id, phase ('ED'/'ES'), slice_positions (Z,) in [0, 1] base->apex.
    """
    S = size
    u = rng.uniform
    Z = int(rng.integers(6, 11))
    s = np.linspace(0.0, u(0.85, 1.0), Z)
    ps = u(1.8, 2.6)
    dz = u(8.0, 10.0)
    ed = bool(u() < 0.5)
    y, x = np.mgrid[0:S, 0:S].astype(np.float64)
    y, x = y[None], x[None]
    sz = s[:, None, None]

    # intensities (units of blood)
    I_blood, I_myo, I_fat = 1.0, u(0.22, 0.45), u(0.8, 1.1)
    I_liver, I_tis, I_lung = u(0.3, 0.5), u(0.2, 0.35), u(0.03, 0.1)

    # body, subcutaneous fat, lungs
    img = np.zeros((Z, S, S))
    bx, by = S / 2 + u(-3, 3), S / 2 + u(-3, 3)
    ba, bb = u(0.65, 0.9) * S, u(0.5, 0.7) * S
    rb = np.sqrt(((x - bx) / ba) ** 2 + ((y - by) / bb) ** 2)
    img += _soft((rb - 1.0) * bb) * I_fat
    img += _soft((rb - 1.0) * bb + u(1.5, 3.5)) * (I_tis - I_fat)
    tex = 1.0 + 0.08 * smooth_field(rng, (S, S), 8)[None]
    img = img * tex
    # heart pose
    cx0, cy0 = S / 2 + u(-5, 5), S / 2 + u(-5, 5)
    shift = rng.normal(0.0, 0.8, (Z, 2, 1, 1))
    cx, cy = cx0 + shift[:, 0], cy0 + shift[:, 1]
    rot = np.deg2rad(u(-25, 25))
    for side in (-1, 1):  # lungs left/right of the heart
        lx = cx0 + side * u(0.28, 0.38) * S
        ly = cy0 + u(-0.05, 0.12) * S
        rl = np.sqrt(((x - lx) / (u(0.13, 0.2) * S)) ** 2 + ((y - ly) / (u(0.22, 0.32) * S)) ** 2)
        img = img + _soft((rl - 1.0) * 8) * (I_lung - img) * (rb < 0.95)
    # liver: appears towards the apex, bottom left of the image
    lvx, lvy = cx0 - u(0.1, 0.25) * S, cy0 + u(0.3, 0.45) * S
    r_liv = u(0.25, 0.35) * S * (0.4 + 0.8 * sz)
    rl = np.hypot(x - lvx, y - lvy)
    img = img + _soft(rl - r_liv) * (I_liver - img) * (rb < 0.9)
    lab = np.zeros((Z, S, S), np.uint8)

    # LV geometry per slice
    r_endo0 = u(20.0, 30.0) / ps * (1.0 if ed else u(0.6, 0.8))
    wall0 = u(7.0, 11.0) / ps * (1.0 if ed else u(1.25, 1.5))
    prof = np.sqrt(np.clip(1.0 - (sz / 1.08) ** 2.2, 0.0, 1.0))
    r_endo = r_endo0 * prof * 0.95
    r_epi = r_endo + wall0 * (1.0 - 0.25 * sz)
    ecc, lv_ang = u(0.85, 1.0), u(0, np.pi)
    xe, ye = ellipse_coords(x, y, cx, cy, lv_ang)
    alpha = np.arctan2(ye, xe)
    rr = np.hypot(xe, ye / ecc)
    harm = 1.0 + sum(u(0.0, 0.05) * np.cos(k * alpha + u(0, 6.3)) for k in (2, 3))
    d_epi = rr - r_epi * harm
    d_endo = rr - r_endo * harm
    # RV crescent
    rv_dir = np.pi + rot + np.deg2rad(u(-20, 10))
    rv_end = u(0.65, 0.95)
    g = np.clip(1.0 - sz / rv_end, 0.0, 1.0) ** 0.5
    r_epi_mean = (r_endo0 + wall0)
    off = r_epi_mean * u(0.5, 0.8) * g
    rvx, rvy = cx + off * np.cos(rv_dir), cy + off * np.sin(rv_dir)
    xr, yr = ellipse_coords(x, y, rvx, rvy, rv_dir)
    rv_a = r_epi_mean * u(1.0, 1.3) * g + 1e-3
    rv_b = r_epi_mean * u(1.3, 1.6) * g + 1e-3
    rho_rv = np.sqrt((xr / rv_a) ** 2 + (yr / rv_b) ** 2)
    d_rv = (rho_rv - 1.0) * np.minimum(rv_a, rv_b)
    rv_cav = (d_rv <= 0) & (d_epi > 0) & (g > 0.05)
    rv_wall = (d_rv <= 1.2) & (d_epi > 0) & ~rv_cav & (g > 0.05)

    # fat pads and aorta (distractors), drawn before the heart so the heart occludes them
    for _ in range(rng.integers(1, 4)):
        fa = u(0, 2 * np.pi)
        rad = u(1.5, 3.5)
        fx, fy = cx + (r_epi + rad * 0.8) * np.cos(fa), cy + (r_epi + rad * 0.8) * np.sin(fa)
        img = img + _soft(np.hypot(x - fx, y - fy) - rad) * (I_fat - img)
    a_ang = rot + np.deg2rad(u(20, 70))  # descending aorta: posterior-right of the LV in the image
    ao_r = u(8.0, 12.0) / ps
    ao_d = r_endo0 + wall0 + ao_r + u(3, 8)
    ax_, ay_ = cx0 + ao_d * np.cos(a_ang), cy0 + ao_d * np.sin(a_ang)
    img = img + _soft(np.hypot(x - ax_, y - ay_) - ao_r) * (I_blood - img)
    # heart: RV wall, RV blood, myocardium, LV blood, papillary muscles
    img = np.where(rv_wall, I_myo, img)
    img = np.where(rv_cav, I_blood * (1.0 - 0.15 * (rng.random((Z, S, S)) < 0.08)), img)
    img = img + _soft(d_epi) * (I_myo - img)
    img = img + _soft(d_endo) * (I_blood - img)
    for pa in (u(0.6, 1.2), u(-1.2, -0.6)):
        ang = lv_ang + np.pi / 2 + pa
        pr = np.maximum(r_endo * 0.7, 0.0)
        px, py = cx + pr * np.cos(ang), cy + pr * np.sin(ang)
        prad = u(1.0, 1.8) * (r_endo > 3)
        img = img + _soft(np.hypot(x - px, y - py) - prad, 0.5) * (I_myo - img) * (d_endo < 0)
    lab[rv_cav] = 1
    lab[d_epi <= 0] = 2
    lab[d_endo <= 0] = 3

    # acquisition: blur, bias field, Rician noise, normalisation, gamma
    img = ndi.gaussian_filter(img, (0, u(0.3, 0.9), u(0.3, 0.9)))
    bias = np.exp(u(0.1, 0.45) * (smooth_field(rng, (S, S), 2)[None] + 0.3 * smooth_field(rng, (Z, S, S), 2)))
    img = img * bias * u(0.5, 2.0)
    sigma = img[lab == 3].mean() / u(12.0, 45.0) if (lab == 3).any() else 0.05
    img = rician(img, sigma, rng)
    img = np.clip(img / np.percentile(img, 99.5), 0.0, 1.0) ** u(0.75, 1.35)
    meta = {"patient_id": case_id, "phase": "ED" if ed else "ES", "slice_positions": s}
    return Case(case_id, img.astype(np.float32), lab, (dz, ps, ps), meta)


# ----------------------------------------------------------------------------- atrium (3D LGE-MRI)
def _tube_distance(shape: tuple[int, ...], path: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every voxel to a polyline ``path`` (K, 3), and the arclength fraction of the nearest point.

    Only voxels within ``reach`` of the path's bounding box are computed; the others get distance inf.
    """
    lo = np.maximum(np.floor(path.min(0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(path.max(0) + reach) + 1, shape).astype(int)
    dist, frac = np.full(shape, np.inf), np.zeros(shape)
    if np.any(hi <= lo):
        return dist, frac
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pts = np.stack([g.ravel() for g in np.mgrid[box]], 1).astype(np.float64)  # (N, 3)
    a, ab = path[:-1], np.diff(path, axis=0)  # (K-1, 3)
    t = np.clip(((pts[:, None] - a[None]) * ab[None]).sum(-1) / (ab ** 2).sum(-1)[None], 0.0, 1.0)  # (N, K-1)
    dd = np.sqrt(((pts[:, None] - (a[None] + t[..., None] * ab[None])) ** 2).sum(-1))
    k = dd.argmin(1)
    sub = dist[box].shape
    dist[box] = dd.min(1).reshape(sub)
    frac[box] = ((k + t[np.arange(len(pts)), k]) / (len(path) - 1)).reshape(sub)
    return dist, frac


def atrium_case(rng: np.random.Generator, case_id: str, shape: tuple[int, int, int] = (32, 48, 48)) -> Case:
    """One 3D LGE-MRI-like volume of the left atrium (LA) with pulmonary-vein stubs, binary label.

    Intensities (units of blood pool, inversion-recovery LGE ~20 min after gadolinium): LA / LV /
    aortic blood 1.0; healthy myocardium (nulled) 0.1-0.3; enhanced atrial-wall fibrosis patches
    1.2-1.6; epicardial / paraspinal fat 0.8-1.3; mediastinal soft tissue 0.35-0.6 (blood-to-tissue
    contrast ratio 1.7-2.9, so the blood pool is only moderately conspicuous, as in the LA 2018
    challenge data); lung 0.05-0.15. Noise: Rician, blood SNR 6-20 (LGE-MRI of the atria is
    SNR-limited; reported blood SNR ~10-30 at 1.5 T with 1.25 mm voxels); bias field exp(s f),
    s 0.15-0.5 (strong surface-coil shading); blur sigma 0.4-0.9 voxel in-plane, 1.2-1.6x that
    through-plane. Normalised per volume to zero mean, unit std (as ``mri_norm2`` in SSL4MIS).

    Anatomy (2.5 mm isotropic voxels): LA a deformed ellipsoid, semi-axes 6.5-9 (z) x 8-11.5 (y) x
    9-13 (x) voxels (LA diameters 35-65 mm), rotated +-25 deg, four random surface harmonics
    (amplitude 4-10 %); 2-4 pulmonary veins leaving posteriorly / laterally (radius 1.2-2.2 voxels,
    labeled for the first 3-6 voxels, visible further: the ambiguous ostium cut of real annotations);
    a left atrial appendage stub (labeled); a thin nulled wall. Distractors: the LV blood pool beside
    the mitral plane (same brightness, separated by a thin dark wall), the descending aorta (bright
    tube behind the LA) and the ascending aorta (in front), paraspinal fat.

    Returns:
        Case with image float32 (Z, Y, X), label uint8, spacing (2.5, 2.5, 2.5), meta patient_id.
    """
    u = rng.uniform
    D, H, W = shape
    zz, yy, xx = np.mgrid[0:D, 0:H, 0:W].astype(np.float64)
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)  # (N, 3)
    I_myo, I_fat, I_tis, I_lung = u(0.1, 0.3), u(0.8, 1.3), u(0.35, 0.6), u(0.05, 0.15)

    # background: tissue, lungs left and right, paraspinal fat
    img = I_tis * (1.0 + 0.1 * smooth_field(rng, shape, 5))
    for side in (-1, 1):
        lung_c = np.array([D / 2, H * u(0.45, 0.6), W / 2 + side * W * u(0.42, 0.5)])
        r = np.sqrt((((pts - lung_c) / np.array([D, H * 0.35, W * 0.18])) ** 2).sum(1)).reshape(shape)
        img = img + _soft((r - 1.0) * 6) * (I_lung - img)
    spine = np.hypot((yy - H * u(0.9, 1.0)) / 6.0, (xx - W / 2 - u(-3, 3)) / 5.0)
    img = img + _soft((spine - 1.0) * 5) * (I_fat - img)

    # LA body
    c = np.array([D / 2 + u(-2, 2), H / 2 + u(-3, 3), W / 2 + u(-3, 3)])
    semi = np.array([u(6.5, 9.0), u(8.0, 11.5), u(9.0, 13.0)])
    angs = np.deg2rad(u(-25, 25, 3))
    R = _rotation(angs)
    q = (pts - c) @ R.T / semi  # (N, 3) ellipsoid frame, unit sphere = surface
    rq = np.linalg.norm(q, axis=1) + 1e-9
    dirs = q / rq[:, None]
    mod = np.ones(len(pts))
    for _ in range(4):
        w = rng.normal(size=3)
        mod += u(0.04, 0.10) * np.cos(u(1.0, 2.5) * np.pi * dirs @ (w / np.linalg.norm(w)) + u(0, 6.3))
    d_la = ((rq - mod) * semi.min()).reshape(shape)  # approx signed distance in voxels
    label = d_la <= 0

    # veins (labeled near the ostium) and appendage (labeled)
    blood = label.copy()
    n_veins = int(rng.integers(2, 5))
    for k in range(n_veins + 1):
        appendage = k == n_veins
        if appendage:
            v = np.array([u(-0.2, 0.3), -u(0.6, 1.0), u(0.5, 0.9)])  # anterior-left
        else:
            v = np.array([u(-0.7, 0.7), u(0.5, 1.0), (1 if k % 2 else -1) * u(0.4, 1.0)])  # posterior, lateral
        v = v / np.linalg.norm(v)
        bend = rng.normal(0, 0.3, 3)
        start = c + v * semi * 0.6
        length_lab = u(3.0, 6.0) + 0.5 * np.linalg.norm(v * semi)  # from the start to the ostium cut
        length = length_lab + (u(0.5, 2.5) if appendage else u(4.0, 10.0))
        t = np.linspace(0, 1, 7)[:, None]
        path = start + t * length * v + (t ** 2) * length * 0.5 * bend
        rad = u(1.3, 2.2) if not appendage else u(1.8, 2.6)
        dist, frac = _tube_distance(shape, path, rad + 1)
        tube = dist <= rad
        blood |= tube
        label |= tube & (frac * length <= length_lab)
    # wall (nulled myocardium) with enhanced patches
    wall = ndi.binary_dilation(blood) & ~blood
    img = np.where(wall, I_myo, img)
    patches = (smooth_field(rng, shape, 6) > u(1.0, 2.0)) & wall
    img = np.where(patches, u(1.2, 1.6), img)

    # distractors: LV blood pool (antero-inferior, beyond the mitral plane), aortas
    lv_c = c + np.array([-u(5, 8), -u(7, 11), u(2, 6)])
    lv_semi = np.array([u(6, 9), u(7, 10), u(7, 10)])
    r_lv = np.linalg.norm((pts - lv_c) / lv_semi, axis=1).reshape(shape)
    near_blood = blood | wall
    lv_myo = (r_lv < 1.0 + 2.5 / lv_semi.min()) & ~near_blood
    img = np.where(lv_myo, I_myo, img)
    lv_blood = (r_lv < 1.0) & ~near_blood
    img = np.where(lv_blood, 1.0, img)
    for desc in (True, False):
        ao = c + (np.array([0, u(9, 14), u(-6, 2)]) if desc else np.array([0, -u(9, 13), u(-5, 3)]))
        tilt = rng.normal(0, 0.15, 3) * np.array([0, 1, 1])
        path = np.stack([ao + (zc - ao[0]) * (np.array([1, 0, 0]) + tilt) for zc in (-5.0, D + 5.0)])
        ao_r = u(2.5, 3.8) if desc else u(3.0, 4.5)
        dist, _ = _tube_distance(shape, path, ao_r + 1)
        tube = (dist <= ao_r) & ~near_blood
        img = np.where(ndi.binary_dilation(tube, iterations=1) & ~tube & ~blood & ~wall, I_myo * 1.5, img)
        img = np.where(tube, 1.0, img)
    img = np.where(blood, 1.0, img)

    # acquisition
    sig_xy = u(0.4, 0.9)
    img = ndi.gaussian_filter(img, (sig_xy * u(1.2, 1.6), sig_xy, sig_xy))
    img = img * np.exp(u(0.15, 0.5) * smooth_field(rng, shape, 2))
    img = rician(img * u(0.5, 2.0), img[label].mean() / u(6.0, 20.0), rng)
    img = (img - img.mean()) / img.std()
    return Case(case_id, img.astype(np.float32), label.astype(np.uint8), (2.5, 2.5, 2.5),
                {"patient_id": case_id})


def _rotation(angs: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix from three Euler angles (about z, y, x axes of (z, y, x) coordinates)."""
    out = np.eye(3)
    for axis, a in enumerate(angs):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = r @ out
    return out


GENERATORS: dict[str, Callable[[np.random.Generator, str], Case]] = {
    "fetal_head": fetal_head_case, "cardiac": cardiac_case, "atrium": atrium_case}


# ----------------------------------------------------------------------------- suites on disk
def suite_spec(name: str) -> SuiteSpec:
    """The spec of an embedded suite; the error lists the known suites."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: expected one of {sorted(SUITES)}")
    return SUITES[name]


def standard_budgets(spec: SuiteSpec) -> tuple[int, ...]:
    """Budgets whose labeled lists a suite folder holds (seeds 0-4): the default (10 %) and twice it."""
    return tuple(b for b in dict.fromkeys((spec.default_budget, 2 * spec.default_budget)) if b <= spec.n_train)


def cache_dir() -> Path:
    """Folder holding the generated suites: ``$MINISSL_DATA`` or ``~/.cache/minissl/suites``."""
    return Path(os.environ.get("MINISSL_DATA") or Path.home() / ".cache" / "minissl" / "suites")


def generate_case(name: str, index: int, seed: int = 0) -> Case:
    """Case ``index`` of suite ``name`` (deterministic; independent of the other cases)."""
    suite_spec(name)
    rng = np.random.default_rng([seed, _KEYS[name], index])
    return GENERATORS[name](rng, f"{name}_{index:04d}")


def make_suite(name: str, root: str | os.PathLike | None = None, seed: int = 0, force: bool = False,
               sizes: tuple[int, int, int] | None = None) -> Path:
    """Generate suite ``name`` in the store format (once; later calls return the cached folder).

    The folder holds the labeled lists of ``standard_budgets(spec)`` for seeds 0-4.

    Args:
        name: one of ``SUITES``.
        root: destination (default ``cache_dir() / f"{name}-v{VERSION}-s{seed}"``, plus
            ``-<train>-<val>-<test>`` when ``sizes`` is given).
        seed: generation seed (same seed -> identical cases and files).
        force: regenerate even when a complete suite is already there.
        sizes: (n_train, n_val, n_test) instead of the spec's (tiny suites for tests and CI);
            the default budget becomes 10 % of n_train, at least 2 (at most n_train).

    Returns:
        The store root (open it with ``sources.open_data``).

    Raises:
        ValueError: ``root`` is a file or a non-empty folder that ``make_suite`` did not write. Only a
            folder whose ``suite.json`` names this module as its ``generator`` (another version, seed or
            size) is ever replaced; the suite is built in a temporary sibling and renamed into place.
    """
    spec = suite_spec(name)
    if sizes is not None:
        n_tr, n_va, n_te = (int(v) for v in sizes)
        if n_tr < 1 or n_va < 0 or n_te < 0:
            raise ValueError(f"expected sizes (n_train >= 1, n_val >= 0, n_test >= 0), got {tuple(sizes)}")
        spec = replace(spec, n_train=n_tr, n_val=n_va, n_test=n_te,
                       default_budget=min(n_tr, max(2, round(0.1 * n_tr))))
    tag = "" if sizes is None else f"-{spec.n_train}-{spec.n_val}-{spec.n_test}"
    root = Path(root) if root is not None else cache_dir() / f"{name}-v{VERSION}-s{seed}{tag}"
    info = _written_by_minissl(root)
    if info is not None and not force and info.get("version") == VERSION and info.get("seed") == seed \
            and {k: info.get(k) for k in spec.to_dict()} == spec.to_dict():
        return root
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ids, spacing = [], None
    for i in range(spec.n_train + spec.n_val + spec.n_test):
        case = generate_case(name, i, seed)
        write_case(tmp / "cases" / f"{case.id}.h5", case, spec.num_classes)
        ids.append(case.id)
        spacing = spacing or case.spacing
    a, b = spec.n_train, spec.n_train + spec.n_val
    write_store(tmp, spec, {"train": ids[:a], "val": ids[a:b], "test": ids[b:]},
                {"spacing": list(spacing), "version": VERSION, "seed": seed,
                 "generator": f"{GENERATOR_PREFIX}{GENERATORS[name].__name__}"},
                budgets=standard_budgets(spec))
    _replace_dir(tmp, root)
    return root


def _written_by_minissl(root: Path, prefix: str = GENERATOR_PREFIX) -> dict | None:
    """The ``suite.json`` of a folder this module (or the module of ``prefix``) wrote, None for a
    missing or empty folder.

    Raises:
        ValueError: ``root`` is a file, or a non-empty folder that this module did not write (no
            ``suite.json`` whose ``generator`` starts with ``prefix``, or other entries than
            ``suite.json``, ``cases/`` and ``splits/``): it is never replaced.
    """
    if not root.exists():
        return None
    if not root.is_dir():
        raise ValueError(f"expected a folder for the suite, got a file at {root}; choose another --root")
    entries = {p.name for p in root.iterdir()}
    if not entries:
        return None
    refuse = (f"refusing to write the suite into {root}: the folder is not empty and was not written by "
              f"minissl ({{why}}); nothing was changed: choose an empty or new folder")
    try:
        info = json.loads((root / "suite.json").read_text())
    except (OSError, ValueError):
        raise ValueError(refuse.format(why="no readable suite.json")) from None
    if not (isinstance(info, dict) and str(info.get("generator", "")).startswith(prefix)):
        raise ValueError(refuse.format(why=f"suite.json has no 'generator' starting with {prefix!r}"))
    others = sorted(entries - {"suite.json", "cases", "splits"})
    if others:
        raise ValueError(refuse.format(why=f"it also holds {others[:5]}"))
    return info


def _replace_dir(new: Path, root: Path) -> None:
    """Move the finished folder ``new`` to ``root``, replacing a suite folder this module wrote."""
    root.parent.mkdir(parents=True, exist_ok=True)
    old = root.with_name(f".{root.name}.old{os.getpid()}")
    if root.exists():
        os.replace(root, old)
    try:
        os.replace(new, root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
