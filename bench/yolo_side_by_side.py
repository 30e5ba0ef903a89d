"""The project's detector against Ultralytics YOLOv8n: same NWPU tiles, same minutes, same machine, one evaluator.

    python bench/yolo_side_by_side.py --minutes 30                 # ~70 minutes in all on 2 cores
    python bench/yolo_side_by_side.py --minutes 60 --out runs/yolo60

The project's detector trains first (`finetune.py --ckpt none --time`, the NWPU bench's scratch row otherwise: mini
ViT/16, 512 px, batch 8, evaluated every 2 epochs; killed, it resumes where it stopped when the script is run again,
with the time already spent counted), then YOLOv8n from scratch (yolov8n.yaml, no pretrained weights, imgsz 512, its
default augmentation and schedule, `time=` minutes / 60), one after the other, never at the same time. Both
train on the 496 half-resolution train tiles of bench/nwpu.py (the boxes the project's data loader reads, written as
YOLO label files) and both pick their best checkpoint on val, as each does by default. YOLOv8n's detections on the
83 val tiles (conf 0.001, its usual 300 per tile) and the project's (evaluate.py's defaults) are scored by the same
code (evaluate.score, COCO-style) against the same targets: both rows, their ratio, per class and AP by size.

Ultralytics is a tool of this benchmark only: it is never imported by the project and not in requirements*.txt. It
runs as a separate process from an environment of its own (it brings its own torch and torchvision):
    python -m venv yolo-env && yolo-env/bin/pip install torch==2.14.1 torchvision==0.29.1 ultralytics
then pass --yolo-python yolo-env/bin/python (or set YOLO_PYTHON). Without it the script says so and exits.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import ROOT, run  # noqa: E402
from nwpu import prepare  # noqa: E402
from data import DOTADataset, make_loader  # noqa: E402
from evaluate import load_detector, predict, score, summary  # noqa: E402
from labels import CLASSES  # noqa: E402

# Runs in the Ultralytics environment: train, then predict on the val tiles -> dets.json, info.json
YOLO = '''
import json, os, sys, time
import torch
from pathlib import Path
from ultralytics import YOLO
out, minutes, workers = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
t0 = time.time()
model = YOLO('yolov8n.yaml')
# Ultralytics trains on os.cpu_count() - 1 threads on a CPU (one core of two left idle); the project's torch takes all
# of them, so give YOLOv8n every core too, for its training and its predictions
model.add_callback('on_pretrain_routine_start', lambda trainer: torch.set_num_threads(os.cpu_count()))
model.train(data=str(out / 'data.yaml'), imgsz=512, time=minutes / 60, epochs=1000, pretrained=False, device='cpu',
            workers=workers, batch=16, seed=0, plots=False, project=str(out), name='train', exist_ok=True)
seconds = time.time() - t0
weights = out / 'train' / 'weights'
best = YOLO(str(weights / ('best.pt' if (weights / 'best.pt').exists() else 'last.pt')))
best.add_callback('on_predict_start', lambda predictor: torch.set_num_threads(os.cpu_count()))
dets = {}
for r in best.predict(source=str(out / 'images' / 'val'), imgsz=512, conf=0.001, max_det=300, device='cpu',
                      stream=True, verbose=False):
    b = r.boxes
    dets[Path(r.path).stem] = [b.xyxy.tolist(), b.conf.tolist(), b.cls.int().tolist()]
epochs = len((out / 'train' / 'results.csv').read_text().strip().splitlines()) - 1
(out / 'dets.json').write_text(json.dumps(dets))
(out / 'info.json').write_text(json.dumps({'seconds': seconds, 'epochs': epochs}))
'''


def yolo_dataset(data, out, class_names, size=512):
    """OUT/{images,labels}/{train,val}: links to the tiles and YOLO label files (class cx cy w h, fractions of the
    size x size tile) of the boxes DOTADataset reads; OUT/data.yaml."""
    for split in ('train', 'val'):
        ds = DOTADataset(data, split, class_names)
        (out / 'images' / split).mkdir(parents=True, exist_ok=True)
        (out / 'labels' / split).mkdir(parents=True, exist_ok=True)
        for f, t in zip(ds.files, ds.targets):
            link = out / 'images' / split / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
            b = np.asarray(t['boxes'], np.float64).reshape(-1, 4) / size  # prepare.py split pads every tile to size
            rows = np.concatenate([np.asarray(t['labels'])[:, None], (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
            (out / 'labels' / split / f'{f.stem}.txt').write_text(''.join(
                f'{int(r[0])} ' + ' '.join(f'{v:.6f}' for v in r[1:]) + '\n' for r in rows))
    names = ''.join(f'  {i}: {n}\n' for i, n in enumerate(class_names))
    (out / 'data.yaml').write_text(f'path: {out}\ntrain: images/train\nval: images/val\nnames:\n{names}')


def row(name, res, class_names, epochs, seconds):
    s = summary(res, class_names)
    sv = s['classes'].get('small-vehicle', {}).get('map50', float('nan'))
    small = s['sizes']['small']['map50']
    return {'row': name, 'epochs': epochs, 'minutes': seconds / 60, 's/epoch': seconds / max(epochs, 1),
            'mAP50': s['map50'], 'mAP50-95': s['map'], 'small-vehicle AP50': sv, 'AP50 small': small}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--minutes', type=float, default=30, help='training minutes of each (default: %(default)s)')
    ap.add_argument('--yolo-python', default=os.environ.get('YOLO_PYTHON', 'yolo-env/bin/python'),
                    help="the Ultralytics environment's python (default: $YOLO_PYTHON or %(default)s)")
    ap.add_argument('--src', default=os.environ.get('NWPU_VHR10', str(ROOT.parent / 'shared' / 'nwpu_vhr10')),
                    help='NWPU VHR-10 in the DOTA layout (default: ../shared/nwpu_vhr10 or $NWPU_VHR10)')
    ap.add_argument('--data', default=None, help='the tiles of bench/nwpu.py if already cut (default: OUT/data)')
    ap.add_argument('--workers', type=int, default=2, help='data-loader workers of both (default: %(default)s)')
    ap.add_argument('--out', default='runs/yolo', help='work folder (default: %(default)s)')
    args = ap.parse_args()
    t_all = time.time()
    py = shutil.which(args.yolo_python) or (args.yolo_python if Path(args.yolo_python).exists() else None)
    if py is None or subprocess.run([py, '-c', 'import ultralytics'], capture_output=True).returncode:
        raise SystemExit(f'no Ultralytics at --yolo-python {args.yolo_python}: install it in an environment of its '
                         'own (python -m venv yolo-env && yolo-env/bin/pip install torch==2.14.1 '
                         'torchvision==0.29.1 ultralytics) and pass its python; the project never imports it')
    out = (ROOT / args.out).resolve()
    data = Path(args.data).resolve() if args.data else out / 'data'
    prepare(Path(args.src), data)
    class_names = CLASSES['dota1.0']
    yolo_dataset(data, out / 'yolo', class_names)

    # 1. the project's detector (alone on the machine); a killed run continues from OUT/project/last.pt
    ft = out / 'project'
    if not (ft / 'done.json').exists():
        run(out / 'project.log', 'finetune.py', '--ckpt', 'none', '--model', 'mini', '--patch-size', 16, '--data',
            data, '--device', 'cpu', '--workers', args.workers, '--seed', 0, '--epochs', 100, '--time', args.minutes,
            '--img-size', 512, '--batch-size', 8, '--eval-every', 2, '--out', ft, '--resume', 'auto')
        rows = (ft / 'results.csv').read_text().strip().splitlines()[1:]  # seconds: counted across a resume
        (ft / 'done.json').write_text(json.dumps({'seconds': float(rows[-1].split(',')[1]), 'epochs': len(rows)}))
    done = json.loads((ft / 'done.json').read_text())

    # 2. YOLOv8n (then, alone on the machine too)
    if not (out / 'yolo' / 'info.json').exists():
        print(f'$ {py} -c <YOLO> {out / "yolo"} {args.minutes} {args.workers}', flush=True)
        with open(out / 'yolo.log', 'w') as log:
            subprocess.run([py, '-c', YOLO, str(out / 'yolo'), str(args.minutes), str(args.workers)], check=True,
                           stdout=log, stderr=subprocess.STDOUT, cwd=out / 'yolo')
    info = json.loads((out / 'yolo' / 'info.json').read_text())

    # 3. both scored by the same code against the same targets
    model, ckpt = load_detector(ft / 'best.pt', torch.device('cpu'))
    loader = make_loader(data, 'val', class_names, None, 16, False, args.workers, 16)
    preds, gts, names = [], [], []
    for _, targets, dets in predict(model, loader, torch.device('cpu'), centre_gate=ckpt['args'].get('centre_gate')):
        preds, gts, names = preds + dets, gts + targets, names + [t['name'] for t in targets]
    yolo = json.loads((out / 'yolo' / 'dets.json').read_text())
    ydets = [{'boxes': np.asarray(yolo[n][0], np.float64).reshape(-1, 4), 'scores': np.asarray(yolo[n][1]),
              'labels': np.asarray(yolo[n][2], np.int64)} for n in names]
    res_p, text_p = score(preds, gts, class_names, sizes=True)
    res_y, text_y = score(ydets, gts, class_names, sizes=True)
    print(f'YOLOv8n ({info["epochs"]} epochs, {info["seconds"] / 60:.1f} min)\n{text_y}\n')
    print(f'project ({done["epochs"]} epochs, {done["seconds"] / 60:.1f} min)\n{text_p}\n')
    rows = [row('YOLOv8n (from scratch)', res_y, class_names, info['epochs'], info['seconds']),
            row('project (--ckpt none, mini ViT/16)', res_p, class_names, done['epochs'], done['seconds'])]
    cols = list(rows[0])[1:]
    print(f'NWPU VHR-10 val (83 half-resolution tiles), {args.minutes:g} training minutes each, the same machine '
          f'({os.cpu_count()} CPUs), one after the other')
    w = {c: max(len(c) + 2, 9) for c in cols}
    print(f'{"row":36s}' + ''.join(f'{c:>{w[c]}s}' for c in cols))
    for r in rows + [{'row': 'project / YOLOv8n', **{c: rows[1][c] / rows[0][c] if rows[0][c] else float('nan')
                                                      for c in cols}}]:
        print(f'{r["row"]:36s}' + ''.join(f'{r[c]:{w[c]}d}' if isinstance(r[c], int) else f'{r[c]:{w[c]}.3f}'
                                          for c in cols))
    (out / 'results.json').write_text(json.dumps(rows, indent=2))
    print(f'this run: {(time.time() - t_all) / 60:.1f} minutes in all (what was cached under {out} not counted)')


if __name__ == '__main__':
    main()
