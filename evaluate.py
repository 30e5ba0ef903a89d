"""Evaluate a fine-tuned detector: the per-class table, a JSON of the same numbers, and label/prediction pictures.

    python evaluate.py --ckpt runs/finetune/best.pt [--data synthetic] [--json out.json]

Metric (COCO-style, computed here from scratch in numpy, matching pycocotools' bbox evaluation to 1e-6 when
pycocotools is given maxDets >= the number of detections and one 'all' area range):
- per image and class, detections in stable order of descending score; each takes the highest-IoU still-unmatched
  GT with IoU >= t, non-difficult GT preferred; a detection matched to a difficult GT is ignored (neither TP nor
  FP) and difficult GT do not count in #GT. IoU is continuous (no +1 pixel convention).
- t in np.linspace(.5, .95, 10); AP is the 101-point interpolated precision (precision envelope, recall points
  found by searchsorted(..., 'left'), zero past the highest recall reached); mAP is the mean over classes that
  have GT. No cap on detections per image.
- Precision and Recall columns are read at one global confidence: the one that maximizes the mean F1 over classes
  at IoU 0.5 (the Ultralytics convention, without its curve smoothing). #Pred counts detections above --conf.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import make_loader, resolve_data, to_input
from model import Detector, build_vit, postprocess

IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)


# ------------------------------------------------------------------------------------------------- matching
def box_iou(a, b):
    """(n, 4) x (m, 4) xyxy -> (n, m) IoU, float64, continuous coordinates."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_image(det_boxes, gt_boxes, gt_ignore, iou_thrs=IOU_THRS):
    """Greedy matching of one image and class at all thresholds at once. det_boxes must be sorted by descending
    score. -> tp (T, D) bool, ignored (T, D) bool."""
    T, D, G = len(iou_thrs), len(det_boxes), len(gt_boxes)
    tp, ignored = np.zeros((T, D), bool), np.zeros((T, D), bool)
    if D == 0 or G == 0:
        return tp, ignored
    iou = box_iou(det_boxes, gt_boxes)  # (D, G)
    thr = np.minimum(iou_thrs, 1 - 1e-10)[:, None]  # (T, 1), as pycocotools
    taken = np.zeros((T, G), bool)
    bonus = np.where(gt_ignore, 0.0, 2.0)  # non-difficult GT win over difficult ones
    # Only detections that reach the lowest threshold with some GT can match; the rest are FP at every t and do
    # not change the state, so the sequential loop runs over the few that can.
    for d in np.flatnonzero(iou.max(1) >= thr.min()):
        ok = ~taken & (iou[d] >= thr)  # (T, G) candidates
        score = np.where(ok, iou[d] + bonus, -1.0)
        g = score.argmax(1)  # (T,)
        hit = score[np.arange(T), g] >= 0
        taken[np.arange(T)[hit], g[hit]] = True
        tp[hit, d] = ~gt_ignore[g[hit]]
        ignored[hit, d] = gt_ignore[g[hit]]
    return tp, ignored


