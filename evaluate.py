"""Evaluate detections: the per-class table, JSON, label/prediction pictures, DOTA merging and submission files.

    python evaluate.py --ckpt runs/finetune/best.pt                      # the model on the val tiles (coco table)
    python evaluate.py --ckpt runs/finetune/best.pt --data dota --merge --labels DOTA/val/labelTxt --protocol dota
        # tiles -> full images (class-wise NMS across seams) -> the official DOTA number + Task<t>_<class>.txt files
    python evaluate.py --dets submission/ --labels DOTA/val/labelTxt --protocol dota   # offline, no model

The metrics and their exact semantics are in metrics.py: `coco` (default; IoU .50:.05:.95, 101-point AP, difficult
ignored, no cap on detections, Precision/Recall at the best mean-F1 confidence) and `dota` (the official DOTA
evaluation: VOC07 11-point AP at IoU > 0.5). --sizes adds AP by object size. A model trained with --boxes obb is
evaluated on oriented boxes, by exact polygon IoU (task 1: Task1_<class>.txt files); an axis-aligned one on task 2.
Offline, the files in --dets say which task it is.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import make_loader, to_input
from labels import CLASSES
from prepare import resolve_data
from metrics import ERROR_KINDS, SIZE_BINS, error_breakdown, evaluate_coco, evaluate_dota
from obb import obb_to_poly
from submission import (merge_tiles, read_labels, read_submission, submission_task, write_label_files,
                        write_submission)
from detector import Detector, postprocess
from model import build_vit


# ------------------------------------------------------------------------------------------------- tables
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


def format_dota_table(res, class_names):
    """The official protocol's table: every class of the class list (mAP is their mean)."""
    rows = [f'{"Class":<20}{"#GT":>8}{"#Pred":>9}{"Recall":>9}{"AP50 (VOC07)":>14}',
            f'{"All (mAP)":<20}{res["n_gt"].sum():>8d}{res["n_pred"].sum():>9d}{res["recall"].mean():>9.3f}'
            f'{res["ap"].mean():>14.4f}']
    rows += [f'{name:<20}{res["n_gt"][c]:>8d}{res["n_pred"][c]:>9d}{res["recall"][c]:>9.3f}{res["ap"][c]:>14.4f}'
             for c, name in enumerate(class_names)]
    return '\n'.join(rows)


def format_size_table(res, class_names):
    """AP50 and AP50-95 by object size (coco protocol, by_size=True); '-' where a class has no GT of that size."""
    rows = [f'{"Class":<20}' + ''.join(f'{name + " 50":>12}{name + " 50-95":>15}' for name, _, _ in SIZE_BINS)]
    for c in [None] + list(np.flatnonzero(res['n_gt'] > 0)):
        cells = []
        for name, _, _ in SIZE_BINS:
            ap = res['ap_size'][name]
            v = ap[~np.isnan(ap[:, 0])] if c is None else ap[c:c + 1][~np.isnan(ap[c:c + 1, 0])]
            cells += [f'{v[:, 0].mean():>12.3f}{v.mean():>15.3f}' if len(v) else f'{"-":>12}{"-":>15}']
        rows.append(f'{"All" if c is None else class_names[c]:<20}' + ''.join(cells))
    return '\n'.join(rows)


def format_error_table(err, class_names):
    """metrics.error_breakdown as a table: each class's top #GT detections by kind, and the share of GT found."""
    rows = [f'{"Class":<20}{"#GT":>8}' + ''.join(f'{k:>7}' for k in ERROR_KINDS) + f'{"found":>8}']
    for c in np.flatnonzero(err['n_gt'] > 0):
        rows.append(f'{class_names[c]:<20}{err["n_gt"][c]:>8d}' + ''.join(f'{err[k][c]:>7d}' for k in ERROR_KINDS) +
                    f'{err["found"][c]:>8.3f}')
    return '\n'.join(rows)


