"""The DETR-style detector on a ViT backbone and its post-processing (training: matcher.py).

    ViT tokens (stride = patch size) -> neck (ViTDet-style upsampling) -> a map at `stride` (the patch size by default)
       + spatial_prior: a small CNN's map of the pixels at the same stride, for detail finer than a patch
       + fine: a second map at stride / 2 for the objects smaller than `fine` px
    -> at every cell, class scores and a box (dense), trained one-to-one (matcher.py); the cells are the output.
No NMS inside a tile: one-to-one matching teaches the model not to predict an object twice.
Boxes are axis-aligned (x1, y1, x2, y2), or with obb=True oriented (cx, cy, w, h, theta) as obb.py defines them;
their overlap in the matching cost and the loss (matcher.py) is then ProbIoU, not GIoU.
"""
import math

import torch
import torch.nn as nn

from obb import wrap_angle


class SpatialPrior(nn.Module):
    """Pixels (B, 3, H, W) -> local detail at the map's stride (B, out, H / stride, W / stride): 3x3 stride-2
    convolutions of 16, 32, 64, ... channels (YOLOv8n's stem widths), one more 3x3 at the last level (receptive field
    31 px at stride 8), then a 1x1 to the head width; GroupNorm and GELU after each. Why: a 16 px patch embedding
    hands the neck one token per 2 x 2 cells of the stride-8 map, so neighbouring cells start from the same numbers
    and a 10 px vehicle is a fraction of one token. ViT-Adapter's spatial prior module and ViTDet's P2 level add the
    same kind of convolutional detail; here it is added to the neck's output, trained from scratch in every row."""

    def __init__(self, stride, out):
        super().__init__()
        layers, c = [], 3
        for i in range(int(math.log2(stride))):
            layers += [nn.Conv2d(c, 16 << i, 3, 2, 1), nn.GroupNorm(8, 16 << i), nn.GELU()]
            c = 16 << i
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.GELU(), nn.Conv2d(c, out, 1), nn.GroupNorm(8, out),
                   nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Detector(nn.Module):
    """ViT backbone -> `stride` map (+ a `fine` map at stride / 2) -> class scores and a box at every cell.

    Boxes are decoded from the cell centre c and outputs (dx, dy, dw, dh) as centre
    c + (dx, dy) * stride and size exp(dw, dh) * stride: a cell may claim an object whose centre lies in a
    neighbouring cell (several small objects sharing a cell), and a 6 px car whose box holds no cell centre is still
    a valid target (distances to the four sides would have to go negative).
    obb=True: the cell also predicts (u, v), and theta = atan2(v, 1 + u) / 2 (0 at the start, when both are 0): a
    direction of 2 theta, continuous across the +-pi/2 boundary.
    fine=T > 0: a second level at stride / 2, half the head's width, with its own pixel detail
    (a SpatialPrior at its stride) and its own class and box convolutions; its cells may only be matched to objects
    under T px (longer side), the coarse level's to the rest (matcher.py). Both levels' cells form one output.
    """

    def __init__(self, backbone, num_classes, head_dim=128, stride=None, obb=False, spatial_prior=True, fine=None):
        """Defaults are finetune.py's: stride None = the patch size; fine None = 2 x the stride where a second map
        is allowed (stride >= 8), else 0."""
        super().__init__()
        self.backbone, self.num_classes, self.obb = backbone, num_classes, obb
        p, c, layers = backbone.patch_size, backbone.dim, []
        stride = stride or p
        if fine is None:
            fine = 0 if stride < 8 else 2 * stride
        self.fine = fine
        if stride > p or p % stride or (p // stride) & (p // stride - 1):
            raise ValueError(f'stride {stride} must be the patch size {p} divided by a power of 2')
        while p > stride:  # ViTDet's simple pyramid, one level: transposed conv, norm, GELU per factor 2
            layers += [nn.ConvTranspose2d(c, c, 2, 2), nn.GroupNorm(8, c), nn.GELU()]
            p //= 2
        self.stride = p
        self.neck = nn.Sequential(*layers, nn.Conv2d(c, head_dim, 1), nn.GroupNorm(8, head_dim), nn.GELU(),
                                  nn.Conv2d(head_dim, head_dim, 3, padding=1), nn.GroupNorm(8, head_dim), nn.GELU())
        self.prior = SpatialPrior(self.stride, head_dim) if spatial_prior else None
        self.cls = nn.Conv2d(head_dim, num_classes, 3, padding=1)
        self.box = nn.Conv2d(head_dim, 6 if obb else 4, 3, padding=1)
        if fine:  # ViTDet's simple pyramid, one more step (its P2): half the width, 4x the cells
            if self.stride < 8:
                raise ValueError(f'a second map at stride / 2 (fine) needs stride >= 8, not {self.stride}')
            d = head_dim // 2
            self.fine_up = nn.Sequential(nn.ConvTranspose2d(head_dim, d, 2, 2), nn.GroupNorm(8, d), nn.GELU())
            self.fine_prior = SpatialPrior(self.stride // 2, d) if spatial_prior else None
            self.fine_conv = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GroupNorm(8, d), nn.GELU())
            self.cls_fine = nn.Conv2d(d, num_classes, 3, padding=1)
            self.box_fine = nn.Conv2d(d, 6 if obb else 4, 3, padding=1)
        prior = -math.log(99)  # probability 0.01 at the start: the focal loss starts stable
        for m in [self.cls] + ([self.cls_fine] if fine else []):
            nn.init.constant_(m.bias, prior)
        for m in [self.box] + ([self.box_fine] if fine else []):
            nn.init.zeros_(m.weight)  # the cell's own box at the start
            nn.init.zeros_(m.bias)

    def dense(self, f, cls, box, stride=None):
        """Every cell's class scores and box on the map f (B, Dh, h, w) at `stride` (default: the map's), by the
        convolutions cls and box -> dict: logits (B, M, C), boxes (B, M, 4 | 5), centres (B, M, 2), stride."""
        stride = stride or self.stride
        h, w = f.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing='ij')
        centres = (torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * stride  # (M, 2), M = h * w
        logits, d = cls(f), box(f)  # (B, C, h, w), (B, 4 | 6, h, w)
        logits = logits.flatten(2).transpose(1, 2)  # (B, M, C)
        d = d.flatten(2).transpose(1, 2).float()  # (B, M, 4 | 6)
        cxcy = centres + d[..., :2] * stride
        wh = d[..., 2:4].clamp(-4, 7).exp() * stride
        theta = torch.atan2(d[..., 5], 1 + d[..., 4])[..., None] / 2 if self.obb else None  # (B, M, 1)
        boxes = torch.cat([cxcy, wh, theta], -1) if self.obb else torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
        return {'logits': logits, 'boxes': boxes, 'centres': centres.expand(len(f), -1, -1), 'stride': stride}

    def fine_level(self, f, x, coarse):
        """The stride / 2 level from the coarse map f (B, Dh, h, w) and pixels x, joined to the coarse level's
        output: logits, boxes, centres of both (coarse cells first), 'stride' (M,) and 'claim' (M, 2), each cell's
        [lo, hi) of object sizes (px) for the matcher."""
        f2 = self.fine_up(f)  # (B, Dh / 2, 2h, 2w)
        if self.fine_prior is not None:
            f2 = f2 + self.fine_prior(x)
        f2 = self.fine_conv(f2)
        fine = self.dense(f2, self.cls_fine, self.box_fine, stride=self.stride // 2)
        M, M2 = coarse['logits'].shape[1], fine['logits'].shape[1]
        out = {k: torch.cat([coarse[k], fine[k]], 1) for k in ('logits', 'boxes', 'centres')}
        counts = torch.tensor([M, M2], device=x.device)  # coarse cells first, then fine ones
        out['stride'] = torch.tensor([self.stride, self.stride // 2], device=x.device).repeat_interleave(counts)
        lo_hi = torch.tensor([[self.fine, float('inf')], [0.0, self.fine]], device=x.device)  # (2, 2) per level
        out['claim'] = lo_hi.repeat_interleave(counts, 0)  # (M + M2, 2)
        return out

    def forward(self, x, offset=None):
        """x (B, 3, H, W) normalized; offset (B, 2) or None: where each crop starts in its tile, in patches (the
        ViT's positions; data.py's 'origin') -> dict: logits (B, K, C), boxes (B, K, 4) xyxy px (obb: (B, K, 5) cx,
        cy, w, h, theta; theta unwrapped, postprocess wraps it), centres (B, K, 2) (the cell each prediction started
        from), stride; K = M, every cell. With fine: the cells of both levels, 'stride' (M,) and 'claim' (M, 2)
        (fine_level)."""
        B, _, H, W = x.shape
        p = self.backbone.patch_size
        f = self.backbone(x, offset=offset)  # (B, N, D)
        f = f.transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, h, w)
        f = self.neck(f)  # (B, Dh, h, w), h = H / stride
        if self.prior is not None:
            f = f + self.prior(x)  # (B, Dh, h, w): each cell's own local detail
        dense = self.dense(f, self.cls, self.box)
        return self.fine_level(f, x, dense) if self.fine else dense


def outside_cell(out, margin):
    """(B, K) bool: the prediction's box centre lies more than 0.5 + margin cells (in x or y) from the centre of
    the cell it came from, i.e. it claims an object centred in another cell (axis-aligned boxes (B, K, 4) or
    oriented (B, K, 5))."""
    b = out['boxes'].detach()
    c = b[..., :2] if b.shape[-1] == 5 else (b[..., :2] + b[..., 2:4]) / 2
    s = torch.as_tensor(out['stride'], dtype=c.dtype, device=c.device).reshape(-1)[:, None]  # (K | 1, 1)
    return ((c - out['centres']).abs() / s).amax(-1) > 0.5 + margin


@torch.no_grad()
def postprocess(out, max_det=1000, conf=0.001, sizes=None, centre_gate=None):
    """Top-`max_det` (cell, class) pairs per image with score > conf, no NMS (the one-to-one matching teaches
    the model not to duplicate). sizes: optional list of (H, W) to clip axis-aligned boxes to. centre_gate = m: a
    cell whose box centre lies more than 0.5 + m cells from its own is dropped (outside_cell; a rule on each cell
    alone, no comparison between detections). -> list of B dicts: boxes (K, 4), scores (K,), labels (K,) on the CPU."""
    logits, boxes = out['logits'], out['boxes']
    if centre_gate is not None:
        logits = logits.masked_fill(outside_cell(out, centre_gate)[..., None], -float('inf'))
    B, M, C = logits.shape
    scores, idx = logits.float().sigmoid().flatten(1).topk(min(max_det, M * C), dim=1)  # (B, K)
    results = []
    for b in range(B):
        keep = scores[b] > conf
        s, i = scores[b][keep], idx[b][keep]
        bx = boxes[b, i // C].float()
        if bx.shape[-1] == 5:  # oriented: the angle into [-pi/2, pi/2), the box not clipped
            bx = torch.cat([bx[:, :4], wrap_angle(bx[:, 4:])], 1)
        elif sizes is not None:
            h, w = sizes[b]
            bx = torch.minimum(bx.clamp(min=0), torch.tensor([w, h, w, h], dtype=bx.dtype, device=bx.device))
        results.append({'boxes': bx.cpu(), 'scores': s.cpu(), 'labels': (i % C).cpu()})
    return results
