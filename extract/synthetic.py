"""Synthetic slides: tissue-like scenes at any pyramid scale and the demo cohort generator.

Slides are written by :mod:`extract.svs_writer` (real pyramidal Aperio-layout SVS files).

    write_large_svs("big.svs", 80_000, 60_000, mpp=0.25)    # tissue-like benchmark slide
    make_cohort("demo/", n_slides=24)                       # -> demo/manifest.csv
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .svs_writer import write_svs_tiles

__all__ = [
    "write_large_svs",
    "make_cohort",
    "TissueTexture",
]


# ---------------------------------------------------------------------------------------------
# Tissue-like scenes rendered at any pyramid scale
# ---------------------------------------------------------------------------------------------
_BACKGROUND = np.array([243, 243, 243], np.uint8)   # glass: saturation 0
_TEXTURE_PERIOD = 2048                              # level-0 px; divisible by 4**k up to 1024


class TissueTexture:
    """A seamless RGB texture tiled over level-0 pixels, with per-downsample copies.

    Parameters
    ----------
    image : uint8 ndarray ``[h, w, 3]``
        Any RGB image; it is cropped/tiled to ``_TEXTURE_PERIOD`` and mirrored so that the
        tiling has no seams.
    """

    def __init__(self, image: np.ndarray):
        import cv2

        image = np.asarray(image)[..., :3]
        half = _TEXTURE_PERIOD // 2
        if min(image.shape[:2]) < half:
            # Small images: mirror-tile (no seams) until one period fits.
            block = np.concatenate([image, image[:, ::-1]], 1)
            block = np.concatenate([block, block[::-1]], 0)
            reps = (math.ceil(half / block.shape[0]), math.ceil(half / block.shape[1]), 1)
            image = np.tile(block, reps)
        tile = np.ascontiguousarray(image[:half, :half])
        # Mirror into a 2x2 block: the texture is continuous across its own period.
        top = np.concatenate([tile, tile[:, ::-1]], 1)
        self._levels = {1: np.ascontiguousarray(np.concatenate([top, top[::-1]], 0))}
        self._cv2 = cv2

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TissueTexture":
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ConfigError(f"texture image {path} cannot be read (not found or not an image)")
        return cls(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def at(self, ds: int) -> np.ndarray:
        """The texture as seen at downsample ``ds`` (period ``_TEXTURE_PERIOD / ds`` pixels)."""
        if ds not in self._levels:
            p = max(1, round(_TEXTURE_PERIOD / ds))
            self._levels[ds] = self._cv2.resize(self._levels[1], (p, p), interpolation=self._cv2.INTER_AREA)
        return self._levels[ds]

    def strip(self, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[h, w, 3]`` of the infinite tiling at level ``ds``, starting at ``(x, y)``."""
        tex = self.at(ds)
        p = tex.shape[0]
        rows = tex[(y + np.arange(h)) % p]
        x0 = x % p
        reps = math.ceil((x0 + w) / p)
        return np.tile(rows, (1, reps, 1))[:, x0:x0 + w]


