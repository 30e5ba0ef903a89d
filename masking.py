"""Which patches the context encoder sees and which it must predict.

Both strategies return index tensors with the same counts for every image of a batch (so they batch without
padding):  context (B, N - M) and targets (B, M), M = round(mask_ratio * N), disjoint, each sorted ascending.

- random: MAE's masking. Every patch is equally likely to be hidden.
- object: patches that overlap a ground-truth box are hidden first. Each object patch is left visible with
  probability `object_keep`, because if objects were always hidden the context encoder would never see one (only
  the EMA target would). The hidden set is then filled up to M with random background patches, or the object
  patches are subsampled at random when they alone exceed M. Kept object patches are hidden last, only when an
  image has too few other patches. An image with no boxes is thus masked at random.
Both work by sorting a per-patch priority (MAE's argsort trick): no Python loop over patches.
"""
import torch


def object_patches(boxes, grid_h, grid_w, patch_size):
    """Which patches overlap at least one box (open overlap: touching an edge does not count).

    boxes: list of B tensors (n_b, 4) x1 y1 x2 y2 in pixels -> (B, grid_h * grid_w) bool, row-major patch order.
    """
    B, n = len(boxes), max([len(b) for b in boxes] + [1])
    padded = torch.zeros(B, n, 4)  # zero boxes overlap nothing: x2 > left fails for the patch at x = 0
    for i, b in enumerate(boxes):
        padded[i, :len(b)] = b.float().cpu()
    left = torch.arange(grid_w) * patch_size  # (gw,)
    top = torch.arange(grid_h) * patch_size  # (gh,)
    x1, y1, x2, y2 = padded.unbind(-1)  # (B, n) each
    in_x = (x1[..., None] < left + patch_size) & (x2[..., None] > left)  # (B, n, gw)
    in_y = (y1[..., None] < top + patch_size) & (y2[..., None] > top)  # (B, n, gh)
    hit = (in_y[..., :, None] & in_x[..., None, :]).any(1)  # (B, gh, gw)
    return hit.flatten(1)


def _split_by_priority(priority, mask_ratio):
    """priority (B, N): the M highest are hidden. -> context (B, N - M), targets (B, M), sorted ascending."""
    B, N = priority.shape
    M = int(round(mask_ratio * N))
    if not 0 < M < N:
        raise ValueError(f'mask_ratio {mask_ratio} leaves {N - M} of {N} patches visible; need 0 < hidden < {N}')
    order = priority.argsort(dim=1, descending=True)  # (B, N)
    return order[:, M:].sort(1).values, order[:, :M].sort(1).values


def random_masking(B, N, mask_ratio, generator=None):
    """MAE: hide M = round(mask_ratio * N) uniformly random patches per image."""
    return _split_by_priority(torch.rand(B, N, generator=generator), mask_ratio)


def object_masking(is_object, mask_ratio, object_keep=0.25, generator=None):
    """is_object (B, N) bool from object_patches. Priority tiers (higher is hidden first), random within a tier:
    2 = object patch chosen for hiding (prob 1 - object_keep), 1 = background, 0 = object patch kept visible."""
    u = torch.rand(is_object.shape, generator=generator)  # (B, N) order within a tier
    hide = is_object & (torch.rand(is_object.shape, generator=generator) >= object_keep)
    tier = 1.0 + hide.float() - (is_object & ~hide).float()
    return _split_by_priority(tier + u, mask_ratio)


def make_masks(mode, boxes, grid_h, grid_w, patch_size, mask_ratio, object_keep=0.25, generator=None):
    """One call for pretrain.py: -> context idx (B, N - M), target idx (B, M), on the CPU."""
    if mode == 'random':
        return random_masking(len(boxes), grid_h * grid_w, mask_ratio, generator)
    if mode == 'object':
        return object_masking(object_patches(boxes, grid_h, grid_w, patch_size), mask_ratio, object_keep, generator)
    raise ValueError(f"unknown mask mode {mode!r}; expected 'object' or 'random'")
