"""DOTA data: label parsing, a training Dataset, and a synthetic DOTA-format generator.

    python data.py synth --out data/synthetic      # deterministic synthetic dataset in DOTA format

Layout read everywhere:  ROOT/{train,val}/images/*.png|jpg|tif  and  ROOT/{train,val}/labelTxt/*.txt
A label line is  `x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]`  (a polygon, pixels), optionally preceded by the
header lines `imagesource:...` and `gsd:...`. Polygons become axis-aligned boxes x1 y1 x2 y2 clipped to the image.
Images are returned as uint8; `to_input` turns a batch into normalized floats on the device, so a GPU gets
4x fewer bytes over PCIe.
"""
import argparse
import functools
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

DOTA_V1 = ['plane', 'baseball-diamond', 'bridge', 'ground-track-field', 'small-vehicle', 'large-vehicle', 'ship',
           'tennis-court', 'basketball-court', 'storage-tank', 'soccer-ball-field', 'roundabout', 'harbor',
           'swimming-pool', 'helicopter']  # the official DOTA_devkit order
CLASSES = {'dota1.0': DOTA_V1,
           'dota1.5': DOTA_V1 + ['container-crane'],
           'dota2.0': DOTA_V1 + ['container-crane', 'airport', 'helipad']}
IMG_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the usual choice for ViT inputs
STD = (0.229, 0.224, 0.225)


class LabelError(ValueError):
    """A label file that cannot be read; the message names the file and line."""


# ----------------------------------------------------------------------------------------------- label files
def parse_label_file(path, class_names):
    """Read one DOTA label file -> polys (n, 8) float32, labels (n,) int64, difficult (n,) int64."""
    path = Path(path)
    try:
        text = path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
        raise LabelError(f'{path}: not UTF-8 text ({e})') from None
    index = {name: i for i, name in enumerate(class_names)}
    polys, labels, difficult = [], [], []
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
            raise LabelError(f'{where}: unknown class {tok[8]!r}; known: {", ".join(class_names)}')
        labels.append(index[tok[8]])
        try:
            difficult.append(int(tok[9]) if len(tok) == 10 else 0)
        except ValueError:
            raise LabelError(f'{where}: difficult flag must be an integer, got {tok[9]!r}') from None
    return (np.asarray(polys, np.float32).reshape(-1, 8), np.asarray(labels, np.int64),
            np.asarray(difficult, np.int64))