def evaluate(preds, gts, num_classes, difficult='ignore', max_dets=None):
    """preds: list of dicts (boxes (D, 4), scores (D,), labels (D,)); gts: list of dicts (boxes, labels, difficult),
    numpy or torch, one per image. -> dict of per-class arrays: n_gt, n_pred, ap (C, T) (nan: no GT),
    precision, recall (at the global best-F1 confidence), conf."""
    T = len(IOU_THRS)
    records = [[] for _ in range(num_classes)]  # per class: (scores (D,), tp (T, D), ignored (T, D))
    n_gt, n_pred = np.zeros(num_classes, int), np.zeros(num_classes, int)
    for p, g in zip(preds, gts):
        p = {k: np.asarray(v) for k, v in p.items() if k in ('boxes', 'scores', 'labels')}
        gb, gl = np.asarray(g['boxes']).reshape(-1, 4), np.asarray(g['labels'])
        gi = np.asarray(g['difficult'], bool) if difficult == 'ignore' else np.zeros(len(gl), bool)
        for c in np.union1d(np.unique(gl), np.unique(p['labels'])).astype(int):
            d = np.flatnonzero(p['labels'] == c)
            d = d[np.argsort(-p['scores'][d], kind='stable')][:max_dets]
            gc = gl == c
            tp, ig = match_image(p['boxes'][d], gb[gc], gi[gc])
            records[c].append((p['scores'][d], tp, ig))
            n_gt[c] += int((~gi[gc]).sum())
            n_pred[c] += len(d)
    ap = np.full((num_classes, T), np.nan)
    px = np.linspace(0, 1, 1000)  # confidence grid for the P/R/F1 curves
    p_curve, r_curve = np.zeros((num_classes, 1000)), np.zeros((num_classes, 1000))
    for c in np.flatnonzero(n_gt > 0):
        if records[c]:
            scores = np.concatenate([r[0] for r in records[c]])
            order = np.argsort(-scores, kind='mergesort')  # as pycocotools
            tp = np.concatenate([r[1] for r in records[c]], 1)[:, order]
            fp = ~tp & ~np.concatenate([r[2] for r in records[c]], 1)[:, order]
            scores = scores[order]
        else:
            scores, tp, fp = np.zeros(0), np.zeros((T, 0), bool), np.zeros((T, 0), bool)
        tpc, fpc = tp.cumsum(1), fp.cumsum(1)  # (T, D)
        recall = tpc / n_gt[c]
        precision = tpc / np.maximum(tpc + fpc, np.spacing(1))
        precision = np.maximum.accumulate(precision[:, ::-1], 1)[:, ::-1]  # envelope: non-increasing
        for t in range(T):
            i = np.searchsorted(recall[t], REC_THRS, side='left')
            ap[c, t] = np.where(i < len(scores), precision[t][np.minimum(i, len(scores) - 1)], 0.0).mean() \
                if len(scores) else 0.0
        if len(scores):  # raw (not enveloped) curves at IoU 0.5 as functions of confidence
            raw_p = tpc[0] / np.maximum(tpc[0] + fpc[0], 1)
            r_curve[c] = np.interp(-px, -scores, recall[0], left=0)
            p_curve[c] = np.interp(-px, -scores, raw_p, left=1)
    has = n_gt > 0
    f1 = 2 * p_curve * r_curve / np.maximum(p_curve + r_curve, 1e-16)
    best = int(f1[has].mean(0).argmax()) if has.any() else 0
    return {'n_gt': n_gt, 'n_pred': n_pred, 'ap': ap, 'precision': p_curve[:, best], 'recall': r_curve[:, best],
            'conf': float(px[best])}


def format_table(res, class_names):
    """The per-class table: an All row, then one row per class with GT."""
    has = res['n_gt'] > 0
    head = f'{"Class":<20}{"#GT":>8}{"#Pred":>9}{"Precision":>11}{"Recall":>9}{"mAP50":>9}{"mAP50-95":>10}'
    rows = [head]

    def row(name, ngt, npred, p, r, ap50, ap):
        rows.append(f'{name:<20}{ngt:>8d}{npred:>9d}{p:>11.3f}{r:>9.3f}{ap50:>9.3f}{ap:>10.3f}')
    if has.any():
        row('All', res['n_gt'].sum(), res['n_pred'].sum(), res['precision'][has].mean(), res['recall'][has].mean(),
            res['ap'][has, 0].mean(), res['ap'][has].mean())
    for c in np.flatnonzero(has):
        row(class_names[c], res['n_gt'][c], res['n_pred'][c], res['precision'][c], res['recall'][c],
            res['ap'][c, 0], res['ap'][c].mean())
    return '\n'.join(rows)


def summary(res, class_names):
    """JSON-ready numbers: map50, map (50-95) and the per-class rows."""
    has = res['n_gt'] > 0
    out = {'map50': float(res['ap'][has, 0].mean()) if has.any() else 0.0,
           'map': float(res['ap'][has].mean()) if has.any() else 0.0, 'conf': res['conf'], 'classes': {}}
    for c in np.flatnonzero(has):
        out['classes'][class_names[c]] = {
            'n_gt': int(res['n_gt'][c]), 'n_pred': int(res['n_pred'][c]), 'precision': float(res['precision'][c]),
            'recall': float(res['recall'][c]), 'map50': float(res['ap'][c, 0]), 'map': float(res['ap'][c].mean())}
    return out


# ------------------------------------------------------------------------------------------------- pictures
PALETTE = [(255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255)]


