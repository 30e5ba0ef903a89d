"""Detect objects on your own aerial scenes, of any size: a checkpoint and images in, drawn and written boxes out.

    python detect.py --ckpt runs/finetune/best.pt scenes/                 # every image of a folder
    python detect.py --ckpt best.pt P0001.png 'more/*.tif' --rates 0.5 1  # files and globs, two scales merged

Each scene is decoded once and cut in memory into the overlapping windows of `prepare.py split` at the model's tile
size (zero-padded at the borders and where a scene is smaller than a tile), the tiles streamed to the model in
batches (bf16 autocast on CUDA, as evaluate.py), and each scene's tile detections merged across the seams by
submission.merge_tiles (class-wise NMS at IoU 0.5, the code `evaluate.py --merge` runs). The result is the same as
`prepare.py split --format png` + `evaluate.py --merge`, with no tile written to disk. --rates resizes the scene as
split does and merges the scales together.

Writes to --out, for every scene:
    <scene>.jpg          the scene (downscaled to --draw-size) with its boxes scoring >= --draw-conf, a colour per
                         class and a legend (boxes of small objects are drawn at least 4 px wide, so they stay visible)
    <scene>_crop<k>.jpg  with --crops K: the K tile-sized windows holding most boxes, at full resolution
    labels/<scene>.txt   one line per detection, scene pixels: `class score x1 y1 x2 y2` (DOTA task 2) or, for an
                         oriented (--boxes obb) model, `class score x1 y1 x2 y2 x3 y3 x4 y4` (task 1)
and for the run:
    results.json         every detection, COCO results style: image_id (the scene's file stem), category_id (the
                         class's index in the checkpoint's list), category, bbox [x, y, w, h], score (+ poly)
    Task<t>_<class>.txt  DOTA submission files (what `evaluate.py --dets` reads)

Inputs: PNG, JPEG, TIFF, BMP. Grayscale, RGBA and palette images are converted to RGB. Images of more than 8 bits
or more than 4 bands are refused before anything runs (the message says how to convert them); a file that cannot be
decoded is skipped with a counted warning naming it, and the run goes on.
"""
import argparse
import glob
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, TiffImagePlugin
from tqdm import tqdm

from evaluate import PALETTE, load_detector, predict
from labels import IMG_EXTS, read_image
from prepare import cut, rescale, windows
from submission import merge_tiles, write_submission

CONVERT = 'convert it to 8-bit RGB first, e.g. gdal_translate -ot Byte -scale -b 1 -b 2 -b 3 {} scene_rgb.tif'


def find_scenes(sources):
    """Files, folders (their images, sorted) and globs -> a list of paths. A source that matches no image, or two
    scenes with the same file stem (their outputs would overwrite each other), is an error."""
    scenes = []
    for s in sources:
        p = Path(s)
        found = ([p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix.lower() in IMG_EXTS) if p.is_dir()
                 else sorted(Path(f) for f in glob.glob(s) if Path(f).suffix.lower() in IMG_EXTS))
        if not found:
            raise SystemExit(f'{s}: not an image, a folder of images or a glob matching images ({" ".join(IMG_EXTS)})')
        scenes += found
    stems = {}
    for f in scenes:
        if stems.setdefault(f.stem, f) != f:
            raise SystemExit(f'{stems[f.stem]} and {f}: two scenes named {f.stem!r}; their outputs would collide')
    return scenes


