"""DOTA's files at evaluation: label folders, submission files, and tile detections merged into full images.

    Task1_<class>.txt   one line per detection: `image score x1 y1 x2 y2 x3 y3 x4 y4` (oriented boxes, task 1)
    Task2_<class>.txt   one line per detection: `image score xmin ymin xmax ymax` (axis-aligned boxes, task 2)
    <image>.txt         a detector's boxes as DOTA label files (write_label_files), for masking images that have
                        no labels in pretraining

Detections and ground truth are {image id: {boxes, scores, labels[, difficult]}} dicts; boxes are (n, 4) xyxy for
task 2 and polygons (n, 8) for task 1 (metrics.py evaluates both).
"""
import json
from pathlib import Path

import numpy as np
import torch

from labels import LabelError, parse_label_file, parse_tile_name
from obb import polygon_iou

COLUMNS = {1: 8, 2: 4}  # task -> box numbers per line
EXAMPLE = {1: 'image score x1 y1 x2 y2 x3 y3 x4 y4', 2: 'image score x1 y1 x2 y2'}


def read_labels(label_dir, class_names, task=2):
    """{image id: GT dict} from a labelTxt folder, nothing dropped or clipped: what the official evaluation sees.
    Task 2: boxes are the polygons' min/max (n, 4); task 1: the polygons themselves (n, 8)."""
    files = sorted(Path(label_dir).glob('*.txt'))
    if not files:
        raise FileNotFoundError(f'no label files (*.txt) in {label_dir}')
    gts = {}
    for f in files:
        polys, labels, difficult, _ = parse_label_file(f, class_names)
        xy = polys.reshape(-1, 4, 2)
        boxes = polys if task == 1 else np.concatenate([xy.min(1), xy.max(1)], 1)
        gts[f.stem] = {'boxes': boxes.astype(np.float64), 'labels': labels, 'difficult': difficult > 0}
    return gts


def submission_task(det_dir):
    """1 or 2: which task's files DET_DIR holds (an error if both or none)."""
    found = [t for t in (1, 2) if any(Path(det_dir).glob(f'Task{t}_*.txt'))]
    if len(found) != 1:
        raise FileNotFoundError(f'{det_dir}: expected Task1_<class>.txt (oriented boxes) or Task2_<class>.txt '
                                f'(axis-aligned) files, found {"both" if found else "neither"}')
    return found[0]


def read_submission(det_dir, class_names, image_ids, task=2):
    """{image id: detections} from DET_DIR/Task<task>_<class>.txt. A missing class file means no detections of
    that class; a line naming an image outside image_ids is an error."""
    files = sorted(Path(det_dir).glob(f'Task{task}_*.txt'))
    if not files:
        raise FileNotFoundError(f'no Task{task}_<class>.txt files in {det_dir}')
    index = {name: i for i, name in enumerate(class_names)}
    rows, k = {i: [] for i in image_ids}, COLUMNS[task]
    for f in files:
        name = f.stem[len(f'Task{task}_'):]
        if name not in index:
            raise LabelError(f'{f}: unknown class {name!r}; known: {", ".join(class_names)}')
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            tok = line.split()
            if not tok:
                continue
            try:
                if len(tok) != k + 2:
                    raise ValueError
                values = [float(t) for t in tok[1:]]
            except ValueError:
                raise LabelError(f"{f}:{lineno}: expected '{EXAMPLE[task]}', got {line.strip()!r}") from None
            if tok[0] not in rows:
                raise LabelError(f'{f}:{lineno}: image {tok[0]!r} has no label file in the labels folder')
            rows[tok[0]].append([index[name], *values])
    out = {}
    for i, r in rows.items():
        r = np.asarray(r, np.float64).reshape(-1, k + 2)
        out[i] = {'labels': r[:, 0].astype(np.int64), 'scores': r[:, 1], 'boxes': r[:, 2:]}
    return out


def write_submission(out_dir, dets, class_names):
    """Submission files OUT_DIR/Task<t>_<class>.txt from {image id: detections}: task 1 when the boxes are polygons
    (n, 8), task 2 for (n, 4) boxes. -> the task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, task = {c: [] for c in range(len(class_names))}, 2
    for image_id, d in sorted(dets.items()):
        boxes = np.asarray(d['boxes'], np.float64)
        task = 1 if boxes.ndim == 2 and boxes.shape[1] == 8 else task
        for c, s, b in zip(np.asarray(d['labels']), np.asarray(d['scores']), boxes):
            lines[int(c)].append(f'{image_id} {s:.6f} ' + ' '.join(f'{v:.2f}' for v in b) + '\n')
    for c, name in enumerate(class_names):
        (out_dir / f'Task{task}_{name}.txt').write_text(''.join(lines[c]))
    return task


def write_label_files(out_dir, dets, class_names, min_score, source):
    """A detector's boxes as DOTA label files OUT_DIR/<image>.txt (`x1 y1 ... x4 y4 class 0`, what labels.py reads),
    those scoring at least min_score, one file per image (empty when it has none), and OUT_DIR/detections.json
    recording `source` (the checkpoint, its data) and the threshold. dets: {image id: boxes (n, 4) xyxy or polygons
    (n, 8), scores, labels}. -> the number of boxes written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for image_id, d in dets.items():
        keep = np.asarray(d['scores']) >= min_score
        b = np.asarray(d['boxes'], np.float64)[keep]
        if b.shape[1] == 4:  # corners clockwise from the top left
            b = b[:, [0, 1, 2, 1, 2, 3, 0, 3]]
        names = [class_names[int(c)] for c in np.asarray(d['labels'])[keep]]
        (out_dir / f'{image_id}.txt').write_text(''.join(' '.join(f'{v:.1f}' for v in p) + f' {c} 0\n'
                                                         for p, c in zip(b, names)))
        n += len(b)
    (out_dir / 'detections.json').write_text(json.dumps({**source, 'min_score': min_score, 'images': len(dets),
                                                         'boxes': n}, indent=2))
    return n