def draw_grid(images, dets, class_names, path, tile=384, min_score=0.25):
    """A grid (up to 4x4) of images with boxes, class names (and scores), one colour per class. images: uint8
    (B, H, W, 3); dets: list of dicts with boxes, labels and optionally scores. Small images are enlarged
    (nearest) so that 6 px objects stay visible."""
    n = min(len(images), 16)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = Image.new('RGB', (cols * tile, rows * tile), (114, 114, 114))
    for i in range(n):
        im = Image.fromarray(images[i].numpy())
        scale = tile / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
        draw = ImageDraw.Draw(im)
        d = dets[i]
        scores = d.get('scores')
        for j in range(len(d['boxes'])):
            if scores is not None and scores[j] < min_score:
                continue
            c = int(d['labels'][j])
            colour = PALETTE[c % len(PALETTE)]
            box = [float(v) * scale for v in d['boxes'][j]]
            draw.rectangle(box, outline=colour, width=1)
            text = class_names[c] if scores is None else f'{class_names[c]} {float(scores[j]):.2f}'
            draw.text((box[0], max(box[1] - 10, 0)), text, fill=colour)
        grid.paste(im, ((i % cols) * tile, (i // cols) * tile))
    grid.save(path, quality=90)


# ------------------------------------------------------------------------------------------------- model mode
@torch.no_grad()
def run_eval(model, loader, class_names, device, conf=0.001, max_det=1000, out_dir=None, n_pictures=3,
             difficult='ignore'):
    """Inference over a loader, evaluation, and (if out_dir) the val_batch{k}_labels/_pred.jpg pictures.
    -> (result dict of `evaluate`, table string)."""
    model.eval()
    preds, gts = [], []
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    for k, (images, targets) in enumerate(loader):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
            out = model(to_input(images, device))
        dets = postprocess(out, max_det, conf, [t['size'] for t in targets])  # boxes clipped to the unpadded image
        preds += dets
        gts += targets
        if out_dir is not None and k < n_pictures:
            draw_grid(images, targets, class_names, Path(out_dir) / f'val_batch{k}_labels.jpg')
            draw_grid(images, dets, class_names, Path(out_dir) / f'val_batch{k}_pred.jpg')
    res = evaluate(preds, gts, len(class_names), difficult)
    return res, format_table(res, class_names)


def load_detector(path, device):
    """A Detector from a finetune.py checkpoint -> (model, the checkpoint's args dict)."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    a = ckpt['args']
    model = Detector(build_vit(a['model'], a['patch_size']), len(ckpt['class_names']), a['head_dim'])
    model.load_state_dict(ckpt['model'])
    return model.to(device), ckpt


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help='a finetune.py checkpoint (best.pt or last.pt)')
    ap.add_argument('--data', default=None, help="dataset folder or name ('synthetic', 'dota'); default: the one "
                                                 'the checkpoint was trained on')
    ap.add_argument('--split', default='val', help='split folder to evaluate (default: %(default)s)')
    ap.add_argument('--model', default=None, help='ViT preset; must match the checkpoint (read from it if unset)')
    ap.add_argument('--patch-size', type=int, default=None, help='patch size; must match the checkpoint')
    ap.add_argument('--img-size', type=int, default=None, help='unused at evaluation (whole images are used); '
                                                               'accepted for symmetry with the other scripts')
    ap.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: %(default)s)')
    ap.add_argument('--conf', type=float, default=0.001, help='score floor for detections (default: %(default)s)')
    ap.add_argument('--max-det', type=int, default=1000, help='top-K detections per image (default: %(default)s)')
    ap.add_argument('--difficult', choices=['ignore', 'normal'], default='ignore',
                    help='difficult GT: ignored (neither TP nor FP, not in #GT) or counted (default: %(default)s)')
    ap.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    ap.add_argument('--out', default=None, help='folder for the pictures (default: the checkpoint folder)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    ap.add_argument('--workers', type=int, default=2, help='data-loader processes (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    return ap


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, ckpt = load_detector(args.ckpt, device)
    a = ckpt['args']
    for flag in ('model', 'patch_size'):
        if getattr(args, flag) not in (None, a[flag]):
            raise SystemExit(f'--{flag.replace("_", "-")} {getattr(args, flag)} does not match the checkpoint ({a[flag]})')
    class_names = ckpt['class_names']
    loader = make_loader(resolve_data(args.data or a['data']), args.split, class_names, None, args.batch_size,
                         False, args.workers, a['patch_size'])
    out = Path(args.out or Path(args.ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    res, table = run_eval(model, loader, class_names, device, args.conf, args.max_det, out, difficult=args.difficult)
    print(table)
    print(f'pictures: {out}/val_batch{{0,1,2}}_{{labels,pred}}.jpg')
    if args.json:
        Path(args.json).write_text(json.dumps(summary(res, class_names), indent=2))


if __name__ == '__main__':
    main()
