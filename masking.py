"""Which patches the context encoder sees and which it must predict.

    python masking.py show --data synthetic --out masks.jpg      # one row of pictures per strategy

Every strategy returns index tensors with the same counts for every image of a batch (so they batch without
padding): context (B, Nc) and targets (B, M), disjoint, each sorted ascending, plus `target_is_object` (B, M).

- random: MAE. M = round(mask_ratio * N) uniformly random patches are hidden; the rest is the context.
- object: patches that overlap a box are hidden first: the ground truth of a labelled image or, for an image
  without labels, a detector's boxes (evaluate.py --write-labels, pretrain.py --unlabelled-boxes). The box is the
  object's axis-aligned extent also when the detector is trained on oriented boxes (--boxes obb): for choosing
  which patches to hide, the few extra background patches around a turned object cost nothing. Each object patch is
  left visible with probability `object_keep`, because if objects were always hidden the context encoder would
  never see one (only the EMA target would). The hidden set is filled up to M with random background patches, or
  the object patches are subsampled when they alone exceed M; kept object patches are hidden last, only when an
  image has too few other patches. An image without boxes is masked at random.
- saliency: no boxes at all (AttMask's idea, with the EMA target's tokens instead of its attention): the patches
  whose target features lie farthest from their image's mean feature (`saliency_patches`, the `share` most distant
  of each image) play the part of object patches: hidden first, each left visible with probability `object_keep`.
  The target encoder embeds the whole image anyway, so the choice costs one reduction over the features.
All work by sorting a per-patch priority plus uniform noise (MAE's argsort trick): no Python loop over patches.
"""
import argparse

import torch

MODES = ('object', 'random', 'saliency')


def object_patches(boxes, grid_h, grid_w, patch_size):
    """Which patches overlap at least one box (open overlap: touching an edge does not count).

    boxes: list of B tensors (n_b, 4) x1 y1 x2 y2 in pixels -> (B, grid_h * grid_w) bool, row-major patch order."""
    B, n = len(boxes), max([len(b) for b in boxes] + [1])
    padded = torch.zeros(B, n, 4)  # zero-size boxes at the origin overlap nothing
    for i, b in enumerate(boxes):
        padded[i, :len(b)] = b.float().cpu()
    left = torch.arange(grid_w) * patch_size  # (gw,)
    top = torch.arange(grid_h) * patch_size  # (gh,)
    x1, y1, x2, y2 = padded.unbind(-1)  # (B, n) each
    real = (x2 > x1)[..., None]  # padding rows are empty boxes
    in_x = (x1[..., None] < left + patch_size) & (x2[..., None] > left) & real  # (B, n, gw)
    in_y = (y1[..., None] < top + patch_size) & (y2[..., None] > top) & real  # (B, n, gh)
    hit = (in_y[..., :, None] & in_x[..., None, :]).any(1)  # (B, gh, gw)
    return hit.flatten(1)


def saliency_patches(features, share):
    """The `share` of each image's patches whose features lie farthest from the image's mean feature.

    features: (B, N, D) the EMA target's tokens of the whole image -> (B, N) bool, round(share * N) True per image.
    A token unlike its image's average is an object or an edge more often than a stretch of field or water."""
    B, N, _ = features.shape
    k = int(round(share * N))
    if not 0 < k <= N:
        raise ValueError(f'saliency share {share} picks {k} of {N} patches; need 0 < share <= 1')
    f = features.float()
    dist = (f - f.mean(1, keepdim=True)).pow(2).mean(-1)  # (B, N) squared distance from the image's mean token
    top = dist.topk(k, dim=1).indices  # (B, k)
    return torch.zeros(B, N, dtype=torch.bool, device=features.device).scatter_(1, top, True).cpu()


def _rand(shape, generator, rows=None):
    """torch.rand(shape); with rows = (lo, hi, total), rows lo:hi of a draw for `total` images. A GPU of a
    multi-GPU run takes its rows of the draw for the whole global batch, so the masks do not depend on the number
    of GPUs."""
    if rows is None:
        return torch.rand(shape, generator=generator)
    lo, hi, total = rows
    return torch.rand((total, *shape[1:]), generator=generator)[lo:hi]


def _split_by_priority(priority, mask_ratio):
    """priority (B, N): the M highest are hidden. -> context (B, N - M), targets (B, M), sorted ascending."""
    B, N = priority.shape
    M = int(round(mask_ratio * N))
    if not 0 < M < N:
        raise ValueError(f'mask_ratio {mask_ratio} leaves {N - M} of {N} patches visible; need 0 < hidden < {N}')
    order = priority.argsort(dim=1, descending=True)  # (B, N)
    return order[:, M:].sort(1).values, order[:, :M].sort(1).values


def random_masking(B, N, mask_ratio, generator=None, rows=None):
    """MAE: hide M = round(mask_ratio * N) uniformly random patches per image."""
    return _split_by_priority(_rand((B, N), generator, rows), mask_ratio)


def _object_priority(is_object, object_keep, generator, rows=None):
    """Tiers (higher is hidden first), random within a tier: 2 = object patch chosen for hiding (probability
    1 - object_keep), 1 = background, 0 = object patch kept visible. -> (B, N) float."""
    u = _rand(is_object.shape, generator, rows)
    hide = is_object & (_rand(is_object.shape, generator, rows) >= object_keep)
    return 1.0 + hide.float() - (is_object & ~hide).float() + u


