"""Detection metrics in numpy, written from the protocols' definitions: COCO-style AP and the official DOTA task-2.

Inputs are per image: detections {boxes (D, 4) xyxy, scores (D,), labels (D,)} and ground truth {boxes (G, 4),
labels (G,), difficult (G,)}, numpy or torch; or, for oriented boxes, boxes as polygons (D, 8) / (G, 8)
(x1 y1 ... x4 y4, as in DOTA files), whose IoU is the exact polygon IoU (obb.polygon_iou) in both protocols.

coco (the default, the per-class table): per image and class, detections in stable order of descending score; each
  takes the highest-IoU still-unmatched GT with IoU >= t, non-difficult GT preferred; a detection matched to a
  difficult GT is ignored (neither TP nor FP) and difficult GT do not count (difficult='ignore'; 'normal' counts
  them). t in np.linspace(.5, .95, 10) (float64); continuous IoU (no +1); AP = the 101-point interpolated precision
  (precision envelope, recall points located with searchsorted(..., 'left'), zero past the highest recall reached);
  mAP = the mean over classes that have GT; no cap on detections unless max_dets is given. These are pycocotools'
  bbox semantics with maxDets raised and one area range, and the numbers agree with it (tests/test_metrics.py).
  By object size: GT outside a size bin are ignored and so are unmatched detections outside it (by their own
  size), COCO's area-range rule, with bins by sqrt(box area): tiny < 16, small 16-32, medium 32-96, large >= 96 px.
dota (the official DOTA_devkit dota_evaluation_task2): one threshold, IoU > 0.5 (strict); IoU of boxes with the
  +1 pixel convention; GT corners cut to integers (int(float(x)), as the devkit reads them); detections of a class
  sorted by descending score over all images (stable here; the devkit's sort is not); each detection is compared
  with *all* GT of its class in its image and assigned to the max-IoU one: a difficult GT -> ignored, a GT already
  taken -> FP, else TP; AP is VOC07's 11-point AP (max precision at recall >= 0, 0.1, ..., 1.0, averaged); mAP is
  the mean over the dataset's fixed class list (a class without GT contributes 0, as in the devkit).
  With polygons it is dota_evaluation_task1: the same rules with polygon IoU, GT corners read as floats (task 1
  does not cut them), and the devkit's horizontal pre-filter (only GT whose axis-aligned box has IoU > 0 with the
  detection's, +1 pixel convention, are compared; it saves work and changes no result: polygons that overlap
  always pass it).
"""
import numpy as np

from obb import poly_iou_blocks, poly_iou_matrix, polygon_area

IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
SIZE_BINS = (('tiny', 0, 16), ('small', 16, 32), ('medium', 32, 96), ('large', 96, float('inf')))


def box_iou(a, b, plus_one=False):
    """(n, 4) x (m, 4) xyxy -> (n, m) IoU in float64; plus_one: VOC/DOTA pixel convention (width = x2 - x1 + 1)."""
    a, b, e = np.asarray(a, np.float64), np.asarray(b, np.float64), 1.0 if plus_one else 0.0
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt + e, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0] + e) * (a[:, 3] - a[:, 1] + e)
    area_b = (b[:, 2] - b[:, 0] + e) * (b[:, 3] - b[:, 1] + e)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def as_boxes(x):
    """(n, 4) boxes or (n, 8) polygons as float64 (n, k); an empty input becomes (0, 4)."""
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1) if x.size else x.reshape(0, x.shape[-1] if x.ndim == 2 else 4)


def iou_matrix(a, b):
    """(n, k) x (m, k) -> (n, m): box_iou for k = 4, exact polygon IoU for k = 8."""
    return poly_iou_matrix(a, b) if as_boxes(a).shape[1] == 8 else box_iou(a, b)


def sqrt_area(boxes):
    boxes = as_boxes(boxes)
    if boxes.shape[1] == 8:
        return np.sqrt(polygon_area(boxes.reshape(-1, 4, 2)))
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))


