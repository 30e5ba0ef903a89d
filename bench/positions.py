"""Does a pretrained encoder depend on where a crop sits? The JEPA loss of a pretrain.py checkpoint on the same crops
of the val tiles, with the same masks, at grid positions 0.. and shifted by --shift patches.

    python bench/positions.py --ckpt runs/nwpu/jepa-object/pretrain/last.pt --data runs/nwpu/data --crop 256

The ViT's sin-cos positions are absolute. An encoder pretrained on crops placed at 0 has only seen positions
0 .. crop/patch - 1; the detector then works on whole tiles. Since 2026-12-01 the training scripts place each crop
where it was cut from its tile (data.py 'origin'), and the two columns should agree; for an encoder pretrained before,
the shifted column shows what the unseen positions cost (RESULTS.md: 0.81-0.90 at 0, 1.07-1.15 shifted).
Each val tile is cut into crop x crop windows (whole windows only); the loss is printed as loss / mean_baseline
(below 1: better than predicting each crop's mean target), over all windows, per window position in the tile.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import DOTADataset, collate, to_input  # noqa: E402
from labels import CLASSES  # noqa: E402
from masking import random_masking  # noqa: E402
from model import build_predictor, build_vit  # noqa: E402
from pretrain import Student, latent_targets  # noqa: E402


def load(path):
    """A pretrain.py checkpoint -> (Student, target encoder, its args), in eval mode."""
    ck = torch.load(path, map_location='cpu', weights_only=True)
    a = ck['args']
    if a['target'] != 'latent':
        raise SystemExit(f'{path}: pixel targets (--target pixels); this measures latent-target pretrainings')
    context, target = build_vit(a['model'], a['patch_size']), build_vit(a['model'], a['patch_size'])
    predictor = build_predictor(a['model'], a.get('pred_dim'), a.get('pred_depth'))
    for m, k in ((context, 'context'), (target, 'target'), (predictor, 'predictor')):
        m.load_state_dict(ck[k])
    return Student(context, predictor).eval(), target.eval(), a


@torch.no_grad()
def ratios(student, target, a, crops, shift, seed=0):
    """crops (B, 3, c, c) -> (error, baseline) sums over the hidden tokens, positions shifted by `shift` patches."""
    p = a['patch_size']
    B, N = len(crops), (crops.shape[-2] // p) * (crops.shape[-1] // p)
    ctx, tgt = random_masking(B, N, 0.75, torch.Generator().manual_seed(seed))  # the same masks for every shift
    offset = torch.full((B, 2), float(shift))
    h = latent_targets(target, crops, a['target_layers'], a['target_norm'], offset)
    h = h.gather(1, tgt[..., None].expand(-1, -1, h.shape[-1]))  # (B, M, D)
    pred = student(crops, ctx, tgt, offset)
    return (pred - h).pow(2).mean(-1).sum(1), (h - h.mean(1, keepdim=True)).pow(2).mean(-1).sum(1)  # (B,), (B,)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help='pretrain.py checkpoint (latent targets)')
    ap.add_argument('--data', required=True, help='dataset folder with a val split of tiles')
    ap.add_argument('--crop', type=int, default=256, help='window side, the pretraining crop (default: %(default)s)')
    ap.add_argument('--shift', type=int, default=None, help='the shift in patches (default: crop / patch size, the '
                                                            'positions just past what crops at 0 cover)')
    ap.add_argument('--max-tiles', type=int, default=200, help='val tiles used at most (default: %(default)s)')
    args = ap.parse_args(argv)
    student, target, a = load(args.ckpt)
    p, c = a['patch_size'], args.crop
    shift = args.crop // p if args.shift is None else args.shift
    ds = DOTADataset(args.data, 'val', CLASSES[a['classes']], None)
    sums = {}  # (window row, window column) -> [error at 0, error shifted, baseline at 0, baseline shifted]
    for i in range(min(len(ds), args.max_tiles)):
        images, targets = collate([ds[i]], p)
        x = to_input(images, targets, 'cpu')
        H, W = targets[0]['size']
        for r in range(H // c):
            for q in range(W // c):
                crop = x[..., r * c:(r + 1) * c, q * c:(q + 1) * c]
                e0, b0 = ratios(student, target, a, crop, 0, seed=i)
                e1, b1 = ratios(student, target, a, crop, shift, seed=i)
                s = sums.setdefault((r, q), torch.zeros(4, dtype=torch.float64))
                s += torch.stack([e0.sum(), e1.sum(), b0.sum(), b1.sum()]).double()
    if not sums:
        raise SystemExit(f'no val tile of {args.data} holds a whole {c} x {c} window')
    print(f'{args.ckpt}: loss / mean_baseline of {c}² crops of the val tiles, the same pixels and masks at grid '
          f'positions from 0 and from {shift}')
    print(f'{"window":<12}{"at 0":>10}{f"at {shift}":>10}')
    total = sum(sums.values())
    for (r, q), s in sorted(sums.items()) + [(('all', ''), total)]:
        name = f'{r},{q}' if q != '' else r
        print(f'{name:<12}{s[0] / s[2]:>10.3f}{s[1] / s[3]:>10.3f}')
    return {'at_0': float(total[0] / total[2]), 'shifted': float(total[1] / total[3])}


if __name__ == '__main__':
    main()