def _procedural_texture(kind: str, seed: int, size: int = 1024) -> np.ndarray:
    """H&E-like texture ``[size, size, 3]``: stroma with nuclei, or a lesion of dense nuclei."""
    import cv2

    rng = np.random.default_rng(seed)
    styles = {
        # base colour, base noise, nucleus colour, nuclei per megapixel, radius range, elongation
        "normal": ((236, 172, 204), 10, (118, 62, 152), 900, (2, 4), 1.6),
        "tumor": ((168, 96, 178), 12, (62, 22, 104), 5200, (4, 7), 1.3),
        "tumor_b": ((132, 128, 206), 12, (40, 44, 128), 3800, (3, 5), 3.2),
    }
    base, noise_amp, nucleus, density, (rmin, rmax), elong = styles[kind]
    # Smooth tone variation (stroma fibres, staining unevenness) from blurred noise.
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 6)
    noise /= noise.std() + 1e-6
    streaks = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigmaX=14, sigmaY=2)
    streaks /= streaks.std() + 1e-6
    img = np.array(base, np.float32)[None, None, :] + (noise_amp * noise + 6 * streaks)[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    n = int(density * size * size / 1e6)
    centres = rng.integers(0, size, (n, 2))
    radii = rng.uniform(rmin, rmax, n)
    angles = rng.uniform(0, 180, n)
    shade = rng.uniform(0.8, 1.15, n)
    for (cx, cy), r, a, s in zip(centres, radii, angles, shade):
        colour = tuple(int(min(255, c * s)) for c in nucleus)
        axes = (max(1, int(r * elong)), max(1, int(r)))
        cv2.ellipse(img, (int(cx), int(cy)), axes, float(a), 0, 360, colour, -1, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(img, (3, 3), 0)


@dataclass
class _Blob:
    """A star-shaped region: centre, radii, rotation and radial harmonics (level-0 px)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    harmonics: np.ndarray  # [k, 2]: amplitude, phase for k = 2, 3, ...

    def field(self, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        """Signed field on level-0 points: > 0 inside, 0 on the boundary, ~1 at the centre."""
        dx, dy = gx - self.cx, gy - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (dx * c + dy * s) / self.rx, (-dx * s + dy * c) / self.ry
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        wobble = np.ones_like(rho)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            wobble += amp * np.cos(k * theta + phase)
        return 1.0 - rho / wobble


def _random_blob(rng: np.random.Generator, cx: float, cy: float, r: float, wobble: float = 0.12) -> _Blob:
    aspect = rng.uniform(0.6, 1.0)
    harmonics = np.stack([rng.uniform(0, wobble, 4) / np.arange(1, 5), rng.uniform(0, 2 * np.pi, 4)], 1)
    return _Blob(cx, cy, r, r * aspect, rng.uniform(0, np.pi), harmonics)


class _Scene:
    """Tissue, holes and lesions as smooth fields on a coarse grid, rendered at any scale.

    Fields are sampled bilinearly and thresholded at 0, so region boundaries stay smooth at
    every pyramid level and every level shows the same geometry.
    """

    def __init__(self, size_wh, grid, tissue, holes, lesions, textures, offsets):
        self.size = (int(size_wh[0]), int(size_wh[1]))
        self.grid = int(grid)                 # level-0 px per field cell
        gw, gh = math.ceil(self.size[0] / grid), math.ceil(self.size[1] / grid)
        gx = (np.arange(gw) + 0.5) * grid
        gy = (np.arange(gh) + 0.5) * grid
        X, Y = np.meshgrid(gx, gy)

        def union(blobs):
            out = np.full((gh, gw), -1.0, np.float32)
            for b in blobs:
                np.maximum(out, b.field(X, Y), out=out)
            return out

        # Field stack: 0 = tissue, 1 = hole, 2.. = lesion classes.
        self.fields = np.stack([union(tissue), union(holes)] + [union(b) for b in lesions])
        self.textures = textures              # [tissue, lesion class 1, lesion class 2, ...]
        self.offsets = offsets                # per texture (ox, oy) level-0 px

    def sample(self, ds: int, x: int, y: int, w: int, h: int, sub: int = 1) -> np.ndarray:
        """Field values ``[F, ceil(h/sub), ceil(w/sub)]`` at level-``ds`` pixel centres."""
        g = self.grid
        ys = (y + np.arange(0, h, sub) + sub / 2) * ds / g - 0.5
        xs = (x + np.arange(0, w, sub) + sub / 2) * ds / g - 0.5
        F = self.fields
        gh, gw = F.shape[1:]
        iy = np.clip(np.floor(ys).astype(int), 0, gh - 1)
        fy = np.clip(ys - iy, 0, 1).astype(np.float32)
        iy1 = np.minimum(iy + 1, gh - 1)
        rows = F[:, iy] * (1 - fy)[None, :, None] + F[:, iy1] * fy[None, :, None]
        ix = np.clip(np.floor(xs).astype(int), 0, gw - 1)
        fx = np.clip(xs - ix, 0, 1).astype(np.float32)
        ix1 = np.minimum(ix + 1, gw - 1)
        return rows[:, :, ix] * (1 - fx) + rows[:, :, ix1] * fx

    def render(self, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB ``[h, w, 3]`` of the level with downsample ``ds`` (a :data:`extract.svs_writer.Render`)."""
        out = np.empty((h, w, 3), np.uint8)
        out[:] = _BACKGROUND
        # Evaluate the fields on 4 x 4 pixel blocks at full resolution (invisible at 2 um,
        # 16x less arithmetic), per pixel on reduced levels.
        sub = 4 if ds == 1 else (2 if ds <= 4 else 1)
        f = self.sample(ds, x, y, w, h, sub)
        tissue = (f[0] > 0) & (f[1] <= 0)
        if not tissue.any():
            return out
        layers = [tissue] + [tissue & (f[2 + k] > 0) for k in range(len(f) - 2)]
        if sub > 1:
            layers = [m.repeat(sub, 0).repeat(sub, 1)[:h, :w] for m in layers]
        # Only the columns that hold tissue get textured.
        cols = np.flatnonzero(layers[0].any(0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        region = out[:, c0:c1]
        layers = [m[:, c0:c1] for m in layers]
        for texture, (ox, oy), mask in zip(self.textures, self.offsets, layers):
            if texture is None or not mask.any():
                continue
            pixels = texture.strip(ds, (ox + x * ds) // ds + c0, (oy + y * ds) // ds, c1 - c0, h)
            np.copyto(region, pixels, where=mask[..., None])
        return out

    def mask(self, ds: int) -> np.ndarray:
        """Label image of the whole slide at downsample ``ds``: 0 glass, 1 tissue, 2 hole, 3+k lesion k."""
        w, h = math.ceil(self.size[0] / ds), math.ceil(self.size[1] / ds)
        f = self.sample(ds, 0, 0, w, h)
        label = np.zeros((h, w), np.uint8)
        inside = f[0] > 0
        label[inside] = 1
        label[inside & (f[1] > 0)] = 2
        for k in range(len(f) - 2):
            label[inside & (f[1] <= 0) & (f[2 + k] > 0)] = 3 + k
        return label


def _texture_or_procedural(texture, kind: str, seed: int) -> "TissueTexture":
    if isinstance(texture, TissueTexture):
        return texture
    if texture is not None:
        return TissueTexture.from_file(texture)
    return TissueTexture(_procedural_texture(kind, seed))


def _place_pieces(rng, size_wh, n_pieces, cover, wobble=0.12):
    """``n_pieces`` tissue blobs on a jittered grid covering about ``cover`` of the slide."""
    w, h = size_wh
    cols = math.ceil(math.sqrt(n_pieces * w / h))
    rows = math.ceil(n_pieces / cols)
    cw, ch = w / cols, h / rows
    cells = rng.permutation(rows * cols)[:n_pieces]
    # Area of one blob ~ pi r^2 * 0.8 (mean aspect); size r for the wanted cover, within the cell.
    r_cover = math.sqrt(cover * w * h / n_pieces / (math.pi * 0.8))
    blobs = []
    for cell in cells:
        r = min(r_cover * rng.uniform(0.8, 1.15), 0.45 * min(cw, ch))
        cx = (cell % cols + 0.5) * cw + rng.uniform(-1, 1) * max(0.0, cw / 2 - r * 1.15)
        cy = (cell // cols + 0.5) * ch + rng.uniform(-1, 1) * max(0.0, ch / 2 - r * 1.15)
        blobs.append(_random_blob(rng, cx, cy, r, wobble))
    return blobs


def _holes_in(rng, blob: _Blob, n: int, radius_px: tuple[float, float]) -> list[_Blob]:
    """Up to ``n`` holes entirely inside ``blob``; none where the blob is too small to hold one.

    The blob's boundary never comes closer to its centre than 0.75 x its minor radius (the
    harmonics sum to <= 0.25), so a hole within 0.65 x stays a hole, not a notch.
    """
    holes = []
    for _ in range(n):
        r = rng.uniform(*radius_px)
        reach = 0.65 * min(blob.rx, blob.ry) - r
        if reach < 0:
            continue
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0, reach)
        holes.append(_random_blob(rng, blob.cx + d * math.cos(a), blob.cy + d * math.sin(a), r, 0.06))
    return holes


def write_large_svs(
    path: str | os.PathLike,
    width: int,
    height: int,
    mpp: float,
    texture: str | os.PathLike | None = None,
    seed: int = 0,
    tile: int = 256,
    quality: int = 85,
) -> Path:
    """A big tissue-on-glass slide (benchmarks), written strip by strip, never whole in memory.

    A few tissue pieces (about a third of the glass) with holes, textured with ``texture``
    (a real H&E image, tiled) or a procedural H&E-like texture.

    Parameters
    ----------
    path : str or Path
    width, height : int
        Level-0 size in pixels (e.g. 80,000 x 60,000).
    mpp : float
        Level-0 microns per pixel.
    texture : str or Path, optional
        RGB image whose pixels fill the tissue.
    seed : int
        Layout and texture seed; same seed, same file.
    """
    rng = np.random.default_rng(seed)
    blobs = _place_pieces(rng, (width, height), int(rng.integers(3, 6)), cover=0.33)
    holes = [hole for b in blobs for hole in _holes_in(rng, b, int(rng.integers(1, 4)), (0.08 * b.ry, 0.18 * b.ry))]
    grid = max(8, min(64, min(width, height) // 256))
    scene = _Scene((width, height), grid, blobs, holes, [], [_texture_or_procedural(texture, "normal", seed)],
                   [tuple(int(v) for v in rng.integers(0, _TEXTURE_PERIOD, 2))])
    return write_svs_tiles(path, (width, height), scene.render, mpp, tile=tile, quality=quality)


# ---------------------------------------------------------------------------------------------
# Demo cohort
# ---------------------------------------------------------------------------------------------
CLASS_NAMES = {2: ("normal", "tumor"), 3: ("normal", "tumor_a", "tumor_b")}


def make_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 24,
    seed: int = 0,
    mpp: float = 0.5,
    n_classes: int = 2,
    size_px: tuple[int, int] = (6000, 4000),
    texture: str | os.PathLike | None = None,
    positive_fraction: float = 0.5,
) -> Path:
    """Generate a labelled cohort of small synthetic slides with lesion ground truth.

    Each slide: glass, 2-3 irregular tissue pieces (H&E-like texture, or the pixels of
    ``texture`` tiled), holes inside tissue, and on positive slides 1-3 lesions of a distinct
    texture (dense dark-purple nuclei; for ``n_classes=3`` class 2 has bluish elongated
    nuclei) together covering about 2-8 % of the tissue patches (256 px at 0.5 um/px).

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; receives ``slides/<id>.svs``, ``ground_truth/<id>.json`` and
        ``manifest.csv``.
    n_slides : int
    seed : int
        Everything (layout, labels, survival) is a function of the seed.
    mpp : float
        Level-0 microns per pixel of every slide.
    n_classes : {2, 3}
        Class names ``normal/tumor`` or ``normal/tumor_a/tumor_b``.
    size_px : (int, int)
        Level-0 ``(width, height)`` of each slide.
    texture : str or Path, optional
        Real H&E image for the normal tissue.
    positive_fraction : float
        Fraction of cases (patients) with lesions, split evenly over the lesion classes.

    Returns
    -------
    Path of ``manifest.csv`` with columns ``slide_id, path, label, case_id, time, event``
    (``path`` relative to the manifest; ``time`` in months, ``event`` 1 = death, 0 = censored;
    more lesion area -> shorter time; about 70 % events). Slides of one case share label,
    time and event.

    Notes
    -----
    The slides are ~24 Mpx: CLAM's ``default`` preset (a_t = 26.2 M level-0 px) keeps no
    tissue on them; use ``bwh_biopsy``.
    """
    if n_classes not in CLASS_NAMES:
        raise ConfigError(f"The 'n_classes' parameter of make_cohort must be 2 or 3. Got {n_classes!r} instead.")
    if not (isinstance(n_slides, int) and n_slides >= 1):
        raise ConfigError(f"The 'n_slides' parameter of make_cohort must be an int >= 1. Got {n_slides!r} instead.")
    if not (0.0 <= positive_fraction <= 1.0):
        raise ConfigError(
            f"The 'positive_fraction' parameter of make_cohort must be in [0, 1]. Got {positive_fraction!r} instead."
        )
    width, height = int(size_px[0]), int(size_px[1])
    if min(width, height) < 1024:
        raise ConfigError(f"The 'size_px' parameter of make_cohort must be at least 1024 x 1024. Got {size_px!r} instead.")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    names = CLASS_NAMES[n_classes]
    rng = np.random.default_rng(seed)

    # Cases: about a quarter of the patients have two slides.
    case_sizes: list[int] = []
    while sum(case_sizes) < n_slides:
        left = n_slides - sum(case_sizes)
        case_sizes.append(2 if left >= 2 and rng.random() < 0.25 else 1)
    n_cases = len(case_sizes)
    n_pos = int(round(positive_fraction * n_cases))
    case_class = np.zeros(n_cases, int)
    case_class[:n_pos] = 1 + np.arange(n_pos) % (n_classes - 1)
    case_class = rng.permutation(case_class)
    # Lesion burden per positive case, shared by its slides: fraction of tissue patches.
    case_burden = np.where(case_class > 0, rng.uniform(0.02, 0.08, n_cases), 0.0)

    textures = [_texture_or_procedural(texture, "normal", seed)]
    textures += [TissueTexture(_procedural_texture(k, seed + 1 + i)) for i, k in enumerate(("tumor", "tumor_b")[: n_classes - 1])]
    # Field grid: fine enough for smooth edges at level 0 (16 px = 8 um at 0.5 um/px).
    grid = 16
    patch_px_level0 = max(1, round(256 * 0.5 / mpp))

    rows = []
    slide_no = 0
    for case_no, n_case_slides in enumerate(case_sizes):
        klass = int(case_class[case_no])
        case_id = f"case_{case_no:03d}"
        lesion_fraction_case = []
        for _ in range(n_case_slides):
            slide_id = f"slide_{slide_no:03d}"
            srng = np.random.default_rng([seed, slide_no])
            scene, truth = _cohort_scene(srng, (width, height), grid, klass, float(case_burden[case_no]),
                                         patch_px_level0, n_classes, textures)
            write_svs_tiles(out / "slides" / f"{slide_id}.svs", (width, height), scene.render, mpp)
            truth.update(slide_id=slide_id, case_id=case_id, label=names[klass], mpp=mpp,
                         size_wh=[width, height], patch_px_level0=patch_px_level0)
            (out / "ground_truth" / f"{slide_id}.json").write_text(json.dumps(truth, indent=1))
            lesion_fraction_case.append(truth["lesion_patch_fraction"])
            rows.append({"slide_id": slide_id, "path": f"slides/{slide_id}.svs", "label": names[klass],
                         "case_id": case_id})
            slide_no += 1
        # Survival per case: exponential times whose hazard grows with the lesion burden.
        burden = float(np.mean(lesion_fraction_case))
        scale_months = 60.0 * math.exp(-12.0 * burden)
        time = float(rng.exponential(scale_months)) + 1.0
        event = int(rng.random() < 0.7)
        if not event:  # censored: followed up for only part of the survival time
            time *= float(rng.uniform(0.3, 1.0))
        for row in rows[-n_case_slides:]:
            row.update(time=round(time, 2), event=event)

    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "path", "label", "case_id", "time", "event"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _cohort_scene(rng, size_wh, grid, klass, burden, patch_px_level0, n_classes, textures):
    """One cohort slide: tissue pieces, holes, and lesions of class ``klass`` covering ``burden``."""
    import cv2

    width, height = size_wh
    pieces = _place_pieces(rng, size_wh, int(rng.integers(2, 4)), cover=float(rng.uniform(0.3, 0.45)))
    # Hole radius 1.6-2.4 patches (200-300 um; aspect >= 0.6): every hole exceeds bwh_biopsy's a_h (one 512 x 512
    # level-0 patch), so a segmentation with that preset keeps it and tiles around it.
    hole_r = (1.6 * patch_px_level0, 2.4 * patch_px_level0)
    holes = []
    for piece in pieces:
        if rng.random() < 0.6:
            holes += _holes_in(rng, piece, int(rng.integers(1, 3)), hole_r)
    lesions: list[list[_Blob]] = [[] for _ in range(n_classes - 1)]
    offsets = [tuple(int(v) for v in rng.integers(0, _TEXTURE_PERIOD, 2)) for _ in textures]
    scene = _Scene(size_wh, grid, pieces, holes, lesions, textures, offsets)

    if klass > 0:
        # Place lesions inside tissue (away from holes), sized so their total area is about
        # ``burden`` of the tissue area; boundary patches make the patch fraction a bit larger.
        label = scene.mask(grid)
        tissue_cells = np.argwhere(label == 1)
        tissue_area = len(tissue_cells) * grid * grid
        n_lesions = int(rng.integers(1, 4))
        r = math.sqrt(burden * 0.6 * tissue_area / n_lesions / math.pi)
        inner = cv2.erode((label == 1).astype(np.uint8), np.ones((3, 3), np.uint8),
                          iterations=max(1, int(r / grid)))
        candidates = np.argwhere(inner > 0)
        if len(candidates) == 0:
            candidates = tissue_cells
        for i in rng.choice(len(candidates), size=n_lesions, replace=False if len(candidates) >= n_lesions else True):
            cy, cx = (candidates[i] + 0.5) * grid
            lesions[klass - 1].append(_random_blob(rng, float(cx), float(cy), r, 0.1))
        scene = _Scene(size_wh, grid, pieces, holes, lesions, textures, offsets)

    # Ground truth from the label image at patch resolution: which patches touch a lesion.
    label = scene.mask(grid)
    def boxes(mask):
        """Level-0 boxes [x0, y0, x1, y1] of the connected regions of a grid mask."""
        n_lab, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        return [[int(x * grid), int(y * grid), int((x + w) * grid), int((y + h) * grid)]
                for x, y, w, h, _ in stats[1:n_lab]]

    truth = {
        "class": int(klass),
        "tissue_boxes": boxes(label > 0),
        "hole_boxes": boxes(label == 2),
        "lesions": [{"box": box, "class": int(klass)} for box in boxes(label >= 3)],
    }
    # Fractions over a patch grid anchored at (0, 0): tissue patches = any tissue cell.
    cells = max(1, patch_px_level0 // grid)
    ph, pw = math.ceil(label.shape[0] / cells), math.ceil(label.shape[1] / cells)
    padded = np.zeros((ph * cells, pw * cells), np.uint8)
    padded[: label.shape[0], : label.shape[1]] = label
    blocks = padded.reshape(ph, cells, pw, cells).transpose(0, 2, 1, 3).reshape(ph, pw, -1)
    tissue_patches = (blocks == 1).any(-1) | (blocks >= 3).any(-1)
    lesion_patches = (blocks >= 3).any(-1)
    truth["n_tissue_patches"] = int(tissue_patches.sum())
    truth["n_lesion_patches"] = int(lesion_patches.sum())
    truth["lesion_patch_fraction"] = float(lesion_patches.sum() / max(1, tissue_patches.sum()))
    return scene, truth
