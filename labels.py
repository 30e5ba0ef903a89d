"""DOTA files on disk: the class lists, label files, tile names and images, read with clear errors.

A label line is `x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]` (a polygon, pixels), optionally after the header lines
`imagesource:...` and `gsd:...`. Polygons become axis-aligned boxes x1 y1 x2 y2 clipped to the image (boxes='hbb',
DOTA task 2) or, with boxes='obb' (task 1), the minimum-area rectangles (cx, cy, w, h, theta) of their parts inside
the image (obb.py states the convention). Malformed lines are errors naming the file and line; repaired or skipped
objects and files are counted (Problems) and reported, and --strict makes them errors.
data.py (training), prepare.py (splitting, checking) and submission.py (merging) all read through here.
"""
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from obb import clip_to_rect, poly_to_obb, polygon_area

DOTA_V1 = ['plane', 'baseball-diamond', 'bridge', 'ground-track-field', 'small-vehicle', 'large-vehicle', 'ship',
           'tennis-court', 'basketball-court', 'storage-tank', 'soccer-ball-field', 'roundabout', 'harbor',
           'swimming-pool', 'helicopter']  # the official DOTA_devkit order
CLASSES = {'dota1.0': DOTA_V1,
           'dota1.5': DOTA_V1 + ['container-crane'],
           'dota2.0': DOTA_V1 + ['container-crane', 'airport', 'helipad']}
IMG_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')

STRIPS_ABOVE, STRIP = 4096 * 4096, 1024  # pixels: read_image copies larger images out of Pillow in strips of rows
Image.MAX_IMAGE_PIXELS = 30000 * 30000  # deliberately above Pillow's 89 Mpx bomb guard: DOTA v2.0 has 20,000^2 images


class LabelError(ValueError):
    """A label file that cannot be read; the message names the file and line."""


class Problems:
    """Counts every object or file that was skipped or repaired, keeps the first few places of each kind, and in
    strict mode turns the first one into an error. Nothing is dropped without being counted here."""

    def __init__(self, strict=False):
        self.strict, self.counts, self.places = strict, Counter(), {}

    def add(self, kind, where, n=1):
        if self.strict:
            raise LabelError(f'{where}: {kind} (an error under --strict)')
        self.counts[kind] += n
        places = self.places.setdefault(kind, [])
        if len(places) < 3:
            places.append(where)

    def merge(self, other):
        for kind, n in other.counts.items():
            self.counts[kind] += n
            places = self.places.setdefault(kind, [])
            places += other.places[kind][:3 - len(places)]

    def report(self):
        return '\n'.join(f'  {n} x {kind}, e.g. {"; ".join(self.places[kind])}' for kind, n in self.counts.items())


