"""One large scene, two ways: detect.py (tiles cut in memory) against prepare.py split + evaluate.py --merge.

    bash demo.sh                                      # once: the demo's detector (runs/demo/finetune/best.pt)
    python bench/detect_bench.py                      # a 4096 px synthetic scene
    python bench/detect_bench.py --scene-size 10240   # the peak memory of a 10,000 px class scene

The scene is the project's synthetic ground and objects (prepare.synth_image, 2048 px, repeated to --scene-size),
saved once as PNG. Both paths run as their own processes, one after the other, on the same scene, tile size (the
checkpoint's --img-size), overlap and --conf: the split path writes the tiles to disk (JPEG, split's default, or
--format png) and evaluates them with --merge; detect.py decodes the scene once and streams its tiles to the model.
Printed: seconds and peak memory (the high-water mark of resident memory) of each step, the ratio of their times (above 1: detect.py is faster),
and whether their DOTA submission files agree (with --format png they are the same tiles, so the same text).
The detector: the demo's (trained on the same synthetic objects, 128 px tiles) or --ckpt.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prepare import synth_image  # noqa: E402


# Runs a script as __main__ and then writes its peak memory: VmHWM, the high-water mark of the memory map that exec
# gave it (ru_maxrss would also count the RSS of this benchmark, the process it was forked from)
PEAK = ("import atexit, runpy, sys; out = sys.argv.pop(1); sys.argv = sys.argv[1:]; atexit.register(lambda: open(out, "
        "'w').write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])); "
        "runpy.run_path(sys.argv[0], run_name='__main__')")


def timed(cmd, log):
    """Run a script command (printed first) -> (seconds, its peak memory in MB)."""
    print('$ python', ' '.join(str(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, 'w') as f:
        subprocess.run([sys.executable, '-c', PEAK, f'{log}.peak', *[str(c) for c in cmd]], cwd=ROOT, stdout=f,
                       stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0, int(Path(f'{log}.peak').read_text()) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', default='runs/demo/finetune/best.pt', help='a finetune.py checkpoint (default: '
                    "the demo's, from bash demo.sh)")
    ap.add_argument('--scene-size', type=int, default=4096, help='side of the square scene, px (default: %(default)s)')
    ap.add_argument('--gap', type=int, default=None, help='tile overlap, px (default: a quarter of the tile, as '
                                                          'detect.py)')
    ap.add_argument('--conf', type=float, default=0.25, help='score floor of both paths (default: %(default)s)')
    ap.add_argument('--format', choices=['jpg', 'png'], default='jpg', help="split's tile format (default: "
                                                                              '%(default)s, its own default)')
    ap.add_argument('--device', default='cpu', help='(default: %(default)s)')
    ap.add_argument('--out', default='runs/detect_bench', help='work folder (default: %(default)s)')
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    (out / 'src' / 'images').mkdir(parents=True, exist_ok=True)
    scene = out / 'src' / 'images' / f'scene{args.scene_size}.png'
    if not scene.exists():
        base = np.asarray(synth_image(np.random.default_rng(0), 2048, n_rows=150, n_single=1500)[0])
        reps = -(-args.scene_size // 2048)
        Image.fromarray(np.tile(base, (reps, reps, 1))[:args.scene_size, :args.scene_size]).save(scene)
    ckpt = (ROOT / args.ckpt).resolve()
    if not ckpt.exists():
        raise SystemExit(f'{ckpt} not found: run bash demo.sh first, or pass --ckpt')
    size = torch.load(ckpt, map_location='cpu', weights_only=True)['args']['img_size']
    args.gap = size // 4 if args.gap is None else args.gap
    dev = ['--device', args.device]

    t_det, m_det = timed(['detect.py', scene, '--ckpt', ckpt, '--gap', args.gap, '--conf', args.conf,
                          '--out', out / 'detect', *dev], out / 'detect.log')
    tiles = out / 'tiles'
    subprocess.run(['rm', '-rf', str(tiles)], check=True)
    t_split, m_split = timed(['prepare.py', 'split', '--src', out / 'src', '--dst', tiles / 'scene', '--size',
                              size, '--gap', args.gap, '--format', args.format, '--images-only'], out / 'split.log')
    t_eval, m_eval = timed(['evaluate.py', '--ckpt', ckpt, '--data', tiles, '--split', 'scene', '--merge',
                            '--conf', args.conf, '--out', out / 'merge', *dev], out / 'merge.log')
    same = all((out / 'detect' / f.name).read_text() == f.read_text()
               for f in sorted((out / 'merge' / 'submission').glob('Task*_*.txt')))
    n_tiles = len(list((tiles / 'scene' / 'images').glob('*')))
    print(f'\n{args.scene_size}^2 synthetic scene, {n_tiles} tiles of {size} px (gap {args.gap}), '
          f'{Path(ckpt).name}, --conf {args.conf}, {args.device}, {torch.get_num_threads()} threads')
    print(f'{"path":44s} {"seconds":>8s} {"peak MB":>8s}')
    print(f'{"detect.py (in memory)":44s} {t_det:8.1f} {m_det:8.0f}')
    print(f'{"prepare.py split --format " + args.format:44s} {t_split:8.1f} {m_split:8.0f}  (its workers: split.log)')
    print(f'{"evaluate.py --merge":44s} {t_eval:8.1f} {m_eval:8.0f}')
    print(f'{"split + merge":44s} {t_split + t_eval:8.1f} {max(m_split, m_eval):8.0f}')
    print(f'ratio (split + merge) / detect.py: {(t_split + t_eval) / t_det:.2f}x; submission files identical: {same}'
          + (' (JPEG tiles are not the scene\'s pixels: a difference is expected)' if not same and
             args.format == 'jpg' else ''))


if __name__ == '__main__':
    main()