def polys_to_boxes(polys, width, height):
    """(n, 8) polygons -> (n, 4) boxes x1 y1 x2 y2 clipped to the image, and a keep mask (n,) that is False
    for zero-area polygons and boxes that are empty after clipping."""
    xs, ys = polys[:, 0::2], polys[:, 1::2]  # (n, 4) each
    boxes = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1).clip(0, [width, height, width, height])
    area = 0.5 * np.abs((xs * np.roll(ys, -1, 1) - np.roll(xs, -1, 1) * ys).sum(1))  # shoelace
    keep = (area > 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes.astype(np.float32), keep


def resolve_data(data):
    """--data accepts a folder or a name: 'dota' -> data/dota, 'synthetic' -> data/synthetic (made on first use)."""
    root = Path({'dota': 'data/dota', 'synthetic': 'data/synthetic'}.get(data, data))
    if data == 'synthetic' and not (root / '.complete').exists():
        print(f'generating the synthetic dataset in {root} (once)')
        make_synthetic(root)
    if not root.is_dir():
        raise FileNotFoundError(f'--data {data}: {root} is not a folder; expected ROOT/{{train,val}}/{{images,labelTxt}}')
    return root


# ----------------------------------------------------------------------------------------------- Dataset
class DOTADataset(torch.utils.data.Dataset):
    """Images of ROOT/SPLIT with their boxes. Labels are parsed once, at construction.

    train=True: random crop to img_size (object scale kept, padded with zeros when the image is smaller) and a
    random element of the dihedral group (flips and 90 degree rotations). train=False: the whole image.
    Item: (image uint8 (3, H, W), {'boxes': (n, 4) float32 xyxy px, 'labels': (n,) int64, 'difficult': (n,) bool,
    'name': str, 'size': (H, W)}).
    """

    def __init__(self, root, split, class_names, img_size=512, train=False):
        img_dir, lbl_dir = Path(root) / split / 'images', Path(root) / split / 'labelTxt'
        self.files = sorted(p for p in img_dir.glob('*') if p.suffix.lower() in IMG_EXTS)
        if not self.files:
            raise FileNotFoundError(f'no images in {img_dir}; expected ROOT/{split}/images/*.png|jpg|tif '
                                    f'with labels in ROOT/{split}/labelTxt/<same name>.txt')
        self.class_names, self.img_size, self.train = class_names, img_size, train
        self.targets, skipped = [], Counter()
        for f in self.files:
            lbl = lbl_dir / (f.stem + '.txt')
            if not lbl.exists():
                skipped['image without a label file (taken as no objects)'] += 1
                polys, labels, diff = np.zeros((0, 8), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
            else:
                polys, labels, diff = parse_label_file(lbl, class_names)
            w, h = read_image(f, header_only=True)
            boxes, keep = polys_to_boxes(polys, w, h)
            skipped['zero-area or out-of-image object (dropped)'] += int((~keep).sum())
            self.targets.append({'boxes': boxes[keep], 'labels': labels[keep], 'difficult': diff[keep] > 0})
        for what, n in skipped.items():
            if n:
                warnings.warn(f'{img_dir.parent}: {n} x {what}')

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = read_image(self.files[i])
        t = self.targets[i]
        boxes, labels, diff = torch.from_numpy(t['boxes']), torch.from_numpy(t['labels']), torch.from_numpy(t['difficult'])
        if self.train:
            img, boxes, keep = random_crop(img, boxes, self.img_size)
            labels, diff = labels[keep], diff[keep]
            img, boxes = random_dihedral(img, boxes)
        return img, {'boxes': boxes, 'labels': labels, 'difficult': diff, 'name': self.files[i].stem,
                     'size': tuple(img.shape[1:])}


def read_image(path, header_only=False):
    """-> uint8 (3, H, W) RGB (grayscale, RGBA and palette images are converted), or (W, H) if header_only."""
    try:
        with Image.open(path) as im:
            if header_only:
                return im.size
            return torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for missing, truncated or corrupt files
        raise ValueError(f'{path}: cannot read the image ({e})') from None


def random_crop(img, boxes, size):
    """Crop (3, H, W) to (3, size, size) at a random place, zero-padding a smaller image; boxes are shifted and
    clipped, and those left with less than 1 px of width or height are dropped (keep mask returned)."""
    _, h, w = img.shape
    top, left = (int(torch.randint(0, max(n - size, 0) + 1, ())) for n in (h, w))  # torch RNG: seeded per worker
    out = img.new_zeros(3, size, size)
    crop = img[:, top:top + size, left:left + size]
    out[:, :crop.shape[1], :crop.shape[2]] = crop
    boxes = (boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)).clamp(0, size)
    boxes[:, 2:] = torch.minimum(boxes[:, 2:], torch.tensor([crop.shape[2], crop.shape[1]], dtype=boxes.dtype))
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return out, boxes[keep], keep


def random_dihedral(img, boxes):
    """One of the 8 flips/rotations by 90 degrees, uniformly: transpose (square images only), then h/v flips."""
    _, h, w = img.shape
    flip = torch.rand(3) < 0.5
    if h == w and flip[0]:
        img, boxes = img.transpose(1, 2), boxes[:, [1, 0, 3, 2]]
    if flip[1]:
        img, boxes = img.flip(2), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    if flip[2]:
        img, boxes = img.flip(1), torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)
    return img, boxes