# ----------------------------------------------------------------------------------------------- label files
def parse_label_file(path, class_names):
    """Read one DOTA label file -> polys (n, 8) float32, labels (n,) int64, difficult (n,) int64, line numbers (n,).
    Header lines, blank lines, CRLF and a UTF-8 BOM are fine; anything else that is not an object line is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:  # a directory named *.txt, no permission, an I/O error
        raise LabelError(f'{path}: cannot read the label file ({e.strerror or e})') from None
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise LabelError(f'{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x} at offset {e.start})') from None
    index = {name: i for i, name in enumerate(class_names)}
    polys, labels, difficult, linenos = [], [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):  # splitlines handles CRLF
        tok = line.split()
        if not tok or tok[0].lower().startswith(('imagesource:', 'gsd:')):
            continue
        where = f'{path}:{lineno}'
        if len(tok) not in (9, 10):
            raise LabelError(f"{where}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]', got {line.strip()!r}")
        try:
            polys.append([float(t) for t in tok[:8]])
        except ValueError:
            raise LabelError(f'{where}: coordinates must be numbers, got {" ".join(tok[:8])!r}') from None
        if tok[8] not in index:
            sets = [k for k, names in CLASSES.items() if tok[8] in names]
            hint = f' It is a {"/".join(sets)} class: use --classes {sets[0]}.' if sets else ''
            raise LabelError(f'{where}: unknown class {tok[8]!r}.{hint} Known: {", ".join(class_names)}')
        labels.append(index[tok[8]])
        try:
            difficult.append(int(tok[9]) if len(tok) == 10 else 0)
        except ValueError:
            raise LabelError(f'{where}: difficult flag must be an integer, got {tok[9]!r}') from None
        linenos.append(lineno)
    return (np.asarray(polys, np.float32).reshape(-1, 8), np.asarray(labels, np.int64),
            np.asarray(difficult, np.int64), np.asarray(linenos, np.int64))


def load_labels(path, class_names, width, height, problems, kind='hbb'):
    """Parse a label file for a width x height image. Zero-area polygons are dropped and objects reaching outside
    the image are clipped, each counted in `problems` with its file and line. -> boxes, labels (n,) int64,
    difficult (n,) int64, with boxes by kind: 'hbb' (n, 4) float32 xyxy; 'obb' (n, 5) float32, the minimum-area
    rectangle of the polygon's part inside the image; 'poly' the polygons (n, 8) as written, unclipped."""
    polys, labels, difficult, linenos = parse_label_file(path, class_names)
    xs, ys = polys[:, 0::2], polys[:, 1::2]  # (n, 4) each
    boxes = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1).clip(0, [width, height, width, height])
    keep = (polygon_area(polys.reshape(-1, 4, 2)) > 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    outside = keep & ((xs < 0) | (xs > width) | (ys < 0) | (ys > height)).any(1)
    for what, mask in (('zero-area or out-of-image polygon (dropped)', ~keep),
                       ('object reaching outside the image (clipped)', outside)):
        if mask.any():
            problems.add(what, f'{path}:{linenos[mask][0]}', int(mask.sum()))
    if kind == 'obb':
        pts = polys.reshape(-1, 4, 2)
        boxes = poly_to_obb(clip_to_rect(pts, 0, 0, width, height) if outside.any() else pts)
    return (polys if kind == 'poly' else boxes.astype(np.float32))[keep], labels[keep], difficult[keep]


TILE_NAME = re.compile(r'^(?P<id>.+)__(?P<rate>[0-9.]+)__(?P<left>\d+)___(?P<top>\d+)$')


def parse_tile_name(name):
    """'P0706__1__0___824' -> ('P0706', 1.0, 0, 824): image id, rate, left, top (DOTA_devkit's tile names)."""
    m = TILE_NAME.match(name)
    if m is None:
        raise ValueError(f'{name!r} is not a tile name of the form <id>__<rate>__<left>___<top>')
    return m['id'], float(m['rate']), int(m['left']), int(m['top'])


def read_image(path, header_only=False):
    """-> uint8 (H, W, 3) RGB, or (W, H) if header_only. Grayscale, RGBA and palette images are converted; 16-bit
    images are scaled linearly from 0..65535 to 0..255 (Pillow's own conversion would clip them)."""
    try:
        with Image.open(path) as im:
            if header_only:
                return im.size
            if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                a = (np.asarray(im, np.float64) / 257).clip(0, 255).round().astype(np.uint8)
                return np.repeat(a[..., None], 3, 2)
            rgb = im if im.mode == 'RGB' else im.convert('RGB')
            if rgb.width * rgb.height <= STRIPS_ABOVE:
                return np.asarray(rgb)  # read-only; never written to
            out = np.empty((rgb.height, rgb.width, 3), np.uint8)  # a large scene, copied in strips: np.asarray
            for y in range(0, rgb.height, STRIP):  # would hold two more copies of it at once (tobytes' chunks, joined)
                out[y:y + STRIP] = np.asarray(rgb.crop((0, y, rgb.width, min(y + STRIP, rgb.height))))
            return out
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for missing, truncated or corrupt files
        raise ValueError(f'{path}: cannot read the image ({e})') from None
