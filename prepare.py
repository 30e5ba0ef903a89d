"""Datasets on disk: cut full DOTA images into tiles (with a manifest), synthesize a DOTA-format dataset, check one.

    python prepare.py split --src DOTA/train --dst data/dota/train --size 1024 --gap 200 [--rates 1.0 0.5]
    python prepare.py synth --out data/synthetic
    python prepare.py check --data data/dota

Splitting follows DOTA_devkit's ImgSplit so that its merge tools read our tiles: windows of `size` step by
`size - gap`, the last window of a row or column snaps to the image border, images smaller than a window are
padded with zeros, and a tile is named `<id>__<rate>__<left>___<top>` (rate printed like the devkit: 1, 0.5). The
manifest records each tile's image part ('content'), so that a training crop can stay off the padding. With a rate
other than 1 the image is resized first and the names carry the rate. An object fully inside a window keeps its
exact polygon, shifted by the window offset; a cut object is written as the minimum-area rectangle of its
visible part (the devkit writes the clipped polygon itself when it has 4 or 5 corners; ours can have up to 8, and a
box is what a detector learns), with difficult = 2 when that part is at most --min-visible (0.7) of its area, as
the devkit does. The manifest holds both the polygons (oriented boxes, task 1) and the axis-aligned boxes of the
visible parts (task 2). Tiles are written to a temporary name and renamed; an image counts as done only when all its
tiles are, so an interrupted run can be restarted with the same command and continues where it stopped.
"""
import argparse
import json
import os
import resource
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from labels import CLASSES, IMG_EXTS, LabelError, Problems, load_labels, read_image
from metrics import SIZE_BINS
from obb import clip_to_rect, obb_to_poly, poly_to_obb, polygon_area


# ------------------------------------------------------------------------------------------------- geometry
def windows(length, size, gap):
    """Window starts along one axis, as DOTA_devkit: steps of size - gap, the last one snapped to the border."""
    step = size - gap
    starts = list(range(0, max(length - size, 0), step)) + [max(length - size, 0)]
    return sorted(set(starts))


def rescale(img, rate):
    """(H, W, 3) uint8 -> the image resized by `rate` (bicubic, as DOTA_devkit's split); at rate 1 the image itself."""
    h, w = img.shape[:2]
    return img if rate == 1 else np.asarray(Image.fromarray(img).resize((max(round(w * rate), 1),
                                                                         max(round(h * rate), 1)), Image.BICUBIC))


def cut(img, left, top, size):
    """The window of side `size` at (left, top) as a full tile: (size, size, 3) uint8, zero-padded where it leaves
    the image (border windows, images smaller than a tile) -> (tile, the image part (h', w', 3), a view)."""
    crop = img[top:top + size, left:left + size]
    tile = np.zeros((size, size, 3), np.uint8)
    tile[:crop.shape[0], :crop.shape[1]] = crop
    return tile, crop


