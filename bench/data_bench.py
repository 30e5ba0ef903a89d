"""Training-loader throughput against raw Pillow decoding of the same 1024^2 tiles, JPEG q95 and PNG.

    python bench/data_bench.py [--tiles 48] [--img-size 1024]

Both rates are measured in this run, on the same files: the decode baseline opens and fully decodes each tile in
this process; the loader is DOTADataset (manifest, random crop, flips/turns drawn) through data.Loader with one
worker thread, so its rate is per worker; the pixels' flips are applied on the device (data.orient), timed
separately here on this CPU. Printed last: the loader against decode-to-array (goal >= 0.85: decoding into a numpy
array is the least any Pillow-based loader must do) and, beside it, against Pillow's raw decode.
Also prints JPEG vs PNG decode speed and the JPEG tiles' PSNR against the lossless PNG ones.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import Loader, collate, make_loader, orient  # noqa: E402
from labels import CLASSES  # noqa: E402
from prepare import split, synth_image  # noqa: E402


def make_tiles(root, n_tiles):
    """A synthetic 'full image' cut into n_tiles tiles of 1024^2, once as JPEG and once as PNG."""
    side = 1024 * int(np.ceil(np.sqrt(n_tiles)))
    img, objects = synth_image(np.random.default_rng(0), side, n_rows=side // 100, n_single=side * side // 5000)
    (root / 'src' / 'images').mkdir(parents=True)
    (root / 'src' / 'labelTxt').mkdir()
    img.save(root / 'src' / 'images' / 'B0.png', compress_level=1)
    (root / 'src' / 'labelTxt' / 'B0.txt').write_text(
        ''.join(' '.join(f'{v:.1f}' for v in p.ravel()) + f' {n} 0\n' for p, n in objects))
    for fmt in ('jpg', 'png'):
        split(root / 'src', root / fmt / 'train', size=1024, gap=0, fmt=fmt, workers=2, classes=CLASSES['dota1.0'])


def decode_rate(files, to_array=False):
    """Tiles/s of Pillow alone, in this process: open and fully decode each file (and, with to_array, hand the
    pixels out as a numpy array, the least any Pillow-based loader must do: ~2 ms per 1024^2 tile in tobytes)."""
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            np.asarray(im) if to_array else im.load()
    return len(files) / (time.perf_counter() - t0)


class NoCopyLoader(Loader):
    """The training loader without its batch copy: a batch is the list of its items. Not usable for training (the
    images differ in size); it measures what decoding and holding a batch's images costs without the copy."""

    def _batch(self, keys):
        items = [self.dataset[k] for k in keys]
        return [im for im, _ in items], [t for _, t in items]


def loader_rate(loader):
    """Tiles/s through the training loader, over one epoch."""
    n, t0 = 0, time.perf_counter()
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tiles', type=int, default=48, help='number of 1024^2 tiles per format (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=1024, help='training crop of the loader (default: %(default)s)')
    ap.add_argument('--repeat', type=int, default=5, help='alternating measurement rounds, medians reported '
                                                          '(default: %(default)s)')
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiles(root, args.tiles)
        files = {fmt: sorted((root / fmt / 'train' / 'images').glob(f'*.{fmt}')) for fmt in ('jpg', 'png')}
        a = np.stack([np.asarray(Image.open(f), np.float64) for f in files['jpg'][:8]])
        b = np.stack([np.asarray(Image.open(f), np.float64) for f in files['png'][:8]])
        psnr = 10 * np.log10(255 ** 2 / ((a - b) ** 2).mean())
        rates = {}
        for fmt in ('jpg', 'png'):
            loader = make_loader(root / fmt, 'train', CLASSES['dota1.0'], args.img_size, 4, True, 1, 16)
            loader_rate(loader)  # warms the file cache
            # the machine's speed drifts: alternate the two measurements and keep the median of each
            runs = [(decode_rate(files[fmt]), decode_rate(files[fmt], True), loader_rate(loader))
                    for _ in range(args.repeat)]
            dec, arr, load = (float(np.median(x)) for x in zip(*runs))
            rates[fmt] = (dec, load, arr)
            if fmt == 'jpg':
                nocopy = NoCopyLoader(loader.dataset, 4, 16, 1, shuffle=True, drop_last=True)
                rates['nocopy'] = float(np.median([loader_rate(nocopy) for _ in range(args.repeat)]))
            print(f'{fmt}: {len(files[fmt])} tiles; Pillow decode {dec:.1f} tiles/s, decode to array {arr:.1f} '
                  f'tiles/s; loader (1 worker, crop {args.img_size}) {load:.1f} tiles/s; ratio loader/decode '
                  f'{load / dec:.2f}, loader/decode-to-array {load / arr:.2f}')
        # where the loader's time goes, in this process: decode + array + crop view (items), the batch copy (collate)
        ds = make_loader(root / 'jpg', 'train', CLASSES['dota1.0'], args.img_size, 4, True, 0, 16).dataset
        t0 = time.perf_counter()
        items = [ds[i] for i in range(len(ds))]
        t_item = (time.perf_counter() - t0) / len(ds)
        t0 = time.perf_counter()
        batches = [collate(items[k:k + 4], 16) for k in range(0, len(items), 4)]
        t_coll = (time.perf_counter() - t0) / len(items)
        t0 = time.perf_counter()
        for images, targets in batches:
            orient(images.permute(0, 3, 1, 2), targets)
        t_orient = (time.perf_counter() - t0) / len(items)
        print(f'jpg per tile: decode {1e3 / rates["jpg"][0]:.2f} ms; dataset item (decode, to array, crop view) '
              f'{1e3 * t_item:.2f} ms; collate (batch copy) {1e3 * t_coll:.2f} ms; loader {1e3 / rates["jpg"][1]:.2f} '
              f'ms. Flips/turns of the pixels on this CPU (on the device in training, not in the loader) '
              f'{1e3 * t_orient:.2f} ms')
        print(f'JPEG q95 decodes {rates["jpg"][0] / rates["png"][0]:.1f}x faster than PNG; PSNR of JPEG tiles vs PNG '
              f'{psnr:.1f} dB')
        dec, load, arr = rates['jpg']
        print(f'jpg without the batch copy (decode, crop, hold the batch\'s images): {rates["nocopy"]:.1f} tiles/s, '
              f'{rates["nocopy"] / arr:.2f} of decode-to-array')
        print(f'jpg loader/decode-to-array ratio (goal >= 0.85): {load / arr:.2f}; loader/raw decode: {load / dec:.2f}')


if __name__ == '__main__':
    main()
