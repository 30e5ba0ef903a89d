"""Our evaluators against the references on a DOTA-val-sized case, same data, one run:
coco protocol vs pycocotools (axis-aligned boxes), and DOTA task 1 (oriented boxes) vs the devkit's algorithm
(dota_evaluation_task1.py) rewritten here as the loop it is: detections one by one, the horizontal pre-filter, then
polygon IoU pair by pair (a plain-Python clip, as polyiou computes one pair per call).

    python bench/eval_bench.py [--images 458] [--gt 60] [--dets 1300] [--skip-coco] [--skip-task1]

Seeded random case: 458 images, 15 classes, ~60 integer GT boxes and ~1,300 detections per image (jittered copies
of the GT, duplicates and background junk, unique scores). pycocotools gets maxDets raised to 10^4 and one 'all'
area range, so both compute the same thing. Times cover the evaluation proper (pycocotools: evaluate() +
accumulate(); ours: evaluate_coco); loading the data into each tool's format is not timed. Prints the largest
difference of per-class AP at the ten thresholds, then the speed ratio (goal >= 5x). The task-1 case turns the same
boxes into oriented ones (a random angle per object, detections jittered in angle too) and prints both mAPs, the
largest per-class difference and the speed ratio; times cover the evaluation from polygons in memory.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import evaluate_coco, evaluate_dota, voc07_ap  # noqa: E402
from obb import obb_to_poly  # noqa: E402


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


def poly_iou_one(p, q):
    """IoU of two polygons given as 8 numbers, one pair, in plain Python: p clipped by each edge of q
    (Sutherland-Hodgman), shoelace areas. The per-pair reference for the loop below; q convex, either winding."""
    P, Q = list(zip(p[0::2], p[1::2])), list(zip(q[0::2], q[1::2]))

    def area(poly):
        return sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1])) / 2
    sign = 1.0 if area(Q) >= 0 else -1.0
    out = P
    for (ax, ay), (bx, by) in zip(Q, Q[1:] + Q[:1]):
        side = [sign * ((bx - ax) * (y - ay) - (by - ay) * (x - ax)) for x, y in out]
        new = []
        for k in range(len(out)):
            (x1, y1), (x2, y2), s1, s2 = out[k], out[(k + 1) % len(out)], side[k], side[(k + 1) % len(out)]
            if s1 >= 0:
                new.append((x1, y1))
            if (s1 >= 0) != (s2 >= 0):
                t = s1 / (s1 - s2)
                new.append((x1 + t * (x2 - x1), y1 + t * (y2 - y1)))
        out = new
        if not out:
            return 0.0
    inter = abs(area(out))
    union = abs(area(P)) + abs(area(Q)) - inter
    return inter / union if union > 0 else 0.0


def devkit_task1(preds, gts, n_classes):
    """DOTA_devkit's dota_evaluation_task1.voc_eval for every class, as written there: a loop over the detections
    of a class by descending score (stable here; unique scores make it the devkit's order), the HBB pre-filter
    (IoU > 0 with +1 pixels), polygon IoU with each remaining GT, the max-IoU GT: > 0.5 and not difficult -> TP if
    free else FP, difficult -> nothing, else FP; VOC07 11-point AP; a class without GT scores 0."""
    ap, n_gt = np.zeros(n_classes), np.zeros(n_classes, int)
    for c in range(n_classes):
        recs = [{'bbox': g['boxes'][g['labels'] == c], 'difficult': g['difficult'][g['labels'] == c],
                 'det': [False] * int((g['labels'] == c).sum())} for g in gts]
        npos = sum(int((~r['difficult']).sum()) for r in recs)
        n_gt[c] = npos
        ids = [i for i, p in enumerate(preds) for _ in range(int((p['labels'] == c).sum()))]
        conf = np.concatenate([p['scores'][p['labels'] == c] for p in preds])
        BB = np.concatenate([p['boxes'][p['labels'] == c] for p in preds])
        order = np.argsort(-conf, kind='stable')
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for d, k in enumerate(order):
            R, bb, ovmax = recs[ids[k]], BB[k], -np.inf
            G = R['bbox']
            if len(G):
                gx0, gy0, gx1, gy1 = G[:, 0::2].min(1), G[:, 1::2].min(1), G[:, 0::2].max(1), G[:, 1::2].max(1)
                bx0, by0, bx1, by1 = bb[0::2].min(), bb[1::2].min(), bb[0::2].max(), bb[1::2].max()
                iw = np.maximum(np.minimum(gx1, bx1) - np.maximum(gx0, bx0) + 1.0, 0.0)
                ih = np.maximum(np.minimum(gy1, by1) - np.maximum(gy0, by0) + 1.0, 0.0)
                inters = iw * ih
                uni = (bx1 - bx0 + 1.0) * (by1 - by0 + 1.0) + (gx1 - gx0 + 1.0) * (gy1 - gy0 + 1.0) - inters
                keep = np.where(inters / uni > 0)[0]
                if len(keep):
                    overlaps = [poly_iou_one(list(G[j]), list(bb)) for j in keep]
                    ovmax, jmax = max(overlaps), keep[int(np.argmax(overlaps))]
            if ovmax > 0.5:
                if not R['difficult'][jmax]:
                    if not R['det'][jmax]:
                        tp[d], R['det'][jmax] = 1.0, True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        if npos:
            ap[c] = voc07_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps))
    return {'ap': ap, 'n_gt': n_gt}


def oriented_case(gts, preds, rng):
    """The same case with oriented boxes: every object turned by a random angle (its detections by that angle
    +- 0.1 rad), as polygons (n, 8). -> (gts, preds)."""
    def to_poly(boxes, theta):
        b = np.asarray(boxes, np.float64)
        return obb_to_poly(np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                     b[:, 3] - b[:, 1], theta], 1)).reshape(-1, 8)
    out_g, out_p = [], []
    for g, p in zip(gts, preds):
        theta = rng.uniform(-np.pi / 2, np.pi / 2, len(g['boxes']))
        n_near = 3 * len(g['boxes'])  # make_case puts 3 jittered copies of each GT first
        t = np.concatenate([np.repeat(theta, 3) + rng.normal(0, 0.1, n_near),
                            rng.uniform(-np.pi / 2, np.pi / 2, len(p['boxes']) - n_near)])
        out_g.append({**g, 'boxes': to_poly(g['boxes'], theta), 'difficult': rng.uniform(size=len(theta)) < 0.1})
        out_p.append({**p, 'boxes': to_poly(p['boxes'], t)})
    return out_g, out_p


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
    ap.add_argument('--skip-coco', action='store_true', help='only the task-1 case')
    ap.add_argument('--skip-task1', action='store_true', help='only the coco case')
    args = ap.parse_args()
    gts, preds = make_case(np.random.default_rng(0), args.images, args.gt, args.dets)
    print(f'{args.images} images, {sum(len(g["labels"]) for g in gts)} GT, '
          f'{sum(len(p["labels"]) for p in preds)} detections, 15 classes')
    if not args.skip_task1:
        task1(gts, preds)
    if args.skip_coco:
        return
    t0 = time.perf_counter()
    ours = evaluate_coco(preds, gts, 15)['ap']
    t_ours = time.perf_counter() - t0
    theirs, t_theirs = coco_ap(gts, preds, 15)
    print(f'ours {t_ours:.2f} s, pycocotools {t_theirs:.2f} s (evaluate + accumulate)')
    print(f'mAP50 {np.nanmean(ours[:, 0]):.6f} vs {np.nanmean(theirs[:, 0]):.6f}; mAP50-95 {np.nanmean(ours):.6f} '
          f'vs {np.nanmean(theirs):.6f}; largest per-class AP difference {np.nanmax(np.abs(ours - theirs)):.2e}')
    print(f'speed-up over pycocotools (goal >= 5x): {t_theirs / t_ours:.1f}x')


def task1(gts, preds):
    og, op = oriented_case(gts, preds, np.random.default_rng(1))
    t0 = time.perf_counter()
    ours = evaluate_dota(op, og, 15)['ap']
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = devkit_task1(op, og, 15)['ap']
    t_ref = time.perf_counter() - t0
    print(f'task 1 (oriented): ours {t_ours:.2f} s, the devkit loop {t_ref:.2f} s')
    print(f'task 1 mAP50 (VOC07) {ours.mean():.6f} vs {ref.mean():.6f}; largest per-class AP difference '
          f'{np.abs(ours - ref).max():.2e}')
    print(f'task 1 speed-up over the devkit loop: {t_ref / t_ours:.1f}x')


if __name__ == '__main__':
    main()