def collate(batch, multiple=32):
    """Stack images zero-padded to the batch's largest size rounded up to `multiple` (the patch size), so every
    image of a batch has the same token grid. -> (B, 3, H, W) uint8, list of B target dicts."""
    h = -(-max(im.shape[1] for im, _ in batch) // multiple) * multiple
    w = -(-max(im.shape[2] for im, _ in batch) // multiple) * multiple
    images = batch[0][0].new_zeros(len(batch), 3, h, w)
    for i, (im, _) in enumerate(batch):
        images[i, :, :im.shape[1], :im.shape[2]] = im
    return images, [t for _, t in batch]


def make_loader(root, split, class_names, img_size, batch_size, train, workers, patch_size):
    ds = DOTADataset(root, split, class_names, img_size, train)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle=train, drop_last=train and len(ds) >= batch_size,
                                       num_workers=workers, collate_fn=functools.partial(collate, multiple=patch_size),
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def to_input(images, device):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) normalized, on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(STD, device=device).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- synthetic data
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


def synth_image(rng, size):
    """One synthetic image and its objects: single objects of all classes, plus dense rows of vehicles/ships."""
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

    for _ in range(int(rng.integers(0, 4))):  # dense rows: parking lines of cars or trucks, moored ships
        name = str(rng.choice(['small-vehicle', 'small-vehicle', 'large-vehicle', 'ship']))
        s = float(rng.uniform(*size_range[name])) if name != 'ship' else float(rng.uniform(12, 20))
        row_angle = float(rng.choice([0, np.pi / 2]) + rng.normal(0, 0.1))
        step = s * ASPECT[name] + 3
        x, y = rng.uniform(0, size, 2)
        for k in range(int(rng.integers(3, 9))):
            place(name, x + k * step * np.cos(row_angle), y + k * step * np.sin(row_angle), s, row_angle + np.pi / 2)
    for _ in range(int(rng.integers(4, 15))):  # scattered single objects
        name = str(rng.choice(SYNTH_CLASSES))
        s = float(rng.uniform(*size_range[name]))
        place(name, *rng.uniform(0, size, 2), s, float(rng.uniform(0, np.pi)))
    return img, objects


def make_synthetic(out, n_train=400, n_val=100, size=128, seed=0):
    """Write a deterministic synthetic dataset in DOTA format: OUT/{train,val}/{images/*.png,labelTxt/*.txt}."""
    out = Path(out)
    for split, n, split_id in (('train', n_train, 0), ('val', n_val, 1)):
        (out / split / 'images').mkdir(parents=True, exist_ok=True)
        (out / split / 'labelTxt').mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, objects = synth_image(np.random.default_rng([seed, split_id, i]), size)
            img.save(out / split / 'images' / f'S{i:05d}.png')
            lines = ['imagesource:synthetic', 'gsd:1.0']
            lines += [' '.join(f'{v:.1f}' for v in poly.ravel()) + f' {name} 0' for poly, name in objects]
            (out / split / 'labelTxt' / f'S{i:05d}.txt').write_text('\n'.join(lines) + '\n')
    (out / '.complete').write_text(f'n_train={n_train} n_val={n_val} size={size} seed={seed}\n')


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('synth', help='write the synthetic DOTA-format dataset')
    sp.add_argument('--out', default='data/synthetic', help='output folder (default: %(default)s)')
    sp.add_argument('--n-train', type=int, default=400, help='number of training images (default: %(default)s)')
    sp.add_argument('--n-val', type=int, default=100, help='number of validation images (default: %(default)s)')
    sp.add_argument('--size', type=int, default=128, help='image side in pixels (default: %(default)s)')
    sp.add_argument('--seed', type=int, default=0, help='random seed; same seed, same files (default: %(default)s)')
    args = ap.parse_args()
    make_synthetic(args.out, args.n_train, args.n_val, args.size, args.seed)
    print(f'wrote {args.n_train} train and {args.n_val} val images to {args.out}')