# ------------------------------------------------------------------------------------------------- coco
def match_image(det_boxes, gt_boxes, gt_ignore, iou_thrs=IOU_THRS, iou=None):
    """Greedy matching of one image and class at all thresholds at once; det_boxes sorted by descending score.
    iou: their (D, G) IoU when the caller has it already. -> tp (T, D) bool, ignored (T, D) bool (matched to an
    ignored GT).

    When no detection has two GT to choose from (IoU >= the lowest threshold with at most one GT: always so when
    the GT do not overlap), the greedy rule reduces to "the first detection that reaches a GT gets it", which is
    computed without a loop. Otherwise the sequential definition runs (match_sequential)."""
    T, D, G = len(iou_thrs), len(det_boxes), len(gt_boxes)
    tp, ignored = np.zeros((T, D), bool), np.zeros((T, D), bool)
    if D == 0 or G == 0:
        return tp, ignored
    iou = iou_matrix(det_boxes, gt_boxes) if iou is None else iou  # (D, G)
    thr = np.minimum(iou_thrs, 1 - 1e-10)[:, None]  # (T, 1), as pycocotools
    if ((iou >= thr.min()).sum(1) > 1).any():
        return match_sequential(iou, gt_ignore, thr)
    g = iou.argmax(1)  # (D,) each detection's only possible GT
    t, d = np.nonzero(iou[np.arange(D), g][None] >= thr)  # (t, d) pairs that reach their GT, t-major, d ascending
    _, first = np.unique(t * G + g[d], return_index=True)  # the first detection per (threshold, GT) wins
    t, d = t[first], d[first]
    tp[t, d], ignored[t, d] = ~gt_ignore[g[d]], gt_ignore[g[d]]
    return tp, ignored


def match_sequential(iou, gt_ignore, thr):
    """The greedy rule as defined: detections in order, each takes the best still-free GT with IoU >= t,
    non-ignored GT first. iou (D, G), thr (T, 1) -> tp (T, D), ignored (T, D)."""
    (D, G), T = iou.shape, len(thr)
    tp, ignored, taken = np.zeros((T, D), bool), np.zeros((T, D), bool), np.zeros((T, G), bool)
    bonus = np.where(gt_ignore, 0.0, 2.0)  # non-ignored GT win over ignored ones
    # Only detections that reach the lowest threshold with some GT can match; the others are FP at every t and
    # change no state, so the loop runs over the few that can.
    for d in np.flatnonzero(iou.max(1) >= thr.min()):
        score = np.where(~taken & (iou[d] >= thr), iou[d] + bonus, -1.0)  # (T, G) candidates
        g = score.argmax(1)  # (T,)
        hit = score[np.arange(T), g] >= 0
        taken[np.arange(T)[hit], g[hit]] = True
        tp[hit, d] = ~gt_ignore[g[hit]]
        ignored[hit, d] = gt_ignore[g[hit]]
    return tp, ignored


def _coco_curves(records, n_gt):
    """records: list of (scores (D,), tp (T, D), ignored (T, D)) of one class -> (AP (T,), scores, tp, fp, the
    interpolated precision at the 101 recall thresholds (T, 101): AP is its mean) with the detections sorted by
    descending score over all images (mergesort: stable, as pycocotools)."""
    T = len(IOU_THRS)
    scores = np.concatenate([r[0] for r in records]) if records else np.zeros(0)
    order = np.argsort(-scores, kind='mergesort')
    tp = np.concatenate([r[1] for r in records], 1)[:, order] if records else np.zeros((T, 0), bool)
    ig = np.concatenate([r[2] for r in records], 1)[:, order] if records else np.zeros((T, 0), bool)
    fp = ~tp & ~ig
    scores = scores[order]
    tpc, fpc = tp.cumsum(1), fp.cumsum(1)  # (T, D)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], 1)[:, ::-1]  # non-increasing in recall
    curve = np.zeros((T, len(REC_THRS)))
    for t in range(T) if len(scores) else ():
        i = np.searchsorted(recall[t], REC_THRS, side='left')
        curve[t] = np.where(i < len(scores), envelope[t][np.minimum(i, len(scores) - 1)], 0.0)
    return curve.mean(1), scores, tpc, fpc, curve