# ------------------------------------------------------------------------------------------------- merging
def nms(boxes, scores, iou_thr, chunk=1 << 20):
    """Exact greedy NMS (the sequential definition) without a loop over boxes: in rounds, a box is kept when no
    higher-scored box that is kept or still undecided overlaps it by more than iou_thr, and suppressed when a kept
    one does. The rounds are as many as the longest chain of overlaps (a few). boxes: (n, 4) xyxy, or polygons
    (n, 8) compared by exact polygon IoU. The overlapping pairs are found in blocks of rows of about `chunk` pairs
    (~100 bytes of temporaries each) and kept as a list, so that memory stays bounded for the 10^5 boxes of a large
    scene. -> kept indices, by score."""
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order]
    n, poly = len(b), b.shape[1] == 8
    ext = torch.cat([b.view(n, -1, 2).amin(1), b.view(n, -1, 2).amax(1)], 1) if poly else b  # (n, 4) extents
    area = (ext[:, 2:] - ext[:, :2]).clamp(min=0).prod(-1)
    lo, hi = [], []  # pairs over the threshold: lo scored below hi
    rows = max(1, chunk // max(n, 1))
    for s in range(0, n, rows):  # rows s..e-1 against the boxes scored above them (columns 0..e-1)
        e = min(n, s + rows)
        lt = torch.maximum(ext[s:e, None, :2], ext[None, :e, :2])
        rb = torch.minimum(ext[s:e, None, 2:], ext[None, :e, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)  # (e - s, e)
        below = torch.arange(s, e)[:, None] > torch.arange(e)[None]  # (e - s, e): the column is scored higher
        if poly:  # extents that meet -> exact polygon IoU (the lower-scored polygon clipped by the higher one)
            i, j = torch.nonzero((inter > 0) & below, as_tuple=True)
            i = i + s
            iou = torch.from_numpy(polygon_iou(b[i].view(-1, 4, 2).numpy(), b[j].view(-1, 4, 2).numpy()))
            i, j = i[iou > iou_thr], j[iou > iou_thr]
        else:
            iou = inter / (area[s:e, None] + area[None, :e] - inter).clamp(min=1e-9)
            i, j = torch.nonzero((iou > iou_thr) & below, as_tuple=True)
            i = i + s
        lo.append(i)
        hi.append(j)
    lo, hi = torch.cat(lo + [torch.zeros(0, dtype=torch.long)]), torch.cat(hi + [torch.zeros(0, dtype=torch.long)])
    state = torch.zeros(n, dtype=torch.int8)  # 0 undecided, 1 kept, -1 suppressed
    while (state == 0).any():
        blocked = torch.zeros(n, dtype=torch.bool)
        blocked[lo[state[hi] >= 0]] = True  # a higher-scored kept/undecided box overlaps
        state[(state == 0) & ~blocked] = 1
        suppressed = torch.zeros(n, dtype=torch.bool)
        suppressed[lo[state[hi] == 1]] = True
        state[(state == 0) & suppressed] = -1
    return order[state == 1]


def merge_tiles(tile_dets, iou_thr=0.5):
    """{tile name: detections in tile pixels} -> {image id: detections in full-image pixels}: a box or polygon p of
    tile <id>__<rate>__<left>___<top> becomes (p + (left, top)) / rate; then class-wise NMS removes the duplicates
    that overlapping tiles produce along their seams (polygon IoU for polygons)."""
    by_image = {}
    for name, d in tile_dets.items():
        image_id, rate, left, top = parse_tile_name(name)
        boxes = torch.as_tensor(np.asarray(d['boxes']), dtype=torch.float64)
        boxes = (boxes + torch.tensor([left, top], dtype=torch.float64).repeat(boxes.shape[1] // 2)) / rate
        by_image.setdefault(image_id, []).append((boxes, torch.as_tensor(d['scores'], dtype=torch.float64),
                                                  torch.as_tensor(d['labels'])))
    merged = {}
    for image_id, parts in by_image.items():
        boxes, scores, labels = (torch.cat(x) for x in zip(*parts))
        keep = torch.cat([torch.nonzero(labels == c).squeeze(1)[nms(boxes[labels == c], scores[labels == c], iou_thr)]
                          for c in labels.unique()] + [torch.zeros(0, dtype=torch.long)])
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        merged[image_id] = {'boxes': boxes[keep].numpy(), 'scores': scores[keep].numpy(),
                            'labels': labels[keep].numpy()}
    return merged
