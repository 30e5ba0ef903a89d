"""Where a detector's boxes on unlabelled images miss: its box files scored against the held-back truth.

    python bench/pseudo_boxes.py --boxes runs/boxes_conf0.1/boxes --truth runs/nwpu/data/train/labelTxt

The boxes are `evaluate.py --write-labels` files (no scores: every box above its --label-conf counts), the truth
the same tiles' label files (which pretraining never reads). It prints how many boxes lie on a true object (IoU >= 0.5,
axis-aligned), and which true objects no box finds, by size (metrics.SIZE_BINS) and by class: what object-aware
masking with these boxes can hide and what it cannot.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evaluate import as_hbb  # noqa: E402
from labels import CLASSES, parse_label_file  # noqa: E402
from metrics import SIZE_BINS, box_iou, sqrt_area  # noqa: E402


def hbb(polys):
    """(n, 8) polygons -> (n, 4) xyxy."""
    return as_hbb({'boxes': polys})['boxes']


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--boxes', required=True, help='a folder of box files (evaluate.py --write-labels)')
    ap.add_argument('--truth', required=True, help='the label files of the same tiles (a labelTxt folder)')
    ap.add_argument('--classes', default='dota1.0', choices=sorted(CLASSES), help='(default: %(default)s)')
    args = ap.parse_args(argv)
    names = CLASSES[args.classes]
    files = sorted(Path(args.boxes).glob('*.txt'))
    if not files:
        raise SystemExit(f'{args.boxes}: no box files (*.txt)')
    found_any, found_cls, size, cls, n_box, on_object = [], [], [], [], 0, 0
    for f in files:  # one tile at a time; everything inside is vectorized
        t = Path(args.truth) / f.name
        if not t.exists():
            raise SystemExit(f'{t}: no truth for the box file {f}')
        p_poly, p_lab = parse_label_file(f, names)[:2]
        g_poly, g_lab = parse_label_file(t, names)[:2]
        iou = box_iou(hbb(g_poly), hbb(p_poly)) >= 0.5  # (G, P)
        found_any.append(iou.any(1))
        found_cls.append((iou & (g_lab[:, None] == p_lab[None])).any(1))
        size.append(sqrt_area(hbb(g_poly)))
        cls.append(g_lab)
        n_box, on_object = n_box + len(p_lab), on_object + int(iou.any(0).sum())
    found_any, found_cls, size, cls = (np.concatenate(v) for v in (found_any, found_cls, size, cls))
    print(f'{len(files)} tiles, {len(cls)} true objects, {n_box} boxes; boxes on a true object (IoU >= 0.5): '
          f'{on_object / max(n_box, 1):.1%}')
    print(f'{"true objects":<22}{"count":>7}{"found, any class":>18}{"found, its class":>18}')
    groups = [('all', np.ones_like(found_any))]
    groups += [(name, (size >= lo) & (size < hi)) for name, lo, hi in SIZE_BINS]
    groups += [(names[c], cls == c) for c in np.unique(cls)]
    out = {}
    for name, m in groups:
        if m.any():
            out[name] = (float(found_any[m].mean()), float(found_cls[m].mean()))
            print(f'{name:<22}{int(m.sum()):>7}{out[name][0]:>18.1%}{out[name][1]:>18.1%}')
    return {'boxes': n_box, 'on_object': on_object / max(n_box, 1), 'found': out}


if __name__ == '__main__':
    main()