def unsupported(path):
    """Why a scene cannot be read as 8-bit RGB (16-bit or float pixels, more than 4 bands), or None. Headers only:
    Pillow opens 16-bit RGB PNGs and TIFFs by dropping the low byte, so the bit depth is read from the file itself,
    and it cannot open a TIFF of more than 4 bands at all, so then the TIFF tags are read directly."""
    try:
        with Image.open(path) as im:
            bits = int(np.max(getattr(im, 'tag_v2', {}).get(258, 8)))  # TIFF BitsPerSample
            if im.format == 'PNG':
                with open(path, 'rb') as f:
                    bits = f.read(25)[24]  # the IHDR chunk's bit depth
            if im.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F') or bits > 8:
                return f'{bits if bits > 8 else 32}-bit pixels ({im.mode})'
            return None
    except (OSError, ValueError, SyntaxError):  # not something Pillow opens: a many-band TIFF, or a broken file
        pass
    try:
        with open(path, 'rb') as f:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(f.read(8))
            f.seek(ifd.next)
            ifd.load(f)
        bands, bits = int(ifd.get(277, 1)), int(np.max(ifd.get(258, 8)))
    except Exception:  # not a TIFF either: unreadable, which the run reports as a skipped file
        return None
    return f'{bands} bands of {bits}-bit pixels' if bands > 4 or bits > 8 else None


def tile_names(stem, width, height, size, gap, rates):
    """The tiles of a scene, in prepare.split's order and names: [(name, rate, left, top)]."""
    out = []
    for rate in rates:
        w, h = max(round(width * rate), 1), max(round(height * rate), 1)
        out += [(f'{stem}__{rate:g}__{left}___{top}', rate, left, top)
                for top in windows(h, size, gap) for left in windows(w, size, gap)]
    return out


