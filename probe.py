"""A linear probe of a frozen encoder: how much do its patch tokens know about the objects under them?

    python probe.py --ckpt runs/pretrain/last.pt --data runs/nwpu/data              # the context encoder
    python probe.py --ckpt runs/pretrain/last.pt --encoder target ...               # the EMA target encoder
    python probe.py --ckpt runs/finetune/best.pt ...                                # a fine-tuned detector's backbone
    python probe.py --ckpt none --model mini --patch-size 16 ...                    # random weights, the floor

Every patch token of the train and val images (whole images, no crop) gets a label: the class of the smallest
object that covers the patch centre, or whose own centre falls in the patch (so an object smaller than a patch
still labels one token), else background; patches in the padding are left out: the batch's, and a padded tile's
beyond the image part its `prepare.py split` manifest records (42 % of NWPU's half-resolution tiles). A softmax-linear
classifier (classes + background) is fitted on the standardized frozen features of the train images and scored on val:
- `map`: mean over classes of the patch-level average precision of that class's probability;
- `obj_ap`: object vs background, scored by 1 - p(background);
- `small_ap`: the same for the patches of small objects (sqrt(area) < 32 px) against background, other object
  patches left out: the seed's claim ("features aligned with small objects") made measurable.
AP here is the area under the precision-recall curve of a ranking (each positive's precision, averaged), not the
detection AP of metrics.py. The same numbers are logged during pretraining by `pretrain.py --probe-every`.
"""
import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from data import make_loader, to_input
from labels import CLASSES
from model import build_vit
from prepare import resolve_data

SMALL = 32.0  # px of sqrt(box area): tiny + small in metrics.SIZE_BINS