def summary(res, class_names, protocol='coco'):
    """JSON-ready numbers of either protocol (and of the error table, when it was made)."""
    if protocol == 'dota':
        out = {'protocol': 'dota', 'map50_voc07': float(res['ap'].mean()), 'classes': {
            name: {'n_gt': int(res['n_gt'][c]), 'n_pred': int(res['n_pred'][c]), 'recall': float(res['recall'][c]),
                   'ap50_voc07': float(res['ap'][c])} for c, name in enumerate(class_names)}}
    else:
        has = res['n_gt'] > 0
        out = {'protocol': 'coco', 'map50': float(res['ap'][has, 0].mean()) if has.any() else 0.0,
               'map': float(res['ap'][has].mean()) if has.any() else 0.0, 'conf': res['conf'], 'classes': {}}
        for c in np.flatnonzero(has):
            out['classes'][class_names[c]] = {
                'n_gt': int(res['n_gt'][c]), 'n_pred': int(res['n_pred'][c]), 'precision': float(res['precision'][c]),
                'recall': float(res['recall'][c]), 'map50': float(res['ap'][c, 0]), 'map': float(res['ap'][c].mean())}
    if 'ap_size' in res:
        out['sizes'] = {}
        for name, ap in res['ap_size'].items():
            ok = ~np.isnan(ap[:, 0])
            out['sizes'][name] = {'map50': float(ap[ok, 0].mean()) if ok.any() else None,
                                  'map': float(ap[ok].mean()) if ok.any() else None,
                                  'classes': {class_names[c]: {'map50': float(ap[c, 0]), 'map': float(ap[c].mean())}
                                              for c in np.flatnonzero(ok)}}
    if 'errors' in res:
        e = res['errors']
        out['errors'] = {class_names[c]: {**{k: int(e[k][c]) for k in ('n_gt',) + ERROR_KINDS},
                                          'found': float(e['found'][c])} for c in np.flatnonzero(e['n_gt'] > 0)}
    return out


