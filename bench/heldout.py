"""Does a pretraining generalize? The JEPA loss of a pretrain.py checkpoint on training crops of the train and of
the val split, as pretrain.py draws them (crops of --img-size at their tile positions, inside each tile's image
part), with the same masks for every checkpoint.

    python bench/heldout.py --ckpt runs/pretrain/last.pt --data runs/nwpu/data

Prints loss / mean_baseline per split and mask (below 1: better than predicting each crop's mean target). A val ratio
far above train's says the pretraining memorized its images (more images or augmentation would help); equal ratios
say it underfits (capacity, steps or the task itself are the limit). Whole batches only (pretrain.py's loader).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import DOTADataset, crop_offsets, epoch_loader, to_input  # noqa: E402
from labels import CLASSES  # noqa: E402
from masking import make_masks  # noqa: E402
from positions import load  # noqa: E402
from pretrain import jepa_loss  # noqa: E402


@torch.no_grad()
def loss_ratio(student, target, a, ds, mode, batch_size, passes=1):
    """-> (mean loss, mean baseline) over the whole batches of `passes` passes over ds (pass k: the crops of
    pretrain.py's epoch k at seed 0, masks drawn from seed k: the same for every checkpoint)."""
    p = a['patch_size']
    loss = base = n = 0
    for k in range(passes):
        gen = torch.Generator().manual_seed(k)
        for images, targets in epoch_loader(ds, batch_size, p, 0, 0, k):
            x = to_input(images, targets, 'cpu')
            ctx, tgt, _ = make_masks(mode, [t['boxes'] for t in targets], x.shape[-2] // p, x.shape[-1] // p, p,
                                     a['mask_ratio'], a['object_keep'], gen)
            l, stats = jepa_loss(student, target, x, ctx, tgt, 'latent', p, a['target_layers'], a['target_norm'],
                                 crop_offsets(targets, p, 'cpu'))
            loss, base, n = loss + l.item(), base + stats['mean_baseline'].item(), n + 1
    if n == 0:
        raise SystemExit(f'fewer than {batch_size} images in this split: lower --batch-size')
    return loss / n, base / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help='pretrain.py checkpoint (latent targets)')
    ap.add_argument('--data', required=True, help='dataset folder with train/ and val/ (prepare.py split)')
    ap.add_argument('--img-size', type=int, default=None, help="crop side (default: the checkpoint's)")
    ap.add_argument('--batch-size', type=int, default=32, help='crops per forward pass (default: %(default)s)')
    ap.add_argument('--passes', type=int, default=5, help='passes over each split, each with other crops and masks: '
                                                          'val is small (default: %(default)s)')
    ap.add_argument('--masks', default='object,random', help='mask strategies to score (default: %(default)s)')
    args = ap.parse_args(argv)
    student, target, a = load(args.ckpt)
    size = args.img_size or a['img_size']
    rows = {}
    print(f'{args.ckpt}: loss / mean_baseline on {size}² training crops')
    print(f'{"split":<8}{"mask":<8}{"images":>8}{"loss":>9}{"base":>9}{"ratio":>8}')
    for split in ('train', 'val'):
        ds = DOTADataset(args.data, split, CLASSES[a['classes']], size, train=True)
        for mode in args.masks.split(','):
            loss, base = loss_ratio(student, target, a, ds, mode, args.batch_size, args.passes)
            rows[split, mode] = loss / base
            print(f'{split:<8}{mode:<8}{len(ds):>8}{loss:>9.4f}{base:>9.4f}{loss / base:>8.3f}')
    return rows


if __name__ == '__main__':
    main()