def evaluate_coco(preds, gts, num_classes, difficult='ignore', max_dets=None, by_size=False):
    """-> dict: n_gt (C,), n_pred (C,), ap (C, T) (nan where no GT), precision and recall (C,) at the confidence
    `conf` that maximizes the mean F1 over classes at IoU 0.5, pr50 (C, 101): the interpolated precision at IoU 0.5
    at recall 0, 0.01, ..., 1 (the precision-recall curve whose mean is AP50; nan where no GT), and with by_size,
    ap_size {bin: (C, T)}."""
    preds = [{'boxes': as_boxes(p['boxes']), 'scores': np.asarray(p['scores']), 'labels': np.asarray(p['labels'])}
             for p in preds]
    gts = [{'boxes': as_boxes(g['boxes']), 'labels': np.asarray(g['labels']),
            'difficult': np.asarray(g['difficult'], bool) & (difficult == 'ignore')} for g in gts]
    n_gt, n_pred = np.zeros(num_classes, int), np.zeros(num_classes, int)
    per_image = []  # (class, sorted det indices, GT mask) for every image and class that has either
    for i, (p, g) in enumerate(zip(preds, gts)):
        for c in np.union1d(g['labels'], p['labels']).astype(int):
            d = np.flatnonzero(p['labels'] == c)
            d = d[np.argsort(-p['scores'][d], kind='stable')][:max_dets]
            per_image.append((i, c, d, g['labels'] == c))
            n_gt[c] += int((~g['difficult'][g['labels'] == c]).sum())
            n_pred[c] += len(d)

    def class_ap(lo=0.0, hi=float('inf')):  # (C, T) AP with GT and unmatched detections outside [lo, hi) ignored
        records, n = [[] for _ in range(num_classes)], np.zeros(num_classes, int)
        by_bin = (lo, hi) != (0.0, float('inf'))
        for i, c, d, gc in per_image:
            p, g = preds[i], gts[i]
            ignore = g['difficult'][gc]
            if by_bin:
                s = sqrt_area(g['boxes'][gc])
                ignore = ignore | (s < lo) | (s >= hi)
            tp, ig = match_image(p['boxes'][d], g['boxes'][gc], ignore)
            if by_bin:
                ds = sqrt_area(p['boxes'][d])
                ig |= ~tp & ~ig & ((ds < lo) | (ds >= hi))[None]
            records[c].append((p['scores'][d], tp, ig))
            n[c] += int((~ignore).sum())
        ap, pr50 = np.full((num_classes, len(IOU_THRS)), np.nan), np.full((num_classes, len(REC_THRS)), np.nan)
        for c in np.flatnonzero(n > 0):
            curves = _coco_curves(records[c], n[c])
            ap[c], pr50[c] = curves[0], curves[4][0]
        return ap, records, pr50

    ap, records, pr50 = class_ap()
    px = np.linspace(0, 1, 1000)  # confidence grid for the P/R/F1 curves (the Ultralytics convention)
    p_curve, r_curve = np.zeros((num_classes, 1000)), np.zeros((num_classes, 1000))
    for c in np.flatnonzero(n_gt > 0):
        _, scores, tpc, fpc, _ = _coco_curves(records[c], n_gt[c])
        if len(scores):  # raw (not enveloped) precision and recall at IoU 0.5 as functions of confidence
            r_curve[c] = np.interp(-px, -scores, tpc[0] / n_gt[c], left=0)
            p_curve[c] = np.interp(-px, -scores, tpc[0] / np.maximum(tpc[0] + fpc[0], 1), left=1)
    has = n_gt > 0
    f1 = 2 * p_curve * r_curve / np.maximum(p_curve + r_curve, 1e-16)
    best = int(f1[has].mean(0).argmax()) if has.any() else 0
    res = {'n_gt': n_gt, 'n_pred': n_pred, 'ap': ap, 'precision': p_curve[:, best], 'recall': r_curve[:, best],
           'conf': float(px[best]), 'pr50': pr50}
    if by_size:
        res['ap_size'] = {name: class_ap(lo, hi)[0] for name, lo, hi in SIZE_BINS}
    return res