def object_masking(is_object, mask_ratio, object_keep=0.25, generator=None, rows=None):
    """is_object (B, N) bool from object_patches -> context (B, N - M), targets (B, M)."""
    return _split_by_priority(_object_priority(is_object, object_keep, generator, rows), mask_ratio)


def make_masks(mode, boxes, grid_h, grid_w, patch_size, mask_ratio=0.75, object_keep=0.25, generator=None,
               rows=None, salient=None):
    """One call for pretrain.py -> context idx (B, Nc), target idx (B, M), target_is_object (B, M) bool, CPU.
    rows = (lo, hi, total): these images are rows lo:hi of a global batch of `total` (multi-GPU, see _rand).
    salient: (B, N) bool from saliency_patches, for mode 'saliency'. target_is_object says whether a hidden patch
    overlaps one of `boxes` (for 'saliency' too: with ground truth at hand, how often the saliency finds objects)."""
    B, N = len(boxes), grid_h * grid_w
    is_object = object_patches(boxes, grid_h, grid_w, patch_size)  # (B, N)
    if mode == 'saliency':
        if salient is None:
            raise ValueError("mask mode 'saliency' needs salient (B, N) from saliency_patches")
        ctx, tgt = object_masking(salient, mask_ratio, object_keep, generator, rows)
    elif mode == 'random':
        ctx, tgt = random_masking(B, N, mask_ratio, generator, rows)
    elif mode == 'object':
        ctx, tgt = object_masking(is_object, mask_ratio, object_keep, generator, rows)
    else:
        raise ValueError(f'unknown mask mode {mode!r}; expected one of {", ".join(MODES)}')
    return ctx, tgt, is_object.gather(1, tgt)


def show(args):
    """Draw one row per strategy: hidden patches shaded red, patches in neither set grey, boxes outlined."""
    import numpy as np
    from PIL import Image, ImageDraw

    from data import collate, DOTADataset, orient
    from labels import CLASSES
    from prepare import resolve_data
    torch.manual_seed(args.seed)
    ds = DOTADataset(resolve_data(args.data), 'train', CLASSES[args.classes], args.img_size, train=True)
    images, targets = collate([ds[i] for i in range(min(args.n, len(ds)))], args.patch_size)
    images = orient(images.permute(0, 3, 1, 2), targets).permute(0, 2, 3, 1)  # flipped as the boxes are
    B, H, W, _ = images.shape
    gh, gw, p, s = H // args.patch_size, W // args.patch_size, args.patch_size, args.scale
    rows = []
    for mode in args.mask:
        g = torch.Generator().manual_seed(args.seed)
        ctx, tgt, _ = make_masks(mode, [t['boxes'] for t in targets], gh, gw, p, args.mask_ratio, args.object_keep,
                                 g)
        row = []
        for b in range(B):
            state = torch.zeros(gh * gw)  # 0 neither, 1 context, 2 target
            state[ctx[b]], state[tgt[b]] = 1, 2
            im = images[b].numpy().astype(np.float32)
            st = state.view(gh, gw).repeat_interleave(p, 0).repeat_interleave(p, 1).numpy()[..., None]
            im = np.where(st == 2, 0.45 * im + [140, 0, 0], np.where(st == 0, 0.3 * im + 90, im))
            pic = Image.fromarray(im.clip(0, 255).astype(np.uint8)).resize((W * s, H * s), Image.NEAREST)
            draw = ImageDraw.Draw(pic)
            for box in targets[b]['boxes'].tolist():
                draw.rectangle([v * s for v in box], outline=(255, 255, 0))
            draw.text((3, 3), mode, fill=(255, 255, 255))
            row.append(pic)
        rows.append(row)
    grid = Image.new('RGB', (B * W * s, len(rows) * H * s))
    for r, row in enumerate(rows):
        for b, pic in enumerate(row):
            grid.paste(pic, (b * W * s, r * H * s))
    grid.save(args.out, quality=92)
    print(f'wrote {args.out}: rows {", ".join(args.mask)}; red = targets, plain = context, grey = neither')


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('show', help='draw masks of each strategy over training crops')
    sp.add_argument('--data', default='synthetic', help="dataset folder or name (default: %(default)s)")
    sp.add_argument('--classes', default='dota1.0', help='class list (default: %(default)s)')
    sp.add_argument('--out', default='masks.jpg', help='output picture (default: %(default)s)')
    drawable = [m for m in MODES if m != 'saliency']  # saliency needs an encoder's features
    sp.add_argument('--mask', nargs='+', default=drawable, choices=drawable, help='strategies, one row each '
                                                                                 '(default: all but saliency)')
    sp.add_argument('--n', type=int, default=6, help='images per row (default: %(default)s)')
    sp.add_argument('--img-size', type=int, default=128, help='crop side (default: %(default)s)')
    sp.add_argument('--patch-size', type=int, default=8, help='patch size (default: %(default)s)')
    sp.add_argument('--mask-ratio', type=float, default=0.75, help='hidden share (default: %(default)s)')
    sp.add_argument('--object-keep', type=float, default=0.25, help='object patches left visible '
                                                                    '(default: %(default)s)')
    sp.add_argument('--scale', type=int, default=2, help='enlargement of the pictures (default: %(default)s)')
    sp.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    show(ap.parse_args())