# ------------------------------------------------------------------------------------------------- splitting
def split_image(job):
    """Cut one image (all rates). job: dict from `split`. -> (record list for the manifest, Problems, peak RSS MB)."""
    img_path, lbl_path, dst = Path(job['image']), job['label'], Path(job['dst'])
    problems = Problems(job['strict'])
    img = read_image(img_path)  # (H, W, 3) uint8
    h0, w0 = img.shape[:2]
    if lbl_path is None:
        polys, labels, diff = np.zeros((0, 8), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not job['images_only']:
            problems.add('image without a label file (no objects)', str(img_path))
    else:
        polys, labels, diff = load_labels(lbl_path, job['classes'], w0, h0, problems, kind='poly')
    records = []
    for rate in job['rates']:
        scaled = rescale(img, rate)
        h, w = scaled.shape[:2]
        pts = (polys * rate).reshape(-1, 4, 2)
        area = polygon_area(pts)
        for top in windows(h, job['size'], job['gap']):
            for left in windows(w, job['size'], job['gap']):
                records.append(write_tile(scaled, pts, area, labels, diff, left, top, rate, img_path.stem, dst, job))
    return records, problems, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_tile(img, pts, area, labels, diff, left, top, rate, stem, dst, job):
    """Write one tile image (+ label file) atomically; -> its manifest record."""
    size = job['size']
    name = f'{stem}__{rate:g}__{left}___{top}'
    tile, crop = cut(img, left, top, size)
    ext = '.jpg' if job['format'] == 'jpg' else '.png'
    tmp = dst / 'images' / f'.{name}{ext}.tmp'
    Image.fromarray(tile).save(tmp, format='JPEG' if ext == '.jpg' else 'PNG', quality=95)
    os.replace(tmp, dst / 'images' / f'{name}{ext}')
    record = {'name': name, 'file': f'images/{name}{ext}', 'width': size, 'height': size,
              'content': [crop.shape[1], crop.shape[0]]}  # (w, h) of the image part (top left); the rest is zeros
    if job['images_only']:
        return record
    x1, y1 = left + min(crop.shape[1], size), top + min(crop.shape[0], size)  # the window's real image part
    visible = clip_to_rect(pts, left, top, x1, y1)  # (n, K, 2) the part of each object inside the window
    vis_area = polygon_area(visible)
    sel = np.flatnonzero(vis_area > 0)
    p, v = pts[sel] - (left, top), visible[sel] - (left, top)  # tile coordinates
    full = (p.min(1) >= 0).all(1) & (p.max(1) <= (x1 - left, y1 - top)).all(1)  # (m,) entirely inside
    poly = np.where(full[:, None, None], p, obb_to_poly(poly_to_obb(v)))  # (m, 4, 2)
    flags = np.where(full | (vis_area[sel] > job['min_visible'] * area[sel]), diff[sel], 2)
    names = [job['classes'][c] for c in labels[sel]]
    lines = [' '.join(f'{c:.8g}' for c in q.round(2).ravel()) + f' {n} {d}' for q, n, d in zip(poly, names, flags)]
    tmp = dst / 'labelTxt' / f'.{name}.txt.tmp'
    tmp.write_text(''.join(line + '\n' for line in lines))
    os.replace(tmp, dst / 'labelTxt' / f'{name}.txt')
    boxes = np.concatenate([v.min(1), v.max(1)], 1).round(2)  # (m, 4) axis-aligned box of the visible part
    record.update(boxes=boxes.tolist(), polys=poly.reshape(-1, 8).round(2).tolist(), labels=names,
                  difficult=flags.tolist())
    return record


def split(src, dst, size=1024, gap=200, rates=(1.0,), fmt='jpg', workers=4, min_visible=0.7, classes=None,
          images_only=False, strict=False):
    """Split SRC/{images,labelTxt} into DST/{images,labelTxt} + DST/manifest.json. -> Problems."""
    src, dst = Path(src), Path(dst)
    if gap >= size:
        raise ValueError(f'--gap {gap} must be smaller than --size {size}')
    images = sorted(p for p in (src / 'images').glob('*') if p.suffix.lower() in IMG_EXTS)
    if not images:
        raise FileNotFoundError(f'no images in {src / "images"}; expected SRC/images/*.png and SRC/labelTxt/*.txt')
    labels = {p.stem: p for p in (src / 'labelTxt').glob('*.txt')}
    images_only = images_only or not labels
    for sub in ('images', 'labelTxt', '.done'):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    problems = Problems(strict)
    for stem in sorted(set(labels) - {p.stem for p in images}):
        problems.add('label file without an image (skipped)', str(labels[stem]))
    settings = {'size': size, 'gap': gap, 'rates': list(rates), 'format': fmt, 'min_visible': min_visible,
                'manifest': 2}  # 2: records carry 'content'; an older resumed split is redone
    jobs, records = [], {}
    for p in images:
        done = dst / '.done' / f'{p.stem}.json'
        if done.exists():  # resumed run: this image was finished before
            saved = json.loads(done.read_text())
            if saved['settings'] == settings:
                records[p.stem] = saved['records']
                continue
        jobs.append({'image': str(p), 'label': None if images_only else labels.get(p.stem), 'dst': str(dst),
                     'classes': classes, 'images_only': images_only, 'strict': strict, **settings})
    print(f'{len(images)} images in {src}: {len(records)} already done, {len(jobs)} to split')
    t0, peak, n_bytes = time.time(), 0.0, sum(Path(j['image']).stat().st_size for j in jobs)
    with Pool(workers, maxtasksperchild=8) as pool:  # one image per worker at a time: bounded memory
        for job, (recs, probs, rss) in zip(jobs, tqdm(pool.imap(split_image, jobs), total=len(jobs), desc='split')):
            stem = Path(job['image']).stem
            tmp = dst / '.done' / f'.{stem}.json.tmp'
            tmp.write_text(json.dumps({'settings': settings, 'records': recs}))
            os.replace(tmp, dst / '.done' / f'{stem}.json')
            records[stem] = recs
            problems.merge(probs)
            peak = max(peak, rss)
    dt = time.time() - t0
    if jobs:
        print(f'split {len(jobs)} images in {dt:.1f} s: {len(jobs) / dt:.2f} images/s, {n_bytes / 1e6 / dt:.1f} MB/s '
              f'read; peak memory of a worker {peak:.0f} MB')
    tiles = [r for stem in sorted(records) for r in records[stem]]
    manifest = {'classes': classes, 'settings': settings, 'tiles': tiles}
    (dst / 'manifest.json.tmp').write_text(json.dumps(manifest))
    os.replace(dst / 'manifest.json.tmp', dst / 'manifest.json')
    print(f'wrote {len(tiles)} tiles and {dst / "manifest.json"}')
    return problems


# ------------------------------------------------------------------------------------------------- synthetic data
SYNTH_CLASSES = ['small-vehicle', 'large-vehicle', 'ship', 'storage-tank', 'plane']
ASPECT = {'small-vehicle': 0.5, 'large-vehicle': 0.33, 'ship': 0.28, 'storage-tank': 1.0, 'plane': 1.0}  # width/length


def _rect(cx, cy, length, width, angle):
    """Corners (4, 2) of a length x width rectangle centred at (cx, cy), long side at `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [length / 2, width / 2]
    return local @ np.array([[c, s], [-s, c]]) + [cx, cy]


def _draw_object(draw, rng, name, cx, cy, size, angle):
    """Draw one object whose oriented box is _rect(cx, cy, size, size * ASPECT[name], angle)."""
    grey = int(rng.integers(170, 250))
    if name == 'small-vehicle':
        colour = tuple(int(v) for v in rng.choice([[200, 30, 30], [235, 235, 235], [30, 60, 160], [25, 25, 25],
                                                   [150, 150, 160]]))
        draw.polygon([tuple(p) for p in _rect(cx, cy, size, size * 0.5, angle)], fill=colour)
        draw.polygon([tuple(p) for p in _rect(cx + 0.15 * size * np.cos(angle), cy + 0.15 * size * np.sin(angle),
                                               size * 0.2, size * 0.4, angle)], fill=(90, 110, 130))  # windscreen
    elif name == 'large-vehicle':
        draw.polygon([tuple(p) for p in _rect(cx, cy, size, size * 0.33, angle)], fill=(grey, grey, grey))
        cab = _rect(cx + 0.4 * size * np.cos(angle), cy + 0.4 * size * np.sin(angle), size * 0.2, size * 0.33, angle)
        draw.polygon([tuple(p) for p in cab], fill=tuple(int(v) for v in rng.integers(40, 220, 3)))
    elif name == 'ship':
        poly = _rect(cx, cy, size, size * 0.28, angle)
        c, s = np.cos(angle), np.sin(angle)
        bow = (cx + 0.5 * size * c, cy + 0.5 * size * s)
        hull = [tuple(poly[0]), tuple(poly[1] - [0.2 * size * c, 0.2 * size * s]), bow,
                tuple(poly[2] - [0.2 * size * c, 0.2 * size * s]), tuple(poly[3])]
        draw.polygon(hull, fill=(grey, grey, grey - 20), outline=(60, 60, 70))
        draw.line([tuple(p) for p in _rect(cx, cy, size * 0.5, 1, angle)[[0, 1]]], fill=(110, 90, 70), width=2)
    elif name == 'storage-tank':
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(grey, grey, grey), outline=(80, 80, 80), width=2)
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], outline=(120, 120, 120))
    else:  # plane: fuselage, wings, tail
        c, s = np.cos(angle), np.sin(angle)
        for length, width, off in ((size, size * 0.14, 0), (size * 0.16, size, 0.05), (size * 0.1, size * 0.4, -0.42)):
            draw.polygon([tuple(p) for p in _rect(cx + off * size * c, cy + off * size * s, length, width, angle)],
                         fill=(grey, grey, grey))


def _ground(rng, size):
    """Textured ground (size, size, 3) uint8: a base colour, low-frequency blotches and pixel noise."""
    base = rng.choice([[95, 120, 70], [140, 120, 90], [120, 120, 115], [70, 90, 80]]).astype(np.float32)
    low = Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    img = base + (np.asarray(low, np.float32)[..., None] - 128) * 0.25 + rng.normal(0, 6, (size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def synth_image(rng, size, n_rows=None, n_single=None, rotated=False):
    """One synthetic image and its objects: single objects of all classes, plus dense rows of vehicles/ships.
    By default 0-3 rows and 4-14 single objects (some are rejected where they would overlap). Single objects face
    any direction; rows run along x or y (+- 6 degrees), or, with rotated=True, in any direction (a harbour row at
    45 degrees: the case where axis-aligned boxes of neighbours overlap most).
    -> (PIL image, list of (polygon (4, 2), class name))."""
    img = Image.fromarray(_ground(rng, size))
    draw = ImageDraw.Draw(img)
    occupied = np.zeros((size, size), bool)
    objects = []
    size_range = {'small-vehicle': (6, 11), 'large-vehicle': (14, 26), 'ship': (12, 40), 'storage-tank': (8, 28),
                  'plane': (18, 40)}

    def place(name, cx, cy, s, angle):
        poly = _rect(cx, cy, s, s * ASPECT[name], 0.0 if name == 'storage-tank' else angle)
        x0, y0 = np.floor(poly.min(0)).astype(int) - 1  # a 1 px margin so that objects never touch
        x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
        if x0 < 0 or y0 < 0 or x1 > size or y1 > size or occupied[y0:y1, x0:x1].any():
            return
        occupied[y0:y1, x0:x1] = True
        _draw_object(draw, rng, name, cx, cy, s, angle)
        objects.append((poly, name))

    n_rows = int(rng.integers(0, 4)) if n_rows is None else n_rows
    n_single = int(rng.integers(4, 15)) if n_single is None else n_single
    for _ in range(n_rows):  # dense rows: parking lines of cars or trucks, moored ships
        name = str(rng.choice(['small-vehicle', 'small-vehicle', 'large-vehicle', 'ship']))
        s = float(rng.uniform(*size_range[name])) if name != 'ship' else float(rng.uniform(12, 20))
        row_angle = float(rng.uniform(0, np.pi) if rotated else rng.choice([0, np.pi / 2]) + rng.normal(0, 0.1))
        step = s * ASPECT[name] + 3
        x, y = rng.uniform(0, size, 2)
        for k in range(int(rng.integers(3, 9))):
            place(name, x + k * step * np.cos(row_angle), y + k * step * np.sin(row_angle), s, row_angle + np.pi / 2)
    for _ in range(n_single):  # scattered single objects
        name = str(rng.choice(SYNTH_CLASSES))
        s = float(rng.uniform(*size_range[name]))
        place(name, *rng.uniform(0, size, 2), s, float(rng.uniform(0, np.pi)))
    return img, objects


def make_synthetic(out, n_train=400, n_val=100, size=128, seed=0, rotated=False):
    """Write a deterministic synthetic dataset in DOTA format: OUT/{train,val}/{images/*.png,labelTxt/*.txt}."""
    out = Path(out)
    for split, n, split_id in (('train', n_train, 0), ('val', n_val, 1)):
        (out / split / 'images').mkdir(parents=True, exist_ok=True)
        (out / split / 'labelTxt').mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, objects = synth_image(np.random.default_rng([seed, split_id, i]), size, rotated=rotated)
            img.save(out / split / 'images' / f'S{i:05d}.png')
            lines = ['imagesource:synthetic', 'gsd:1.0']
            lines += [' '.join(f'{v:.1f}' for v in poly.ravel()) + f' {name} 0' for poly, name in objects]
            (out / split / 'labelTxt' / f'S{i:05d}.txt').write_text('\n'.join(lines) + '\n')
    (out / '.complete').write_text(f'n_train={n_train} n_val={n_val} size={size} seed={seed} rotated={rotated}\n')


def resolve_data(data):
    """--data accepts a folder or a name: 'dota' -> data/dota, 'synthetic' -> data/synthetic, 'synthetic-rotated'
    -> data/synthetic-rotated (rows in any direction; the synthetic sets are made on first use)."""
    names = {'dota': 'data/dota', 'synthetic': 'data/synthetic', 'synthetic-rotated': 'data/synthetic-rotated'}
    root = Path(names.get(data, data))
    if data in ('synthetic', 'synthetic-rotated') and not (root / '.complete').exists():
        print(f'generating the synthetic dataset in {root} (once)')
        make_synthetic(root, rotated=data == 'synthetic-rotated')
    if not root.is_dir():
        raise FileNotFoundError(f'--data {data}: {root} is not a folder; expected '
                                f'ROOT/{{train,val}}/{{images,labelTxt}}')
    return root


# ------------------------------------------------------------------------------------------------- checking
FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.tif': 'TIFF', '.tiff': 'TIFF', '.bmp': 'BMP'}


def inspect_image(path):
    """Open and fully decode one file of images/, once. -> (error or None, note or None, (w, h) or None): the error
    says why it cannot be read (a directory, missing, zero bytes, no permission, not an image, truncated or corrupt);
    the note flags a readable file whose extension does not match its content (Pillow reads it anyway; other tools
    may not)."""
    path = Path(path)
    try:
        if path.is_dir():
            return f'{path}: a directory where an image file should be', None, None
        if path.stat().st_size == 0:
            return f'{path}: zero bytes, not an image', None, None
        im = Image.open(path)
    except UnidentifiedImageError:
        with open(path, 'rb') as f:
            head = f.read(8)
        return f'{path}: not an image (the file starts with {head!r})', None, None
    except PermissionError:
        return f'{path}: cannot be opened: permission denied', None, None
    except OSError as e:  # a dangling link, an I/O error
        return f'{path}: cannot be opened ({e.strerror or e})', None, None
    with im:
        try:
            im.load()  # the full decode: a truncated or corrupt file fails only here
        except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for them (as labels.read_image)
            return f'{path}: cannot read the image ({e})', None, None
        fmt, size = im.format, im.size
    note = None if fmt == FORMATS.get(path.suffix.lower()) else f'{path}: {fmt} data in a {path.suffix} file'
    return None, note, size


def check(root, class_names, workers=4, strict=False):
    """Walk ROOT (a split folder with images/, or a folder of split folders), print statistics and every problem:
    every entry of images/ and labelTxt/ is read or reported with its path and reason, and the walk goes on.
    -> number of errors (files that cannot be read; under strict, warnings count too)."""
    root = Path(root)
    splits = [root] if (root / 'images').is_dir() else sorted(p for p in root.iterdir() if (p / 'images').is_dir())
    if not splits:
        raise FileNotFoundError(f'{root}: no images/ folder in it or in its sub-folders')
    n_errors = 0
    for split_dir in splits:
        problems, errors = Problems(strict=False), []
        entries = sorted((split_dir / 'images').iterdir())
        images = [p for p in entries if p.suffix.lower() in IMG_EXTS]
        for p in entries:
            if p.suffix.lower() not in IMG_EXTS:
                problems.add('file without an image extension in images/ (skipped)', str(p))
        with Pool(workers) as pool:
            found = pool.map(inspect_image, images, chunksize=16)
        readable = {}  # image -> (w, h)
        for p, (error, note, size) in zip(images, found):
            if error:
                errors.append(error)
            else:
                readable[p] = size
            if note:
                problems.add('extension does not match the content (read anyway)', note)
        labels = {p.stem: p for p in (split_dir / 'labelTxt').glob('*.txt')}
        for stem in sorted(set(labels) - {p.stem for p in images}):
            problems.add('label file without an image (skipped)', str(labels[stem]))
        counts, sizes, most, n_obj = np.zeros(len(class_names), int), [], (0, ''), 0
        for p, (w, h) in readable.items():
            if p.stem not in labels:
                problems.add('image without a label file (no objects)', str(p))
                continue
            try:
                boxes, lab, _ = load_labels(labels[p.stem], class_names, w, h, problems)
            except (LabelError, ValueError) as e:
                errors.append(str(e))
                continue
            counts += np.bincount(lab, minlength=len(class_names))
            sizes.append(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
            most = max(most, (len(lab), p.name))
            n_obj += len(lab)
        sizes = np.concatenate(sizes) if sizes else np.zeros(0)
        print(f'\n{split_dir}: {len(images)} images ({len(readable)} readable), {len(labels)} label files, '
              f'{n_obj} objects')
        for c in np.flatnonzero(counts):
            print(f'  {class_names[c]:<20}{counts[c]:>8}')
        print('  object sizes (sqrt of box area): ' + ', '.join(
            f'{name} [{lo}, {hi}) px: {int(((sizes >= lo) & (sizes < hi)).sum())}' for name, lo, hi in SIZE_BINS))
        print(f'  most objects in one image: {most[0]} ({most[1]})')
        print(problems.report() or '  no warnings')
        for e in errors:
            print(f'  ERROR {e}')
        n_errors += len(errors) + (sum(problems.counts.values()) if strict else 0)
    return n_errors


# ------------------------------------------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('synth', help='write the synthetic DOTA-format dataset')
    sp.add_argument('--out', default='data/synthetic', help='output folder (default: %(default)s)')
    sp.add_argument('--n-train', type=int, default=400, help='number of training images (default: %(default)s)')
    sp.add_argument('--n-val', type=int, default=100, help='number of validation images (default: %(default)s)')
    sp.add_argument('--size', type=int, default=128, help='image side in pixels (default: %(default)s)')
    sp.add_argument('--seed', type=int, default=0, help='random seed; same seed, same files (default: %(default)s)')
    sp.add_argument('--rotated', action='store_true', help='rows of vehicles and ships in any direction, not only '
                    'along x or y (single objects face any direction either way): for oriented boxes')
    sp = sub.add_parser('split', help='cut full DOTA images into tiles, DOTA_devkit style, with a manifest')
    sp.add_argument('--src', required=True, help='folder with images/ and labelTxt/ (e.g. DOTA/train)')
    sp.add_argument('--dst', required=True, help='output folder (e.g. data/dota/train)')
    sp.add_argument('--size', type=int, default=1024, help='tile side in pixels (default: %(default)s)')
    sp.add_argument('--gap', type=int, default=200, help='overlap of neighbouring tiles (default: %(default)s)')
    sp.add_argument('--rates', type=float, nargs='+', default=[1.0], help='resize factors, one pass each '
                                                                          '(default: %(default)s)')
    sp.add_argument('--format', choices=['jpg', 'png'], default='jpg',
                    help='tile format: JPEG q95 decodes ~3x faster than PNG (default: %(default)s)')
    sp.add_argument('--workers', type=int, default=os.cpu_count(), help='parallel processes, one image each '
                                                                        '(default: %(default)s)')
    sp.add_argument('--min-visible', type=float, default=0.7, help='a cut object whose visible part is at most '
                    'this share of its area gets difficult=2 (default: %(default)s)')
    sp.add_argument('--images-only', action='store_true', help='no labels (the test split); automatic when SRC has '
                                                               'no labelTxt files')
    for p in (sp, sub.add_parser('check', help='statistics and problems of a dataset; non-zero exit on errors')):
        p.add_argument('--classes', default='dota1.0', choices=list(CLASSES), help='class list (default: %(default)s)')
        p.add_argument('--strict', action='store_true', help='treat every warning as an error')
    sp = sub.choices['check']
    sp.add_argument('--data', required=True, help="dataset folder (ROOT or ROOT/train) or 'dota'/'synthetic'")
    sp.add_argument('--workers', type=int, default=os.cpu_count(), help='processes decoding images '
                                                                        '(default: %(default)s)')
    args = ap.parse_args(argv)
    if args.cmd == 'synth':
        make_synthetic(args.out, args.n_train, args.n_val, args.size, args.seed, args.rotated)
        print(f'wrote {args.n_train} train and {args.n_val} val images to {args.out}')
        return 0
    try:
        if args.cmd == 'split':
            problems = split(args.src, args.dst, args.size, args.gap, args.rates, args.format, args.workers,
                                     args.min_visible, CLASSES[args.classes], args.images_only, args.strict)
            print(problems.report() or 'no warnings')
            return 0
        n_errors = check(resolve_data(args.data), CLASSES[args.classes], args.workers, args.strict)
    except (LabelError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    print(f'\n{n_errors} error(s)')
    return 1 if n_errors else 0


if __name__ == '__main__':
    raise SystemExit(main())