# ------------------------------------------------------------------------------------------------- dota
def voc07_ap(recall, precision):
    """VOC07 11-point AP: the mean over t in np.arange(0, 1.1, 0.1) of max precision at recall >= t (0 if none)."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):  # the devkit's exact points, float error included
        p = precision[recall >= t]
        ap += (p.max() if p.size else 0.0) / 11.0
    return ap


def evaluate_dota(preds, gts, num_classes):
    """The official DOTA task-2 (HBB) evaluation, or task 1 (OBB) when the boxes are polygons (n, 8).
    -> dict: ap (C,), n_gt (C,), n_pred (C,), recall (C,) at the end of the ranking.

    A detection's GT is the max-IoU one among all GT of its class in its image, whatever came before, so it is
    found without a loop over detections; the order matters only for "already taken", which is the first
    occurrence of each GT in the ranking."""
    rows, blocks = [], []  # per image and class: the detections and GT to compare
    n_gt, n_gt_seen, task1 = np.zeros(num_classes, int), 0, False
    for p, g in zip(preds, gts):
        pb, ps, pl = as_boxes(p['boxes']), np.asarray(p['scores']), np.asarray(p['labels'])
        gb, gl = as_boxes(g['boxes']), np.asarray(g['labels'])
        task1 |= gb.shape[1] == 8 or pb.shape[1] == 8
        gd = np.asarray(g['difficult'], bool)
        n_gt += np.bincount(gl[~gd].astype(int), minlength=num_classes)
        for c in np.unique(pl).astype(int):
            d, gc = np.flatnonzero(pl == c), np.flatnonzero(gl == c)
            rows.append((c, ps[d].astype(np.float64), n_gt_seen + gc, gd[gc]))
            blocks.append((pb[d], gb[gc]))
        n_gt_seen += len(gl)  # GT ids unique over the dataset
    if task1 and any(x.shape[1] == 4 and len(x) for blk in blocks for x in blk):
        raise ValueError('some images have polygons (n, 8) and others axis-aligned boxes (n, 4): one kind only')
    if task1:  # every polygon pair of every image at once
        ious = poly_iou_blocks(blocks, plus_one_filter=True)
    else:
        ious = [box_iou(a, np.trunc(b), plus_one=True) for a, b in blocks]
    hits = []  # per image and class: class, score, IoU with the max-IoU GT, that GT's id, whether it is difficult
    for (c, s, gids, gdiff), iou in zip(rows, ious):  # iou (D, G)
        if iou.shape[1]:
            j = iou.argmax(1)
            hits.append((np.full(len(s), c), s, iou[np.arange(len(s)), j], gids[j], gdiff[j]))
        else:
            hits.append((np.full(len(s), c), s, np.full(len(s), -np.inf), np.full(len(s), -1), np.zeros(len(s), bool)))
    cls, score, ov, gid, diff = (np.concatenate([r[k] for r in hits]) if hits else np.zeros(0) for k in range(5))
    ap, n_pred, rec_end = np.zeros(num_classes), np.zeros(num_classes, int), np.zeros(num_classes)
    for c in range(num_classes):
        k = np.flatnonzero(cls == c)
        k = k[np.argsort(-score[k], kind='stable')]
        hit = (ov[k] > 0.5) & ~diff[k].astype(bool)  # candidates for TP; a difficult hit is neither TP nor FP
        first = np.zeros(len(k), bool)
        first[np.flatnonzero(hit)[np.unique(gid[k][hit], return_index=True)[1]]] = True  # earliest hit of each GT
        tp = first
        fp = ~((ov[k] > 0.5) & diff[k].astype(bool)) & ~first
        tpc, fpc = np.cumsum(tp), np.cumsum(fp)
        recall = tpc / n_gt[c] if n_gt[c] else np.zeros(len(k))
        precision = tpc / np.maximum(tpc + fpc, np.finfo(np.float64).eps)
        ap[c] = voc07_ap(recall, precision) if n_gt[c] else 0.0
        n_pred[c], rec_end[c] = len(k), (recall[-1] if len(k) else 0.0)
    return {'ap': ap, 'n_gt': n_gt, 'n_pred': n_pred, 'recall': rec_end}


# ------------------------------------------------------------------------------------------------- errors
ERROR_KINDS = ('tp', 'dup', 'loc', 'cls', 'bg')


def error_breakdown(preds, gts, num_classes, difficult='ignore', thr=0.5, bg_thr=0.1):
    """Where a class's AP goes (TIDE's error types, Bolya et al. 2020, counted instead of weighed by their dAP).
    Per class, its top n_gt detections over all images (as many as it has GT: what a perfect ranking needs), each
    counted as the first that applies:
      tp   matched by the coco rule at IoU >= thr (the table's AP50 matching)
      dup  IoU >= thr with a GT of its class that a higher-scored detection already took
      loc  best IoU with a GT of its class in [bg_thr, thr): found but poorly placed
      cls  IoU >= thr with a GT of another class
      bg   the rest: background.
    Detections matched to an ignored (difficult) GT are left out, as in the AP. Also found: the share of GT that
    some detection of their class reaches at IoU >= thr, at any score (the recall a perfect ranking would give).
    -> dict: n_gt (C,) and one (C,) count per ERROR_KINDS entry, found (C,) (nan where no GT)."""
    recs = [[] for _ in range(num_classes)]  # per class: (scores (D,), kind index (D,)) per image
    n_gt, n_found = np.zeros(num_classes, int), np.zeros(num_classes, int)
    for p, g in zip(preds, gts):
        pb, ps, pl = as_boxes(p['boxes']), np.asarray(p['scores'], np.float64), np.asarray(p['labels'])
        gb, gl = as_boxes(g['boxes']), np.asarray(g['labels'])
        gd = np.asarray(g['difficult'], bool) & (difficult == 'ignore')
        n_gt += np.bincount(gl[~gd].astype(int), minlength=num_classes)
        if not len(pb):
            continue
        iou = iou_matrix(pb, gb) if len(gb) else np.zeros((len(pb), 0))  # (D, G)
        for c in np.unique(pl).astype(int):
            d = np.flatnonzero(pl == c)
            d = d[np.argsort(-ps[d], kind='stable')]
            gc, rows = gl == c, iou[d]  # rows (Dc, G)
            tp, ig = (x[0] for x in match_image(pb[d], gb[gc], gd[gc], np.array([thr]), rows[:, gc]))  # (Dc,) each
            same = rows[:, gc].max(1, initial=0.0)  # (Dc,) best IoU with a GT of class c
            other = rows[:, ~gc].max(1, initial=0.0)  # (Dc,) and with one of another class
            kind = np.select([tp, same >= thr, same >= bg_thr, other >= thr], [0, 1, 2, 3], 4)
            recs[c].append((ps[d][~ig], kind[~ig]))
            n_found[c] += int((rows[:, gc & ~gd] >= thr).any(0).sum())
    out = {'n_gt': n_gt, **{k: np.zeros(num_classes, int) for k in ERROR_KINDS}}
    for c in range(num_classes):
        if recs[c]:
            s, k = (np.concatenate([r[i] for r in recs[c]]) for i in (0, 1))
            counts = np.bincount(k[np.argsort(-s, kind='stable')][:n_gt[c]], minlength=len(ERROR_KINDS))
            for i, name in enumerate(ERROR_KINDS):
                out[name][c] = counts[i]
    out['found'] = np.where(n_gt > 0, n_found / np.maximum(n_gt, 1), np.nan)
    return out
