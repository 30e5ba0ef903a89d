"""Where each masking scheme's hidden patches fall, measured against the true boxes (which the schemes may not read).

    python bench/mask_overlap.py --data runs/nwpu/data --label-fraction 0.25 --boxes runs/nwpu/boxes@0.25labels/boxes \
        --ckpt runs/nwpu/jepa-saliency/pretrain/last.pt

The train tiles of DATA, cropped as pretrain.py crops them (--img-size, seed 0, epoch 0), masked by each scheme at
the same ratio; for the images the fair split leaves unlabelled (the labelled fraction's ground truth is the same for
every object-aware scheme) it prints the share of the hidden patches that overlap a true box, the share of the
true object patches that are hidden, and of the patches each scheme takes for objects (its boxes' patches, or the
salient ones) how many overlap a true box and how many of the true box patches they cover:
    random      MAE's uniform masks (no boxes)
    object-gt   every image's true boxes (the oracle: more labels than the budget)
    object-det  a detector's boxes (--boxes: evaluate.py --write-labels), what jepa-object-det masks with
    saliency    the EMA target's most distinctive tokens (--ckpt: a pretrain.py checkpoint), what jepa-saliency uses
Object-aware masking without boxes on an unlabelled image is random masking there: the random row.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import DOTADataset, crop_offsets, epoch_loader, to_input  # noqa: E402
from labels import CLASSES  # noqa: E402
from masking import make_masks, object_patches, saliency_patches  # noqa: E402
from model import build_vit  # noqa: E402
from pretrain import latent_targets  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', required=True, help='a dataset folder with train/ (its labels are the truth here)')
    ap.add_argument('--label-fraction', type=float, default=0.25, help='the labelled fraction, as bench/nwpu.py '
                                                                       'splits it (default: %(default)s)')
    ap.add_argument('--boxes', default=None, help="a detector's box files for the object-det row (default: no row)")
    ap.add_argument('--ckpt', default=None, help='a pretrain.py checkpoint for the saliency row (default: no row)')
    ap.add_argument('--img-size', type=int, default=256, help='crop side (default: %(default)s)')
    ap.add_argument('--patch-size', type=int, default=16, help='patch size (default: %(default)s)')
    ap.add_argument('--mask-ratio', type=float, default=0.75, help='(default: %(default)s)')
    ap.add_argument('--object-keep', type=float, default=0.25, help='(default: %(default)s)')
    ap.add_argument('--saliency-share', type=float, default=0.17, help='(default: %(default)s)')
    args = ap.parse_args(argv)
    names = CLASSES['dota1.0']
    truth = DOTADataset(args.data, 'train', names, args.img_size, train=True)
    labelled = DOTADataset(args.data, 'train', names)
    labelled.keep_sources(args.label_fraction)
    keep = {f.stem for f in labelled.files}
    idx = [i for i, f in enumerate(truth.files) if f.stem not in keep]  # the unlabelled tiles
    truth.files, truth.targets, truth.content = ([v[i] for i in idx] for v in (truth.files, truth.targets,
                                                                                 truth.content))
    det = None
    if args.boxes:
        det = DOTADataset(args.data, 'train', names, args.img_size, train=True)
        det.files, det.content, det.targets = [], [], []
        det.add_unlabelled(Path(args.data) / 'train', args.boxes)  # the same tiles, with the detector's boxes
        by_name = {f.stem: t for f, t in zip(det.files, det.targets)}
        det.targets = [by_name[f.stem] for f in truth.files]
        det.files, det.content = truth.files, truth.content
    target = None
    if args.ckpt:
        ck = torch.load(args.ckpt, map_location='cpu', weights_only=True)
        target = build_vit(ck['args']['model'], ck['args']['patch_size']).eval()
        target.load_state_dict(ck['target'])
    schemes = ['random', 'object-gt'] + (['object-det'] if det else []) + (['saliency'] if target else [])
    hid_obj = {s: 0.0 for s in schemes}
    marked = {s: [0.0, 0.0] for s in schemes}  # patches a scheme takes for objects, and how many of them are
    hidden = obj_total = 0.0
    p, g, bs = args.patch_size, torch.Generator().manual_seed(0), min(16, len(truth))
    batches = zip(epoch_loader(truth, bs, p, 0, 0, 0), epoch_loader(det, bs, p, 0, 0, 0)) if det else \
        ((b, None) for b in epoch_loader(truth, bs, p, 0, 0, 0))
    for (images, targets), other in batches:  # the same crops (same seeds) for the truth and the detector's boxes
        x = to_input(images, targets, 'cpu')
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        gt = object_patches([t['boxes'] for t in targets], gh, gw, p)  # (B, N) the truth
        obj_total += gt.sum().item()
        for s in schemes:
            boxes = [t['boxes'] for t in (other[1] if s == 'object-det' else targets)]
            salient = None
            if s == 'saliency':
                with torch.no_grad():
                    feats = latent_targets(target, x, ck['args']['target_layers'], ck['args']['target_norm'],
                                           crop_offsets(targets, p, 'cpu'))
                salient = saliency_patches(feats, args.saliency_share)
            mode = {'random': 'random', 'saliency': 'saliency'}.get(s, 'object')
            mine = salient if s == 'saliency' else object_patches(boxes, gh, gw, p)  # (B, N) what it calls objects
            marked[s][0] += mine.sum().item() if s != 'random' else 0
            marked[s][1] += (mine & gt).sum().item() if s != 'random' else 0
            _, tgt, _ = make_masks(mode, boxes, gh, gw, p, args.mask_ratio, args.object_keep, g, salient=salient)
            on = gt.gather(1, tgt)  # (B, M) hidden patches on a true box
            hid_obj[s] += on.sum().item()
            if s == schemes[0]:
                hidden += tgt.numel()
    share = obj_total / hidden * args.mask_ratio
    print(f'{len(truth)} unlabelled train tiles ({args.img_size}² crops); {share:.1%} of their patches overlap a '
          'true box')
    print(f'{"scheme":<12}{"hidden on a box":>17}{"box patches hidden":>20}{"taken as objects":>18}'
          f'{"of them on a box":>18}{"box patches taken":>19}')
    for s in schemes:
        m, hit = marked[s]
        cells = ([f'{m / hidden * args.mask_ratio:.1%}', f'{hit / max(m, 1):.1%}', f'{hit / obj_total:.1%}'] if m
                 else ['-'] * 3)
        print(f'{s:<12}{hid_obj[s] / hidden:>17.1%}{hid_obj[s] / obj_total:>20.1%}{cells[0]:>18}{cells[1]:>18}'
              f'{cells[2]:>19}')
    return {s: {'hidden_on_box': hid_obj[s] / hidden, 'box_hidden': hid_obj[s] / obj_total} for s in schemes}


if __name__ == '__main__':
    main()
