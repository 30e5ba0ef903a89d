"""DOTA data for training: the Dataset, its augmentations and its loader.

Datasets on disk are made and checked by prepare.py (`python prepare.py split|check|synth`) and their files are read
by labels.py; this module is what training reads, and it imports nothing of prepare.py.

Layout read everywhere:  ROOT/{train,val}/images/*.png|jpg|tif  and  ROOT/{train,val}/labelTxt/*.txt, or a
ROOT/{train,val}/manifest.json written by `split`.
Images stay uint8 until `to_input` turns a batch into normalized floats on the device (4x fewer bytes to copy).
"""
import itertools
import json
import math
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from labels import IMG_EXTS, LabelError, Problems, load_labels, read_image
from obb import clip_to_rect, obb_to_poly, poly_to_obb, wrap_angle

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the usual choice for ViT inputs
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- Dataset
class DOTADataset(torch.utils.data.Dataset):
    """Images of ROOT/SPLIT with their boxes. Labels are parsed once, at construction.

    train=True: a random crop to img_size (padded with zeros when the image is
    smaller; inside a padded tile's image part, which a `prepare.py split` manifest records) and, with
    flips=True, a random element of the dihedral group (flips and 90 degree rotations).
    train=False: the whole image.
    Item: (image uint8 (H, W, 3), {'boxes': (n, 4) float32 xyxy px, or with boxes='obb' (n, 5) cx, cy, w, h, theta,
    'labels': (n,) int64, 'difficult': (n,) bool, 'name': str, 'size': (H, W), 'origin': (top, left) px of the
    crop in its image, (0, 0) for a whole one: the ViT's patch positions (model.sincos_pos_embed) start there, so a
    model trained on crops has seen every position of the whole tiles; a turn swaps it, flips do not move it}).
    """

    def __init__(self, root, split, class_names, img_size=512, train=False, strict=False, flips=True, boxes='hbb'):
        if boxes not in ('hbb', 'obb'):
            raise ValueError(f"boxes must be 'hbb' or 'obb', got {boxes!r}")
        self.class_names, self.img_size, self.train, self.flips = class_names, img_size, train, flips
        self.kind = boxes
        self.strict, self.damaged = strict, []  # images that failed to decode during training (paths)
        folder = Path(root) / split
        if (folder / 'manifest.json').exists():  # written by `prepare.py split`: one file instead of one per tile
            self.files, self.targets, self.content = self._from_manifest(folder / 'manifest.json')
            return
        img_dir, lbl_dir = folder / 'images', folder / 'labelTxt'
        self.files = sorted(p for p in img_dir.glob('*') if p.suffix.lower() in IMG_EXTS)
        if not self.files:
            raise FileNotFoundError(f'no images in {img_dir}; expected ROOT/{split}/images/*.png|jpg|tif '
                                    f'with labels in ROOT/{split}/labelTxt/<same name>.txt')
        problems, self.targets = Problems(strict), []
        for stem in sorted({p.stem for p in lbl_dir.glob('*.txt')} - {f.stem for f in self.files}):
            problems.add('label file without an image (skipped)', str(lbl_dir / f'{stem}.txt'))
        readable = []
        for f in self.files:
            lbl = lbl_dir / (f.stem + '.txt')
            try:
                w, h = read_image(f, header_only=True)
            except ValueError as e:  # not an image, zero bytes, a directory...: `prepare.py check` says which
                problems.add('unreadable image (skipped)', str(e))
                continue
            readable.append(f)
            if lbl.exists():
                boxes, labels, diff = load_labels(lbl, class_names, w, h, problems, self.kind)
            else:
                problems.add('image without a label file (no objects)', str(f))
                boxes, labels, diff = np.zeros((0, self.ndim), np.float32), np.zeros(0, np.int64), np.zeros(0, int)
            self.targets.append({'boxes': boxes, 'labels': labels, 'difficult': diff > 0})
        self.files, self.content = readable, [None] * len(readable)  # content: see _from_manifest
        for kind, n in problems.counts.items():
            warnings.warn(f'{folder}: {n} x {kind}, e.g. {problems.places[kind][0]}')

    def add_unlabelled(self, folder, boxes_dir=None):
        """Append images that have no labels (pretraining only): FOLDER/manifest.json (a `prepare.py split` of images
        without labels, as DOTA's test set comes; any labels it holds are not read), else FOLDER/images/* or
        FOLDER/*. Their targets are empty: object masking hides random patches there. boxes_dir: a detector's boxes
        for them as DOTA label files named after each image (evaluate.py --write-labels), read like labels; an
        image without such a file keeps no boxes, counted in one warning. -> the number of images added."""
        folder = Path(folder)
        if (folder / 'manifest.json').exists():
            tiles = json.loads((folder / 'manifest.json').read_text())['tiles']
            files = [folder / t['file'] for t in tiles]
            content = [tuple(t['content'][::-1]) if 'content' in t else None for t in tiles]
        else:
            img_dir = folder / 'images' if (folder / 'images').is_dir() else folder
            files = sorted(p for p in img_dir.glob('*') if p.suffix.lower() in IMG_EXTS)
            content = [None] * len(files)
        if not files:
            raise FileNotFoundError(f'no images in {folder}; expected FOLDER/manifest.json, FOLDER/images/*.png|jpg|'
                                    'tif or FOLDER/*.png|jpg|tif')
        problems, empty = Problems(self.strict), {'boxes': np.zeros((0, self.ndim), np.float32),
                                                  'labels': np.zeros(0, np.int64), 'difficult': np.zeros(0, bool)}
        for f in files:
            lbl = Path(boxes_dir) / f'{f.stem}.txt' if boxes_dir else None
            if lbl is None:
                self.targets.append(empty)
            elif not lbl.exists():
                problems.add('unlabelled image without a box file (masked at random)', str(lbl))
                self.targets.append(empty)
            else:
                w, h = read_image(f, header_only=True)
                boxes, labels, diff = load_labels(lbl, self.class_names, w, h, problems, self.kind)
                self.targets.append({'boxes': boxes, 'labels': labels, 'difficult': diff > 0})
        self.files, self.content = self.files + files, self.content + content
        for kind, n in problems.counts.items():
            warnings.warn(f'{folder}: {n} x {kind}, e.g. {problems.places[kind][0]}')
        return len(files)

    def _from_manifest(self, path):
        m = json.loads(path.read_text())
        index = {name: i for i, name in enumerate(self.class_names)}
        files, targets, content = [], [], []
        for t in m['tiles']:
            unknown = set(t.get('labels', [])) - set(index)
            if unknown:
                raise LabelError(f'{path}: tile {t["name"]} has classes {sorted(unknown)} that are not in the class '
                                 f'list ({len(self.class_names)} classes); pass the --classes it was split with')
            files.append(path.parent / t['file'])
            content.append(tuple(t['content'][::-1]) if 'content' in t else None)  # (h, w) of a padded tile's image
            if self.kind == 'obb' and t.get('labels') and 'polys' not in t:
                raise LabelError(f'{path}: tile {t["name"]} has no polygons (a manifest of an older split); split '
                                 'the images again for oriented boxes')
            boxes = (poly_to_obb(np.asarray(t['polys'], np.float64).reshape(-1, 4, 2)) if self.kind == 'obb' and
                     t.get('labels') else t.get('boxes', []))
            targets.append({'boxes': np.asarray(boxes, np.float32).reshape(-1, self.ndim),
                            'labels': np.asarray([index[c] for c in t.get('labels', [])], np.int64),
                            'difficult': np.asarray(t.get('difficult', []), np.int64).reshape(-1) > 0})
        return files, targets, content

    def keep_sources(self, fraction):
        """Keep the tiles of a fraction of the source images, for fine-tuning on fewer labels than the pretraining
        saw images: of the N sources in name order, the k-th kept is floor(k / fraction) for k < ceil(N x fraction),
        evenly spaced and exact for 1/n (every 4th for 0.25, the first always). A tile's source is its name up to
        the first '__' (prepare.py split's naming), so the tiles of one image stay together. -> (kept, N) sources."""
        if not 0 < fraction <= 1:
            raise ValueError(f'fraction must be in (0, 1], got {fraction}')
        sources = [f.stem.split('__')[0] for f in self.files]
        names = sorted(set(sources))
        picks = np.floor(np.arange(math.ceil(len(names) * fraction - 1e-9)) / fraction + 1e-9).astype(int)
        chosen = {names[k] for k in picks}
        keep = [i for i, s in enumerate(sources) if s in chosen]
        self.files, self.targets, self.content = ([v[i] for i in keep]
                                                  for v in (self.files, self.targets, self.content))
        return len(chosen), len(names)

    @property
    def ndim(self):
        return 5 if self.kind == 'obb' else 4

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        """key: an index, or (index, seed): the seed fixes this item's augmentation (the Loader draws one per item
        and epoch in its own thread, so runs are reproducible whatever the thread timing); else the global RNG."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        t, within = self.targets[i], self.content[i]  # within: (h, w) of a padded tile's image part, or None
        try:
            with warnings.catch_warnings():  # the array is read-only: fine, nothing here writes to it
                warnings.simplefilter('ignore', UserWarning)
                img = torch.from_numpy(read_image(self.files[i]))  # (H, W, 3) uint8
        except ValueError as e:  # damaged after the header was read (truncated, corrupt): not a reason to end a run
            if self.strict:
                raise
            self.damaged.append(str(self.files[i]))  # list.append: safe from the loader's threads
            warnings.warn(f'{e}; used as an empty image without objects ({len(self.damaged)} damaged image(s) '
                          f'so far; --strict makes this an error)')
            side = self.img_size or 32
            img, t, within = torch.zeros((side, side, 3), dtype=torch.uint8), {k: v[:0] for k, v in t.items()}, None
        boxes, labels, diff = (torch.from_numpy(t[k]) for k in ('boxes', 'labels', 'difficult'))
        target, origin = {'name': self.files[i].stem}, (0, 0)
        if self.train:
            img, boxes, keep, origin = random_crop(img, boxes, self.img_size, g, within)
            labels, diff = labels[keep], diff[keep]
            if self.flips:
                boxes, target['flips'] = random_dihedral(boxes, img.shape[:2], g)
        turned = 'flips' in target and bool(target['flips'][0])
        target.update(boxes=boxes, labels=labels, difficult=diff, origin=origin[::-1] if turned else origin,
                      size=tuple(img.shape[1::-1] if turned else img.shape[:2]))  # (h, w) as the model will see it
        if not self.train and within:  # the whole tile: its image part (h, w) at the top left, the rest padding
            target['content'] = within
        return img, target


# The CPU side only decodes and crops (a view). Flips and 90-degree turns are drawn
# here but applied to the pixels on the device (orient): a transposing copy of a 1024^2 RGB tile costs ~2 ms on a
# CPU, half its JPEG decode; on the device it is free. The boxes are transformed here, so a target always describes
# the image as the model sees it.
def random_crop(img, boxes, size, generator=None, within=None):
    """A random window of at most size x size of img (H, W, 3), as a view (collate pads smaller ones); boxes are
    shifted and clipped, and those left with less than 1 px of width or height are dropped. -> window, boxes, keep
    mask, (top, left) of the window. within=(h, w): the window starts where it fits inside img[:h, :w] (a padded
    tile's image part), at 0 along a side shorter than size: no crop is spent on padding that it can avoid.
    Oriented boxes (N, 5) that the window cuts become the minimum-area rectangle of their visible part."""
    h, w = within or img.shape[:2]
    top, left = (int(torch.randint(0, max(n - size, 0) + 1, (), generator=generator)) for n in (h, w))
    img = img[top:top + size, left:left + size]
    if boxes.shape[1] == 5:
        b = boxes.double().numpy()
        poly = obb_to_poly(b) - (left, top)  # (N, 4, 2) window coordinates
        inside = ((poly >= 0) & (poly <= (img.shape[1], img.shape[0]))).all((1, 2))
        cut = poly_to_obb(clip_to_rect(poly, 0, 0, img.shape[1], img.shape[0]))
        b = np.where(inside[:, None], b - (left, top, 0, 0, 0), cut)
        keep = torch.from_numpy((b[:, 2] >= 1) & (b[:, 3] >= 1))
        return img, torch.from_numpy(b).to(boxes.dtype)[keep], keep, (top, left)
    limit = torch.tensor([img.shape[1], img.shape[0]] * 2, dtype=boxes.dtype)
    boxes = torch.minimum((boxes - torch.tensor([left, top] * 2, dtype=boxes.dtype)).clamp(min=0), limit)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return img, boxes[keep], keep, (top, left)


def random_dihedral(boxes, size, generator=None):
    """Draw one of the 8 flips/90-degree turns of an image of size (h, w) uniformly and apply it to its boxes (N, 4)
    xyxy or (N, 5) oriented -> (boxes, flips): flips = bool (turn, mirror left-right, mirror top-bottom), applied in
    this order; a turn is a transpose, drawn for square images only. `orient` applies the same to the pixels.
    An oriented box's direction (cos t, sin t) becomes (sin t, cos t) under the transpose (t -> pi/2 - t) and is
    mirrored by either flip (t -> -t); its sides keep their lengths."""
    h, w = size
    flips = torch.rand(3, generator=generator) < 0.5
    flips[0] &= h == w
    if boxes.shape[1] == 5:
        cx, cy, bw, bh, t = boxes.unbind(1)
        if flips[0]:
            cx, cy, t = cy, cx, math.pi / 2 - t
        if flips[1]:
            cx, t = w - cx, -t
        if flips[2]:
            cy, t = h - cy, -t
        return torch.stack([cx, cy, bw, bh, wrap_angle(t.double()).to(boxes.dtype)], 1), flips
    if flips[0]:
        boxes = boxes[:, [1, 0, 3, 2]]
    if flips[1]:
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    if flips[2]:
        boxes = torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)
    return boxes, flips


def orient(x, targets):
    """Apply each image's `flips` (drawn by random_dihedral) to x (B, C, H, W), on x's device -> a new tensor. An
    image sits at the top left of its padded slot and is turned and mirrored within its own size."""
    if not any(t.get('flips', torch.zeros(1)).any() for t in targets):
        return x
    out = torch.zeros_like(x)
    for b, t in enumerate(targets):  # one whole-image copy each
        h, w = t['size']
        img = x[b, :, :h, :w]
        if 'flips' in t:
            turn, left_right, top_bottom = t['flips'].tolist()
            if turn:  # square images only, so the size stays (h, w)
                img = img.transpose(1, 2)
            dims = [d for d, f in ((2, left_right), (1, top_bottom)) if f]
            if dims:
                img = img.flip(dims)
        out[b, :, :h, :w] = img
    return out


def collate(batch, multiple=32, pin=False):
    """Copy the images ((H, W, 3) uint8 tensors) into one batch (B, H, W, 3), zero-padded to the largest size
    rounded up to `multiple` (the patch size) so that every image has the same token grid. pin: page-locked memory
    (GPU training: torch recycles these buffers, and the copy to the device is asynchronous). -> batch, targets."""
    h = -(-max(im.shape[0] for im, _ in batch) // multiple) * multiple
    w = -(-max(im.shape[1] for im, _ in batch) // multiple) * multiple
    images = torch.empty((len(batch), h, w, 3), dtype=torch.uint8, pin_memory=pin)
    for i, (im, _) in enumerate(batch):
        images[i, :im.shape[0], :im.shape[1]] = im
        images[i, im.shape[0]:] = 0
        images[i, :im.shape[0], im.shape[1]:] = 0
    return images, [t for _, t in batch]


class Loader:
    """Batches (images (B, H, W, 3) uint8, targets) of `dataset`, made by `workers` threads of this process, each
    batch by one thread, `prefetch` batches ahead per thread, yielded in order. Every epoch (iteration) draws a new
    order (shuffle) and a seed per item for its augmentation, from the Loader's own generator, in this thread; or
    pass `keys`, the items (index or (index, seed)) in order. Under DDP, rank r of `world` takes every world-th item
    (the generator starts from the global seed, so all ranks draw the same order).
    Threads, not torch's DataLoader processes: Pillow decodes with the GIL released, so threads decode in parallel,
    and a batch needs no hand-over between processes, which copies it into fresh shared memory (measured here:
    +2.5 ms per 1024^2 tile, 60 % of its decode; bench/data_bench.py)."""

    def __init__(self, dataset, batch_size, patch_size, workers=4, shuffle=False, drop_last=False, keys=None,
                 prefetch=2, rank=0, world=1):
        self.dataset, self.batch_size, self.patch_size, self.workers = dataset, batch_size, patch_size, workers
        self.shuffle, self.drop_last, self.keys, self.prefetch = shuffle, drop_last, keys, prefetch
        self.rank, self.world = rank, world
        self.pin = torch.cuda.is_available()
        if keys is None:  # seeded from the global RNG once, here: later draws do not disturb it
            self.generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))

    def __len__(self):
        n = len(self.keys if self.keys is not None else self.dataset) // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batch(self, keys):
        return collate([self.dataset[k] for k in keys], self.patch_size, self.pin)

    def __iter__(self):
        keys = self.keys
        if keys is None:
            n, g = len(self.dataset), self.generator
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else range(n)
            keys = list(zip(order, torch.randint(2 ** 62, (n,), generator=g).tolist()))
        keys = keys[:len(keys) // self.world * self.world][self.rank::self.world]  # equal shares: DDP steps together
        batches = [keys[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]
        if self.workers == 0:
            yield from map(self._batch, batches)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix='loader')
        try:
            todo = iter(batches)
            queue = deque(pool.submit(self._batch, b) for b in itertools.islice(todo, self.workers * self.prefetch))
            while queue:
                batch = queue.popleft().result()
                queue.extend(pool.submit(self._batch, b) for b in itertools.islice(todo, 1))
                yield batch
        finally:  # also when the consumer stops early: drop the batches not started yet
            pool.shutdown(wait=True, cancel_futures=True)


def epoch_loader(ds, batch_size, patch_size, workers, seed, epoch, start_batch=0, rank=0, world=1, accum=1):
    """A Loader of this rank's training batches of one epoch, from `start_batch` on. The order is a fixed permutation
    of (seed, epoch) cut into global batches of batch_size x world images, rank r taking the r-th slice of each, so
    one process with batch B x world sees the same global batches as world processes with batch B; only whole
    optimizer steps (accum batches) are kept. Each image carries a seed for its augmentation fixed by (seed, epoch,
    index): a resumed or multi-GPU run draws the same crops and flips."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    gb = batch_size * world
    steps = len(ds) // (gb * accum) * accum
    mine = [order[k * gb + rank * batch_size + j] for k in range(start_batch, steps) for j in range(batch_size)]
    keys = [(i, (seed * 1000003 + epoch) * 10000019 + i) for i in mine]
    return Loader(ds, batch_size, patch_size, workers, keys=keys)


def make_loader(root, split, class_names, img_size, batch_size, train, workers, patch_size, rank=0, world=1,
                flips=True, strict=False, boxes='hbb'):
    ds = DOTADataset(root, split, class_names, img_size, train, strict=strict, flips=flips, boxes=boxes)
    return Loader(ds, batch_size, patch_size, workers, shuffle=train, drop_last=train and len(ds) >= batch_size,
                  rank=rank, world=world)


def to_input(images, targets, device):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalized, flipped/turned as the targets say (orient), on `device`
    (channels-last in memory: conv-friendly). The targets are required: their boxes already describe the flipped
    images."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = orient(x, targets).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(STD, device=device).view(1, 3, 1, 1)


def crop_offsets(targets, patch_size, device):
    """(B, 2) float32 on `device`: each image's crop origin (top, left) in patches (fractional when a crop does not
    start on a patch edge): the ViT's position offset, so that a crop's tokens carry its place in the whole tile."""
    return torch.tensor([t['origin'] for t in targets], dtype=torch.float32).div_(patch_size).to(device)
