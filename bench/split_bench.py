"""Splitting throughput and peak memory: the real DOTA sample (if present) and a generated large image.

    python bench/split_bench.py [--big 6000] [--objects 2000] [--workers 2]

Runs `python prepare.py split` as a separate process (so that the peak memory printed by the split is its own) on
(a) ../shared/dota_sample (or $DOTA_SAMPLE) and (b) a generated BIG x BIG PNG with about OBJECTS objects, then
`python prepare.py check` on the result. Prints images/s, MB/s read and the peak resident memory of a worker.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prepare import synth_image  # noqa: E402


def run(*args):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout + p.stderr)
    return p.stdout, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--big', type=int, default=6000, help='side of the generated image (default: %(default)s)')
    ap.add_argument('--objects', type=int, default=2000, help='single objects to place (default: %(default)s)')
    ap.add_argument('--workers', type=int, default=2, help='split processes (default: %(default)s)')
    args = ap.parse_args()
    sample = Path(os.environ.get('DOTA_SAMPLE', ROOT.parent / 'shared' / 'dota_sample'))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (sample / 'images').is_dir():
            out, dt = run('split', '--src', sample, '--dst', tmp / 'sample', '--workers', args.workers)
            print(f'DOTA sample ({len(list((sample / "images").glob("*.png")))} images): '
                  + ' | '.join(line for line in out.splitlines() if line.startswith(('split ', 'wrote'))))
        else:
            print(f'DOTA sample not found at {sample}: skipped')
        t0 = time.time()
        img, objects = synth_image(np.random.default_rng(0), args.big, n_rows=args.big // 100, n_single=args.objects)
        (tmp / 'big' / 'images').mkdir(parents=True)
        (tmp / 'big' / 'labelTxt').mkdir()
        img.save(tmp / 'big' / 'images' / 'G0.png', compress_level=1)
        (tmp / 'big' / 'labelTxt' / 'G0.txt').write_text(
            ''.join(' '.join(f'{v:.1f}' for v in p.ravel()) + f' {n} 0\n' for p, n in objects))
        mb = (tmp / 'big' / 'images' / 'G0.png').stat().st_size / 1e6
        print(f'generated {args.big}x{args.big} image with {len(objects)} objects ({mb:.0f} MB PNG) in '
              f'{time.time() - t0:.1f} s')
        out, dt = run('split', '--src', tmp / 'big', '--dst', tmp / 'big_tiles' / 'train', '--workers', args.workers)
        print('large image: ' + ' | '.join(line for line in out.splitlines() if line.startswith(('split ', 'wrote'))))
        out, dt = run('check', '--data', tmp / 'big_tiles', '--workers', args.workers)
        lines = out.splitlines()
        print(f'check of its tiles ({dt:.1f} s): ' + ' | '.join(
            line.strip() for line in lines if 'objects' in line or 'sizes' in line or 'error' in line))


if __name__ == '__main__':
    main()