def patch_labels(boxes, labels, grid_h, grid_w, patch_size, size, background):
    """boxes (n, 4) xyxy px, labels (n,) of one image; size (h, w) of the image without its padding.
    -> label (gh * gw,) long (`background` where no object, -1 in the padding), small (gh * gw,) bool: the label
    comes from an object with sqrt(area) < SMALL. Row-major, like the ViT's tokens."""
    n = len(boxes)
    cy = (torch.arange(grid_h, dtype=torch.float32) + 0.5) * patch_size  # (gh,) patch centres
    cx = (torch.arange(grid_w, dtype=torch.float32) + 0.5) * patch_size  # (gw,)
    px, py = cx.repeat(grid_h), cy.repeat_interleave(grid_w)  # (N,) each, row-major
    label = torch.full((grid_h * grid_w,), background, dtype=torch.long)
    small = torch.zeros(grid_h * grid_w, dtype=torch.bool)
    if n:
        b = boxes.float()
        covers = (px >= b[:, None, 0]) & (px < b[:, None, 2]) & (py >= b[:, None, 1]) & (py < b[:, None, 3])  # (n, N)
        col = ((b[:, 0] + b[:, 2]) / 2 // patch_size).long().clamp(0, grid_w - 1)  # (n,) patch of each box centre
        row = ((b[:, 1] + b[:, 3]) / 2 // patch_size).long().clamp(0, grid_h - 1)
        covers[torch.arange(n), row * grid_w + col] = True
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=0)  # (n,)
        best = torch.where(covers, area[:, None], torch.inf).min(0)  # smallest covering object per patch
        hit = best.values < torch.inf  # (N,)
        label[hit] = labels[best.indices[hit]]
        small[hit] = area[best.indices[hit]].sqrt() < SMALL
    label[(px >= size[1]) | (py >= size[0])] = -1  # padding added by collate
    return label, small


@torch.no_grad()
def extract(encoder, loader, device, background):
    """Frozen features of every non-padding patch token of the loader's images.
    -> feats (P, D) float32, label (P,), small (P,) (patch_labels)."""
    encoder.eval()
    p = encoder.patch_size
    feats, labels, smalls = [], [], []
    for images, targets in loader:
        x = to_input(images, targets, device)
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        f = encoder(x).float().cpu()  # (B, N, D)
        for b, t in enumerate(targets):
            size = t.get('content', t['size'])  # a padded tile's image part: its padding is not background
            lab, sm = patch_labels(t['boxes'], t['labels'], gh, gw, p, size, background)
            keep = lab >= 0
            feats.append(f[b, keep])
            labels.append(lab[keep])
            smalls.append(sm[keep])
    return torch.cat(feats), torch.cat(labels), torch.cat(smalls)


def fit_linear(x, y, num_outputs, steps=300, lr=0.05, weight_decay=1e-4, seed=0):
    """Softmax regression on standardized features by full-batch Adam. x (P, D), y (P,) in [0, num_outputs).
    -> a function features (Q, D) -> probabilities (Q, num_outputs)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], num_outputs, generator=g) * 0.01).requires_grad_()
    bias = torch.zeros(num_outputs, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(z @ w + bias, y) + weight_decay * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w, bias = w.detach(), bias.detach()
    return lambda q: torch.softmax((q - mean) / std @ w + bias, -1)


def average_precision(scores, positive):
    """Area under the precision-recall curve of ranking `scores` (Q,) for the boolean `positive` (Q,): the mean,
    over positives, of the precision at its rank (ties: stable order). None without positives."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    hits = positive[torch.argsort(scores, descending=True, stable=True)].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / n_pos)


def probe_scores(train, val, num_classes, steps=300):
    """train, val: (feats, label, small) from extract. -> dict: map, obj_ap, small_ap, per-class 'ap' (None where
    val has no patch of the class), and the patch counts."""
    (xt, yt, _), (xv, yv, sv) = train, val
    prob = fit_linear(xt, yt, num_classes + 1, steps)(xv)  # (Q, C + 1), background last
    ap = [average_precision(prob[:, c], yv == c) for c in range(num_classes)]
    present = [a for a in ap if a is not None]
    is_obj = yv < num_classes
    bg = ~is_obj
    obj_score = 1 - prob[:, num_classes]
    sel = bg | sv  # small-object patches against background
    return {'map': float(np.mean(present)) if present else None, 'obj_ap': average_precision(obj_score, is_obj),
            'small_ap': average_precision(obj_score[sel], sv[sel]), 'ap': ap,
            'n_train': len(yt), 'n_val': len(yv), 'n_val_object': int(is_obj.sum()), 'n_val_small': int(sv.sum())}


class Probe:
    """The probe's data, loaded once (used by pretrain.py --probe-every): call it with an encoder -> probe_scores."""

    def __init__(self, data, class_names, patch_size, batch_size=16, workers=2, device='cpu', steps=300):
        root = resolve_data(data)
        self.loaders = [make_loader(root, split, class_names, None, batch_size, False, workers, patch_size)
                        for split in ('train', 'val')]
        self.num_classes, self.device, self.steps = len(class_names), device, steps

    def __call__(self, encoder):
        was_training = encoder.training
        train, val = (extract(encoder, ld, self.device, self.num_classes) for ld in self.loaders)
        encoder.train(was_training)
        return probe_scores(train, val, self.num_classes, self.steps)


def load_encoder(ckpt_path, which, model, patch_size, seed=0):
    """The ViT of a pretrain.py checkpoint ('context' or 'target'), of a finetune.py checkpoint (its backbone), or
    random weights ('none': needs model and patch_size). -> (encoder, class-list name or None, what was loaded:
    'context', 'target', 'backbone' or None)."""
    if ckpt_path == 'none':
        if model is None or patch_size is None:
            raise SystemExit('--ckpt none needs --model and --patch-size')
        torch.manual_seed(seed)
        return build_vit(model, patch_size), None, None
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    a = ckpt['args']
    enc = build_vit(a['model'], a['patch_size'])
    if which in ckpt:  # pretrain.py
        enc.load_state_dict(ckpt[which])
    elif 'model' in ckpt:  # finetune.py: the detector's backbone
        enc.load_state_dict({k[len('backbone.'):]: v for k, v in ckpt['model'].items() if k.startswith('backbone.')})
        which = 'backbone'
    else:
        raise SystemExit(f'{ckpt_path}: neither a pretrain.py checkpoint (context/target) nor a finetune.py one '
                         f'(model); keys: {", ".join(ckpt)}')
    return enc, a.get('classes'), which


def _num(v, width=0):
    return f'{v:>{width}.3f}' if v is not None else f'{"-":>{width}}'


def describe(r):
    """One line of probe_scores' numbers."""
    return f'mAP {_num(r["map"])}, object vs background AP {_num(r["obj_ap"])}, small objects {_num(r["small_ap"])}'


def format_row(name, r):
    return f'{name:<28}' + ''.join(_num(r[k], 10) for k in ('map', 'obj_ap', 'small_ap'))


HEADER = f'{"encoder":<28}{"probe mAP":>10}{"obj AP":>10}{"small AP":>10}'


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help="pretrain.py or finetune.py checkpoint, or 'none' (random weights)")
    ap.add_argument('--encoder', choices=['context', 'target'], default='context',
                    help='which encoder of a pretrain.py checkpoint (default: %(default)s)')
    ap.add_argument('--data', default='synthetic', help="dataset folder with train/ and val/ (or 'synthetic', "
                                                        "'dota') (default: %(default)s)")
    ap.add_argument('--classes', default=None, choices=list(CLASSES), help="class list (default: the checkpoint's, "
                                                                          "else 'dota1.0')")
    ap.add_argument('--model', default=None, help='ViT preset, with --ckpt none')
    ap.add_argument('--patch-size', type=int, default=None, help='patch size, with --ckpt none')
    ap.add_argument('--steps', type=int, default=300, help='Adam steps of the linear fit (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: %(default)s)')
    ap.add_argument('--workers', type=int, default=2, help='data-loader threads (default: %(default)s)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    ap.add_argument('--seed', type=int, default=0, help='seed of random weights (default: %(default)s)')
    ap.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    return ap


def main(argv=None):
    args = get_parser().parse_args(argv)
    enc, classes, part = load_encoder(args.ckpt, args.encoder, args.model, args.patch_size, args.seed)
    class_names = CLASSES[args.classes or classes or 'dota1.0']
    r = Probe(args.data, class_names, enc.patch_size, args.batch_size, args.workers, args.device,
              args.steps)(enc.to(args.device))
    print(f'{r["n_train"]} train / {r["n_val"]} val patches ({r["n_val_object"]} on objects, {r["n_val_small"]} on '
          f'small ones)')
    print(HEADER)
    print(format_row(args.ckpt if part is None else f'{args.ckpt} ({part})', r))
    for c, a in enumerate(r['ap']):
        if a is not None:
            print(f'  {class_names[c]:<26}{a:>10.3f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(r, f, indent=2)


if __name__ == '__main__':
    main()
