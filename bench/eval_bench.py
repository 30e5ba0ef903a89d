"""Our coco-protocol evaluator against pycocotools on a DOTA-val-sized case, same data, one run.

    python bench/eval_bench.py [--images 458] [--gt 60] [--dets 1300]

Seeded random case: 458 images, 15 classes, ~60 integer GT boxes and ~1,300 detections per image (jittered copies
of the GT, duplicates and background junk, unique scores). pycocotools gets maxDets raised to 10^4 and one 'all'
area range, so both compute the same thing. Times cover the evaluation proper (pycocotools: evaluate() +
accumulate(); ours: evaluate_coco); loading the data into each tool's format is not timed. Prints the largest
difference of per-class AP at the ten thresholds, then the speed ratio last (goal >= 5x).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import evaluate_coco  # noqa: E402


def make_case(rng, n_images, n_gt, n_dets, n_classes=15):
    gts, preds = [], []
    for _ in range(n_images):
        g = int(rng.poisson(n_gt))
        xy = rng.integers(0, 1000, (g, 2))
        boxes = np.concatenate([xy, xy + rng.integers(6, 80, (g, 2))], 1).astype(np.float64)
        labels = rng.integers(0, n_classes, g)
        gts.append({'boxes': boxes, 'labels': labels, 'difficult': np.zeros(g, bool)})
        copies = np.repeat(np.arange(g), 3)  # three noisy detections per object: one good, the rest duplicates
        near = boxes[copies] + rng.normal(0, 3, (len(copies), 4))
        m = max(n_dets - len(copies), 0)
        jxy = rng.uniform(0, 1000, (m, 2))
        junk = np.concatenate([jxy, jxy + rng.uniform(6, 80, (m, 2))], 1)
        b = np.concatenate([near, junk])
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(copies)), rng.uniform(0.0, 0.6, m)])
        preds.append({'boxes': b, 'scores': scores, 'labels': np.concatenate([labels[copies],
                                                                              rng.integers(0, n_classes, m)])})
    all_scores = np.concatenate([p['scores'] for p in preds])
    unique = rng.permutation(len(all_scores)) / len(all_scores)  # unique scores, same ranking within an image
    start = 0
    for p in preds:
        order = np.argsort(np.argsort(-p['scores']))
        p['scores'] = np.sort(unique[start:start + len(order)])[::-1][order]
        start += len(order)
    return gts, preds


def coco_ap(gts, preds, n_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, anns, results = [], [], []
    for i, (g, p) in enumerate(zip(gts, preds)):
        images.append({'id': i})
        for b, c in zip(g['boxes'], g['labels']):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': int(c), 'iscrowd': 0,
                         'bbox': [b[0], b[1], w, h], 'area': w * h})
        for b, s, c in zip(p['boxes'], p['scores'], p['labels']):
            results.append({'image_id': i, 'category_id': int(c), 'score': float(s),
                            'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': anns, 'categories': [{'id': c} for c in range(n_classes)]}
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(results), 'bbox')
    ev.params.maxDets, ev.params.areaRng, ev.params.areaRngLbl = [10000], [[0, 1e10]], ['all']
    t0 = time.perf_counter()
    ev.evaluate()
    ev.accumulate()
    dt = time.perf_counter() - t0
    prec = ev.eval['precision'][:, :, :, 0, 0]  # (T, R, K)
    return np.where((prec > -1).all(1), prec.mean(1), np.nan).T, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=458, help='number of images (default: %(default)s)')
    ap.add_argument('--gt', type=int, default=60, help='mean GT boxes per image (default: %(default)s)')
    ap.add_argument('--dets', type=int, default=1300, help='detections per image (default: %(default)s)')
    args = ap.parse_args()
    gts, preds = make_case(np.random.default_rng(0), args.images, args.gt, args.dets)
    print(f'{args.images} images, {sum(len(g["labels"]) for g in gts)} GT, '
          f'{sum(len(p["labels"]) for p in preds)} detections, 15 classes')
    t0 = time.perf_counter()
    ours = evaluate_coco(preds, gts, 15)['ap']
    t_ours = time.perf_counter() - t0
    theirs, t_theirs = coco_ap(gts, preds, 15)
    print(f'ours {t_ours:.2f} s, pycocotools {t_theirs:.2f} s (evaluate + accumulate)')
    print(f'mAP50 {np.nanmean(ours[:, 0]):.6f} vs {np.nanmean(theirs[:, 0]):.6f}; mAP50-95 {np.nanmean(ours):.6f} '
          f'vs {np.nanmean(theirs):.6f}; largest per-class AP difference {np.nanmax(np.abs(ours - theirs)):.2e}')
    print(f'speed-up over pycocotools (goal >= 5x): {t_theirs / t_ours:.1f}x')


if __name__ == '__main__':
    main()