def stream(scenes, size, rates, batch_size, multiple, keep_image, bar):
    """Batches of tiles across scenes -> (uint8 (B, S, S, 3), targets with each tile's name and scene), S = size
    rounded up to `multiple` (the patch size) with zeros, as data.collate pads. A scene is decoded once (rescaled
    per rate) and dropped when its last tile is cut; `keep_image` keeps it in the scene record (for crops). A scene
    that cannot be decoded is recorded as skipped; its tiles are counted on the progress bar `bar`."""
    tiles, targets, side = [], [], -(-size // multiple) * multiple
    for scene in scenes:
        try:
            img = read_image(scene['path'])  # (H, W, 3) uint8
        except ValueError as e:
            scene['skipped'] = str(e)
            bar.update(len(scene['tiles']))
            continue
        scene['overview'] = Image.fromarray(img).reduce(scene['reduce'])  # the picture, small
        scene['image'] = img if keep_image else None
        for rate in rates:
            scaled = rescale(img, rate)
            for name, r, left, top in scene['tiles']:
                if r == rate:
                    tile = torch.zeros((side, side, 3), dtype=torch.uint8)
                    tile[:size, :size] = torch.from_numpy(cut(scaled, left, top, size)[0])
                    tiles.append(tile)
                    targets.append({'name': name, 'scene': scene, 'size': (size, size), 'boxes': np.zeros((0, 4))})
                    if len(tiles) == batch_size:
                        yield torch.stack(tiles), targets
                        tiles, targets = [], []
    if tiles:
        yield torch.stack(tiles), targets


def draw_scene(scene, det, class_names, conf, out):
    """The scene's overview with each box scoring >= conf (boxes at least 4 px across, so that a 10 px car in a
    10,000 px scene stays visible) and a legend of the classes drawn, with their counts."""
    im, s = scene['overview'].convert('RGB'), 1 / scene['reduce']
    draw = ImageDraw.Draw(im)
    keep = det['scores'] >= conf
    boxes, labels = det['boxes'][keep] * s, det['labels'][keep].astype(int)
    width = 1 if max(im.size) < 1000 else 2
    for b, c in zip(boxes, labels):  # a picture: one draw call per box
        colour = PALETTE[c % len(PALETTE)]
        if len(b) == 8:
            draw.polygon(b.tolist(), outline=colour, width=width)
        else:
            centre, half = (b[:2] + b[2:]) / 2, np.maximum((b[2:] - b[:2]) / 2, 2)
            draw.rectangle([*(centre - half), *(centre + half)], outline=colour, width=width)
    counts = np.bincount(labels, minlength=len(class_names))
    rows = [(c, f'{class_names[c]} {counts[c]}') for c in np.flatnonzero(counts)]
    if rows:
        draw.rectangle([0, 0, 12 + 7 * max(len(t) for _, t in rows), 6 + 14 * len(rows)], fill=(0, 0, 0))
        for k, (c, text) in enumerate(rows):
            draw.text((6, 4 + 14 * k), text, fill=PALETTE[c % len(PALETTE)])
    im.save(out, quality=90)


def save_crops(scene, det, class_names, conf, size, n, out_dir):
    """The n windows of side `size` (on a grid of half-tile steps) holding most box centres, at full resolution,
    boxes drawn -> out_dir/<scene>_crop<k>.jpg."""
    img, keep = scene['image'], det['scores'] >= conf
    h, w = img.shape[:2]
    b = det['boxes'][keep]
    xy = b.reshape(len(b), b.shape[1] // 2, 2).mean(1)  # (m, 2) box centres
    tops, lefts = windows(h, size, size // 2), windows(w, size, size // 2)
    inside = ((xy[:, None, None, 0] >= np.array(lefts)[None, None, :]) &
              (xy[:, None, None, 0] < np.array(lefts)[None, None, :] + size) &
              (xy[:, None, None, 1] >= np.array(tops)[None, :, None]) &
              (xy[:, None, None, 1] < np.array(tops)[None, :, None] + size))  # (m, rows, cols)
    for k, cell in enumerate(np.argsort(-inside.sum(0).ravel(), kind='stable')[:n]):
        top, left = tops[cell // len(lefts)], lefts[cell % len(lefts)]
        crop = {'overview': Image.fromarray(img[top:top + size, left:left + size]), 'reduce': 1}
        boxes = det['boxes'] - np.tile([left, top], det['boxes'].shape[1] // 2)
        draw_scene(crop, {**det, 'boxes': boxes}, class_names, conf, out_dir / f'{scene["path"].stem}_crop{k}.jpg')


def write_scene(det, class_names, path):
    """labels/<scene>.txt: `class score x1 y1 x2 y2` (or the 4 corners) per detection, best first."""
    path.write_text(''.join(f'{class_names[int(c)]} {s:.4f} ' + ' '.join(f'{v:.1f}' for v in b) + '\n'
                            for c, s, b in zip(det['labels'], det['scores'], det['boxes'])))


def coco_results(image_id, det, class_names):
    """One scene's detections as COCO result records (bbox [x, y, w, h]; oriented boxes also as `poly`)."""
    b = np.asarray(det['boxes'], np.float64)
    b = b.reshape(len(b), b.shape[1] // 2, 2)  # (n, 2 or 4, 2) corners
    lo, hi = b.min(1), b.max(1)
    return [{'image_id': image_id, 'category_id': int(c), 'category': class_names[int(c)],
             'bbox': [round(float(v), 2) for v in (*lo[k], *(hi[k] - lo[k]))], 'score': round(float(s), 5),
             **({'poly': [round(float(v), 2) for v in b[k].ravel()]} if b.shape[1] == 4 else {})}
            for k, (c, s) in enumerate(zip(det['labels'], det['scores']))]


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('source', nargs='+', help='image files, folders of images, or globs (quoted)')
    ap.add_argument('--ckpt', required=True, help='a finetune.py checkpoint')
    ap.add_argument('--out', default='runs/detect', help='output folder (default: %(default)s)')
    ap.add_argument('--size', type=int, default=None, help="tile side in pixels (default: the checkpoint's "
                    'training --img-size; a model trained on crops of larger tiles, as the DOTA recipe\'s 512 px crops '
                    'of 1024 px tiles, may take the tile size: --size 1024)')
    ap.add_argument('--gap', type=int, default=None, help='overlap of neighbouring tiles, px (default: a quarter '
                                                          'of --size)')
    ap.add_argument('--rates', type=float, nargs='+', default=[1.0], help='scales to run the scene at, as '
                    'prepare.py split --rates; all are merged (default: 1)')
    ap.add_argument('--conf', type=float, default=0.25, help='score a detection needs to be written (default: '
                    '%(default)s; 0.001 for detections to compute mAP from, as evaluate.py)')
    ap.add_argument('--draw-conf', type=float, default=0.3, help='score a box needs to be drawn (default: '
                                                                 '%(default)s)')
    ap.add_argument('--draw-size', type=int, default=2048, help='longest side of the drawn overview; larger '
                    'scenes are reduced by an integer factor (default: %(default)s)')
    ap.add_argument('--crops', type=int, default=0, help='also draw the K tile-sized windows holding most boxes at '
                                                         'full resolution (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=16, help='tiles per forward pass (default: %(default)s)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    return ap


def main(argv=None):
    args = get_parser().parse_args(argv)
    scenes = find_scenes(args.source)
    refused = [(p, why) for p in scenes for why in [unsupported(p)] if why]
    if refused:
        raise SystemExit('\n'.join(f'{p}: {why}; ' + CONVERT.format(p) for p, why in refused))
    device = torch.device(args.device)
    model, ckpt = load_detector(args.ckpt, device)
    a, class_names = ckpt['args'], ckpt['class_names']
    size = args.size or a['img_size']
    gap = size // 4 if args.gap is None else args.gap
    if not 0 <= gap < size:
        raise SystemExit(f'--gap {gap} must be at least 0 and smaller than the tile size {size}')
    gate = a.get('centre_gate')
    out = Path(args.out)
    (out / 'labels').mkdir(parents=True, exist_ok=True)

    records, skipped = [], []
    for p in scenes:  # headers only: the tiles of every scene, for the progress bar
        try:
            w, h = read_image(p, header_only=True)
        except ValueError as e:
            skipped.append(str(e))
            continue
        records.append({'path': p, 'tiles': tile_names(p.stem, w, h, size, gap, args.rates), 'done': {},
                        'reduce': max(1, -(-max(w, h) // args.draw_size))})
    t0, results, merged_all = time.time(), [], {}
    bar = tqdm(total=sum(len(r['tiles']) for r in records), unit='tile', desc='detect')
    batches = stream(records, size, args.rates, args.batch_size, a['patch_size'], args.crops > 0, bar)
    for _, targets, dets in predict(model, batches, device, args.conf, 1000, centre_gate=gate):
        for t, d in zip(targets, dets):
            scene = t['scene']
            scene['done'][t['name']] = d
            if len(scene['done']) < len(scene['tiles']):
                continue
            stem = scene['path'].stem  # its last tile: merge, write, draw, free
            det = merge_tiles(scene.pop('done'))[stem]
            merged_all[stem] = det
            write_scene(det, class_names, out / 'labels' / f'{stem}.txt')
            results += coco_results(stem, det, class_names)
            draw_scene(scene, det, class_names, args.draw_conf, out / f'{stem}.jpg')
            if args.crops:
                save_crops(scene, det, class_names, args.draw_conf, size, args.crops, out)
            scene['overview'] = scene['image'] = None
        bar.update(len(targets))
    bar.close()
    skipped += [r['skipped'] for r in records if 'skipped' in r]
    (out / 'results.json').write_text(json.dumps(results))
    task = write_submission(out, merged_all, class_names)
    try:  # the high-water mark of this process's own memory (ru_maxrss also counts what a parent had at fork)
        peak = int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]) / 1024
    except (OSError, StopIteration):  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** (2 if sys.platform == 'darwin' else 1)
    print(f'{len(merged_all)} scenes, {sum(len(r["tiles"]) for r in records if "skipped" not in r)} tiles of '
          f'{size} px (gap {gap}, rates {" ".join(f"{r:g}" for r in args.rates)}), {len(results)} detections '
          f'scoring >= {args.conf:g} in {time.time() - t0:.1f} s; peak memory {peak:.0f} MB\n'
          f'{out}/<scene>.jpg, {out}/labels/<scene>.txt, {out}/results.json, {out}/Task{task}_<class>.txt')
    if skipped:
        print(f'warning: {len(skipped)} file(s) could not be read and were skipped:\n  ' + '\n  '.join(skipped),
              file=sys.stderr)


if __name__ == '__main__':
    main()