# ------------------------------------------------------------------------------------------------- pictures
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]
# one colour per DOTA class, in class order: 18 of Trubetskoy's 20 distinct colours (neighbours in the list differ)


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
            if len(box) == 8:  # a polygon: the oriented box
                draw.polygon(box, outline=colour, width=1)
                box = [min(box[0::2]), min(box[1::2])]
            else:
                draw.rectangle(box, outline=colour, width=1)
            text = class_names[c] if scores is None else f'{class_names[c]} {float(scores[j]):.2f}'
            draw.text((box[0], max(box[1] - 10, 0)), text, fill=colour)
        grid.paste(im, ((i % cols) * tile, (i // cols) * tile))
    grid.save(path, quality=90)


def _pyplot():
    """matplotlib's pyplot on a file backend, or None: it is optional (pip install matplotlib), and without it only
    the PNG curves are missing (the numbers are in the tables, JSON and results.csv)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_pr(res, class_names, path):
    """PR_curve.png: each class's interpolated precision-recall curve at IoU 0.5 (res['pr50'] of evaluate_coco;
    the area under it is the class's AP50), and their mean. -> whether it was drawn."""
    plt = _pyplot()
    if plt is None or 'pr50' not in res:
        return False
    has = res['n_gt'] > 0
    recall = np.linspace(0, 1, res['pr50'].shape[1])
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    for c in np.flatnonzero(has):
        ax.plot(recall, res['pr50'][c], lw=1, label=f'{class_names[c]} {res["ap"][c, 0]:.3f}')
    if has.any():
        ax.plot(recall, res['pr50'][has].mean(0), lw=3, color='blue',
                label=f'all classes {res["ap"][has, 0].mean():.3f} mAP50')
    ax.set(xlabel='Recall', ylabel='Precision', xlim=(0, 1), ylim=(0, 1.01), title='Precision-recall at IoU 0.5')
    ax.legend(loc='upper right', fontsize=7)
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_results(csv_path, path):
    """results.png: every column of a finetune.py results.csv against the epoch, one panel each (empty cells,
    the epochs without evaluation, are skipped). -> whether it was drawn."""
    plt = _pyplot()
    lines = Path(csv_path).read_text().splitlines()
    if plt is None or len(lines) < 2:
        return False
    head = lines[0].split(',')
    cols = list(zip(*[line.split(',') for line in lines[1:]]))
    epoch = np.array(cols[0], float)
    cols_per_row = len(head) // 2  # len(head) - 1 panels (every column but the epoch) on two rows
    fig, axes = plt.subplots(2, cols_per_row, figsize=(3 * cols_per_row, 5.5), dpi=120)
    for ax, name, col in zip(axes.ravel(), head[1:], cols[1:]):
        ok = np.array([v != '' for v in col])
        ax.plot(epoch[ok], np.array([float(v) for v in col if v != '']), marker='.', lw=1.5)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------- model mode
def score(preds, gts, class_names, protocol='coco', difficult='ignore', max_dets=None, sizes=False, errors=False):
    """Evaluate with either protocol -> (result dict, printable text); errors: the error table too (res['errors'])."""
    if protocol == 'dota':
        res = evaluate_dota(preds, gts, len(class_names))
        text = format_dota_table(res, class_names)
    else:
        res = evaluate_coco(preds, gts, len(class_names), difficult, max_dets, by_size=sizes)
        text = format_table(res, class_names)
        text += ('\n\nAP by object size (sqrt of box area, px)\n' + format_size_table(res, class_names)
                 if sizes else '')
    if errors:
        res['errors'] = error_breakdown(preds, gts, len(class_names), difficult)
        text += ('\n\nEach class\'s top #GT detections: tp, dup (its GT already taken), loc (IoU 0.1-0.5), cls '
                 '(another class\'s object), bg; found: GT reached at IoU >= 0.5 at any score\n' +
                 format_error_table(res['errors'], class_names))
    return res, text


def as_polygons(d):
    """A target or detection dict with oriented boxes (n, 5) -> the same with their corners (n, 8), the form the
    evaluator, the pictures and the Task1 files use; axis-aligned boxes pass unchanged."""
    b = np.asarray(d['boxes'])
    return {**d, 'boxes': obb_to_poly(b).reshape(-1, 8)} if b.ndim == 2 and b.shape[1] == 5 else d


def as_hbb(d):
    """Polygons (n, 8) -> their axis-aligned boxes (n, 4): how an oriented model is scored on task 2."""
    b = np.asarray(d['boxes'])
    b = b.reshape(len(b), b.shape[-1] // 2, 2)  # (n, corners, 2); not -1: a tile with no box is (0, 8)
    return {**d, 'boxes': np.concatenate([b.min(1), b.max(1)], 1)} if b.shape[1] == 4 else d


@torch.no_grad()
def predict(model, loader, device, conf=0.001, max_det=1000, hbb=False, centre_gate=None):
    """Yield (images, targets, detections) batch by batch; oriented boxes as polygons (n, 8) (as_polygons), or with
    hbb=True the detections as their axis-aligned boxes (n, 4); centre_gate: detector.postprocess's."""
    model.eval()
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    for images, targets in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
            out = model(to_input(images, targets, device))
        sizes = [t['size'] for t in targets]
        dets = postprocess(out, max_det, conf, sizes, centre_gate)  # clipped to the unpadded sizes
        dets = [as_polygons(d) for d in dets]
        yield images, [as_polygons(t) for t in targets], [as_hbb(d) for d in dets] if hbb else dets


def run_eval(model, loader, class_names, device, conf=0.001, max_det=1000, out_dir=None, n_pictures=3,
             difficult='ignore', protocol='coco', sizes=False, hbb=False, errors=False, centre_gate=None,
             labels_out=None):
    """Inference, evaluation on the loader's images, and (if out_dir) the val_batch{k}_labels/_pred.jpg pictures.
    labels_out = (folder, min_score, source dict): also write the detections as label files
    (submission.write_label_files). -> (result dict, table)."""
    preds, gts, names = [], [], []
    for k, (images, targets, dets) in enumerate(predict(model, loader, device, conf, max_det, hbb, centre_gate)):
        preds += dets
        gts += targets
        names += [t['name'] for t in targets]
        if out_dir is not None and k < n_pictures:
            draw_grid(images, targets, class_names, Path(out_dir) / f'val_batch{k}_labels.jpg')
            draw_grid(images, dets, class_names, Path(out_dir) / f'val_batch{k}_pred.jpg')
    res, text = score(preds, gts, class_names, protocol, difficult, sizes=sizes, errors=errors)
    if labels_out is not None:
        folder, min_score, source = labels_out
        n = write_label_files(folder, dict(zip(names, preds)), class_names, min_score, source)
        text += f'\nwrote {n} boxes scoring >= {min_score} of {len(names)} images as label files: {folder}'
    if out_dir is not None:
        plot_pr(res, class_names, Path(out_dir) / 'PR_curve.png')
    return res, text


# Options of finetune.py that changed the model itself, measured and removed (RESULTS.md, "tried and removed"):
# option -> (its off value, the last commit that has it). A checkpoint trained with one of them cannot be rebuilt
# here. (The removed training-only options, e.g. --ema, --o2m or --cls-loss, left weights that today's Detector
# loads as they are.)
REMOVED = {'max_filter': (False, 'd94a794b30'), 'peak_filter': (False, 'd94a794b30'), 'whiten': (0, 'd94a794b30'),
           'dec_layers': (0, 'a60b129')}


def load_detector(path, device):
    """A Detector from a finetune.py checkpoint -> (model, the checkpoint). A checkpoint of a removed option
    (REMOVED) is an error naming the option and the commit that still has it."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    a = ckpt['args']
    gone = {k: a[k] for k, (off, _) in REMOVED.items() if a.get(k, off) != off}
    if gone:
        commit = REMOVED[next(iter(gone))][1]  # the oldest removal first: that commit has every later one too
        raise SystemExit(f'{path} was trained with ' + ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in
                                                                gone.items()) +
                         f': options removed after measuring them (RESULTS.md, "tried and removed"); '
                         f'`git checkout {commit}` evaluates it')
    model = Detector(build_vit(a['model'], a['patch_size']), len(ckpt['class_names']), a['head_dim'],
                     a.get('stride', 8), obb=a.get('boxes', 'hbb') == 'obb',
                     spatial_prior=a.get('spatial_prior', False), fine=a.get('fine', 0))
    own = model.state_dict()  # not needed to predict: the training-only one-to-many head (--o2m, removed) and, in
    # checkpoints before 2026-11-30, a dense-only model's unused query layers
    model.load_state_dict({k: v for k, v in ckpt['model'].items() if k in own or
                           not k.startswith(('query.', 'size_pos.', 'angle_pos.', 'cls_o2m.', 'box_o2m.'))})
    return model.to(device), ckpt


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', default=None, help='a finetune.py checkpoint (model mode)')
    ap.add_argument('--dets', default=None, help='a folder of Task1_<class>.txt (oriented) or Task2_<class>.txt '
                                                 'files (offline mode, needs --labels)')
    ap.add_argument('--labels', default=None, help='labelTxt folder of the full images (offline mode and --merge)')
    ap.add_argument('--protocol', choices=['coco', 'dota'], default=None, help='coco-style table or the official '
                    'DOTA task-2 number (default: dota with --merge, coco otherwise)')
    ap.add_argument('--sizes', action='store_true', help='also print AP by object size (coco protocol)')
    ap.add_argument('--errors', action='store_true', help='also print where each class\'s AP goes: its top #GT '
                    'detections as true positives, duplicates, poorly placed, wrong class, background (TIDE\'s types; '
                    'metrics.error_breakdown)')
    ap.add_argument('--task', type=int, choices=[1, 2], default=None, help='model mode: 1 = oriented boxes (a '
                    '--boxes obb model), 2 = axis-aligned boxes; task 2 of an oriented model scores the axis-aligned '
                    "boxes of its oriented ones (default: the model's own)")
    ap.add_argument('--merge', action='store_true', help='model mode: map tile detections to full images (tile names '
                    '<id>__<rate>__<left>___<top>), NMS across seams, write submission files and, with --labels, '
                    'evaluate against them')
    ap.add_argument('--write-labels', default=None, metavar='DIR',
                    help="model mode: also write the model's boxes on the split as DOTA label files DIR/<image>.txt "
                    '(+ DIR/detections.json naming the checkpoint): boxes for pretrain.py --unlabelled-boxes. The '
                    'split may have no labels (then the table is empty)')
    ap.add_argument('--label-conf', type=float, default=0.3, help='--write-labels: the score a box needs to be '
                                                                  'written (default: %(default)s)')
    ap.add_argument('--classes', default=None, choices=list(CLASSES), help="class list; default: the checkpoint's "
                                                                          "(offline: 'dota1.0')")
    ap.add_argument('--data', default=None, help="dataset folder or name ('synthetic', 'dota'); default: the one "
                                                 'the checkpoint was trained on')
    ap.add_argument('--split', default='val', help='split folder to evaluate (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: %(default)s)')
    ap.add_argument('--conf', type=float, default=0.001, help='score floor for detections (default: %(default)s)')
    ap.add_argument('--max-det', type=int, default=1000, help='top-K detections per image (default: %(default)s)')
    ap.add_argument('--centre-gate', type=float, default=None, help='m: drop each cell whose box centre lies more '
                    'than 0.5 + m cells from its own (detector.postprocess); default: the checkpoint\'s '
                    '(finetune.py --centre-gate); a negative value: off')
    ap.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    ap.add_argument('--out', default=None, help='folder for pictures and submission files (default: the checkpoint '
                                                "folder; offline: don't write)")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    ap.add_argument('--workers', type=int, default=2, help='data-loader threads (default: %(default)s)')
    return ap


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.protocol = args.protocol or ('dota' if args.merge else 'coco')
    if args.dets:  # offline: submission files against label files, no model
        if not args.labels:
            raise SystemExit('--dets needs --labels (the labelTxt folder of the same images)')
        class_names = CLASSES[args.classes or 'dota1.0']
        task = submission_task(args.dets)
        gts = read_labels(args.labels, class_names, task)
        dets = read_submission(args.dets, class_names, list(gts), task)
        res, text = score([dets[i] for i in gts], list(gts.values()), class_names, args.protocol, sizes=args.sizes,
                          errors=args.errors)
    elif args.ckpt:
        device = torch.device(args.device)
        model, ckpt = load_detector(args.ckpt, device)
        a, class_names = ckpt['args'], ckpt['class_names']
        own = 1 if a.get('boxes') == 'obb' else 2
        task = args.task or own
        if task < own:
            raise SystemExit(f'{args.ckpt} predicts axis-aligned boxes: it has no task-1 (oriented) number')
        loader = make_loader(resolve_data(args.data or a['data']), args.split, class_names, None, args.batch_size,
                             False, args.workers, a['patch_size'], boxes='obb' if task == 1 else 'hbb')
        hbb = task > own  # an oriented model scored on task 2
        gate = a.get('centre_gate') if args.centre_gate is None else args.centre_gate
        gate = None if gate is None or gate < 0 else gate
        out = Path(args.out or Path(args.ckpt).parent)
        out.mkdir(parents=True, exist_ok=True)
        if args.merge and args.write_labels:
            raise SystemExit('--write-labels writes the tiles\' boxes; it does not combine with --merge')
        if args.merge:
            tile_dets = {t['name']: d for _, targets, dets in predict(model, loader, device, args.conf, args.max_det,
                                                                        hbb, gate) for t, d in zip(targets, dets)}
            merged = merge_tiles(tile_dets)  # NMS at IoU 0.5, DOTA_devkit's
            if not args.labels:  # the test split: files for the evaluation server, nothing to score here
                write_submission(out / 'submission', merged, class_names)
                print(f'{len(merged)} images; submission files (no --labels, so no score): '
                      f'{out / "submission"}/Task{task}_<class>.txt')
                return
            gts = read_labels(args.labels, class_names, task)
            missing = sorted(set(merged) - set(gts))
            if missing:
                raise SystemExit(f'tiles of {len(missing)} images without a label file in {args.labels}, e.g. '
                                 f'{missing[0]}')
            write_submission(out / 'submission', merged, class_names)
            empty = {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, np.int64)}
            res, text = score([merged.get(i, empty) for i in gts], list(gts.values()), class_names, args.protocol,
                              sizes=args.sizes, errors=args.errors)
            text += f'\nsubmission files: {out / "submission"}/Task{task}_<class>.txt'
        else:
            res, text = run_eval(model, loader, class_names, device, args.conf, args.max_det, out,
                                 protocol=args.protocol, sizes=args.sizes, hbb=hbb,
                                 errors=args.errors, centre_gate=gate, labels_out=args.write_labels and (
                                     args.write_labels, args.label_conf,
                                     {'checkpoint': str(args.ckpt), 'data': str(args.data or a['data']),
                                      'split': args.split}))
            text += f'\npictures: {out}/val_batch{{0,1,2}}_{{labels,pred}}.jpg' + (
                f', {out}/PR_curve.png' if _pyplot() else ' (PR_curve.png: pip install matplotlib)')
    else:
        raise SystemExit('give --ckpt (evaluate a model) or --dets with --labels (evaluate submission files)')
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary(res, class_names, args.protocol), indent=2))


if __name__ == '__main__':
    main()
