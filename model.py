"""Models: a plain ViT (context and target encoders), the JEPA predictor, EMA, and a DETR-style dense detector.

ViT state-dict keys follow the timm/MAE layout (patch_embed.proj, blocks.N.attn.qkv, ..., norm), so weights can be
compared with or moved to those code bases. There is no CLS token and the 2D sin-cos position embedding is built
for whatever grid the input has, so one encoder serves 128 px synthetic images and 1024 px DOTA tiles.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: encoder width, depth, heads; predictor width, depth, heads. tiny..large are the usual ViT sizes.
PRESETS = {
    'test': dict(dim=32, depth=1, heads=2, pred_dim=32, pred_depth=1, pred_heads=2),  # unit tests
    'mini': dict(dim=128, depth=4, heads=4, pred_dim=64, pred_depth=2, pred_heads=2),  # the CPU demo
    'tiny': dict(dim=192, depth=12, heads=3, pred_dim=96, pred_depth=4, pred_heads=3),
    'small': dict(dim=384, depth=12, heads=6, pred_dim=192, pred_depth=6, pred_heads=6),
    'base': dict(dim=768, depth=12, heads=12, pred_dim=384, pred_depth=6, pred_heads=12),
    'large': dict(dim=1024, depth=24, heads=16, pred_dim=384, pred_depth=12, pred_heads=12),
}


def sincos_pos_embed(dim, grid_h, grid_w, device=None):
    """Fixed 2D sin-cos position embedding (grid_h * grid_w, dim), row-major: half the channels encode the row,
    half the column, each as sin/cos of the coordinate at dim/4 frequencies (as in MAE)."""
    assert dim % 4 == 0, f'embedding dim {dim} must be divisible by 4'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64, device=device),
                            torch.arange(grid_w, dtype=torch.float64, device=device), indexing='ij')
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]  # 4 x (N, dim/4)
    return torch.cat(out, 1).float()


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch for a random subset of samples. x (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)  # with bias, as in timm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D), N = (H/p) * (W/p) row-major
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module):
    """Truncated-normal linear layers, zero biases, unit LayerNorms; the patch conv like a linear layer (MAE)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


class ViT(nn.Module):
    def __init__(self, patch_size=16, dim=192, depth=12, heads=3, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly rising stochastic depth
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, p) for p in dpr)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)

    def forward(self, x, keep=None):
        """x (B, 3, H, W); keep: optional (B, K) indices of the tokens to encode (context encoder: tokens are
        dropped, not zeroed). -> (B, K or N, D)."""
        B, _, H, W = x.shape
        x = self.patch_embed(x) + sincos_pos_embed(self.dim, H // self.patch_size, W // self.patch_size, x.device)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, self.dim))  # drop after adding positions
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def build_vit(name, patch_size, drop_path=0.0):
    if name not in PRESETS:
        raise ValueError(f'unknown model {name!r}; presets: {", ".join(PRESETS)}')
    p = PRESETS[name]
    return ViT(patch_size, p['dim'], p['depth'], p['heads'], drop_path=drop_path)


class Predictor(nn.Module):
    """Narrow ViT: context tokens plus a learned mask token at each target position -> predicted target features
    (or, with out_dim = patch_size**2 * 3, the target patches' pixels: MAE's linear head, for the ablation).

    It sees where each token sits through its own sin-cos position embedding (width pred_dim)."""

    def __init__(self, enc_dim, dim, depth, heads, out_dim=None):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, out_dim or enc_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, tgt_idx, grid_h, grid_w):
        """ctx (B, Nc, enc_dim) context-encoder output; ctx_idx (B, Nc), tgt_idx (B, Nt) token indices.
        -> (B, Nt, out_dim) predictions at the target positions."""
        pos = sincos_pos_embed(self.dim, grid_h, grid_w, ctx.device)  # (N, dim)
        x = self.embed(ctx) + pos[ctx_idx]  # (B, Nc, dim)
        m = self.mask_token + pos[tgt_idx]  # (B, Nt, dim)
        x = torch.cat([x, m], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, ctx.shape[1]:]))


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)


def ema_momentum(step, total_steps, start=0.996, end=1.0):
    """Linear rise from `start` to `end` over training (I-JEPA's schedule)."""
    return start + (end - start) * min(step / max(total_steps, 1), 1.0)


def param_groups(parts, weight_decay):
    """parts: list of (module, lr_scale) -> AdamW groups with 'lr_scale' and 'wd_scale' keys (kept in the
    optimizer's state dict, so a schedule can set lr and weight decay after a resume). Weight decay applies to
    weight matrices and conv kernels only, not to biases, norms or learned tokens."""
    groups = []
    for module, scale in parts:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and n.endswith('weight')]
        other = [p for n, p in named if not (p.ndim >= 2 and n.endswith('weight'))]
        groups += [{'params': decay, 'weight_decay': weight_decay, 'lr_scale': scale, 'wd_scale': 1.0},
                   {'params': other, 'weight_decay': 0.0, 'lr_scale': scale, 'wd_scale': 0.0}]
    return groups


def lr_at(step, total, warmup, peak, floor=0.0):
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ------------------------------------------------------------------------------------------------- detection
def giou(a, b):
    """Generalized IoU of boxes a (..., 4) and b (..., 4), xyxy, broadcasting. -> (giou, iou), each (...)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9), iou


class Detector(nn.Module):
    """ViT backbone -> stride-8 feature map -> at every cell, class logits and one box (dense set prediction).

    A box is decoded from the cell centre c and the outputs (dx, dy, dw, dh) as centre c + (dx, dy) * stride and
    size exp(dw, dh) * stride, so a cell may claim an object whose centre lies in a neighbouring cell (needed when
    several small objects share a cell). The ViT's tokens (stride = patch size) are upsampled to `stride` by
    transposed convolutions (ViTDet's simple pyramid, one level), because objects of 6 px need a stride of 8 or finer.
    """

    def __init__(self, backbone, num_classes, head_dim=128, stride=8):
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        p, c, layers = backbone.patch_size, backbone.dim, []
        if stride > p or p % stride or (p // stride) & (p // stride - 1):
            raise ValueError(f'stride {stride} must be the patch size {p} divided by a power of 2')
        while p > stride:
            layers += [nn.ConvTranspose2d(c, c, 2, 2), nn.GroupNorm(8, c), nn.GELU()]
            p //= 2
        self.stride = p
        self.neck = nn.Sequential(*layers, nn.Conv2d(c, head_dim, 1), nn.GroupNorm(8, head_dim), nn.GELU(),
                                  nn.Conv2d(head_dim, head_dim, 3, padding=1), nn.GroupNorm(8, head_dim), nn.GELU())
        self.cls = nn.Conv2d(head_dim, num_classes, 3, padding=1)
        self.box = nn.Conv2d(head_dim, 4, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log(99))  # prior probability 0.01: focal loss starts stable
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)

    def forward(self, x):
        """x (B, 3, H, W) normalized -> dict: logits (B, M, C), boxes (B, M, 4) xyxy px, centres (M, 2) of the M
        cells (row-major), stride."""
        B, _, H, W = x.shape
        p = self.backbone.patch_size
        f = self.backbone(x).transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, H/p, W/p)
        f = self.neck(f)  # (B, head_dim, h, w), h = H / stride
        h, w = f.shape[-2:]
        logits = self.cls(f).flatten(2).transpose(1, 2)  # (B, M, C)
        d = self.box(f).flatten(2).transpose(1, 2).float()  # (B, M, 4)
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing='ij')
        centres = (torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * self.stride  # (M, 2)
        cxcy = centres + d[..., :2] * self.stride
        wh = d[..., 2:].clamp(-4, 7).exp() * self.stride
        return {'logits': logits, 'boxes': torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1), 'centres': centres,
                'stride': self.stride}


def focal_terms(logits, alpha=0.25, gamma=2.0):
    """Focal-loss cost of calling each logit positive and negative (sigmoid focal loss, RetinaNet)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.softplus(-logits)  # -log p = softplus(-x)
    neg = (1 - alpha) * p ** gamma * F.softplus(logits)  # -log(1 - p) = softplus(x)
    return pos, neg


class MinCostMatcher:
    """One-to-one assignment of the G ground-truth boxes of an image to its M >= G predictions.

    cost[m, g] = w_cls * (pos_m,c - neg_m,c) + w_l1 * |box_m - gt_g|_1 / stride - w_giou * GIoU(box_m, gt_g)
                 + 1e4 * [centre of cell m is outside the centre region of gt g]
    with c the class of gt g and pos/neg the focal costs of calling logit (m, c) positive/negative (Deformable
    DETR's class cost). The centre region of a box (cx, cy, w, h) is |x - cx| <= max(w/2, 1.5 stride) and the same
    in y: a spatial prior that makes the assignment stable early in training and gives 6 px objects a few cells.
    The rule (a min-cost greedy, not the Hungarian optimum): in rounds, every unmatched GT proposes its cheapest
    free prediction; a prediction proposed by several GT takes the one with the lowest cost (ties: lower GT index)
    and leaves the game. Each round matches at least one GT, usually almost all; torch ops only, no loop over boxes.
    """

    def __init__(self, w_cls=2.0, w_l1=1.0, w_giou=2.0, radius=1.5, method='greedy'):
        """method: 'greedy' (the rule above) or 'hungarian' (scipy's linear_sum_assignment on the same cost, for
        comparison; scipy is not a run-time requirement)."""
        self.w_cls, self.w_l1, self.w_giou, self.radius, self.method = w_cls, w_l1, w_giou, radius, method
        if method == 'hungarian':
            from scipy.optimize import linear_sum_assignment  # noqa: F401  fail now, not mid-training

    @torch.no_grad()
    def __call__(self, logits, boxes, centres, gt_boxes, gt_labels, stride):
        """logits (M, C), boxes (M, 4), centres (M, 2) cell centres, gt_boxes (G, 4), gt_labels (G,)
        -> (pred idx (G,), gt idx (G,)), both long."""
        pos, neg = focal_terms(logits.float()[:, gt_labels])  # (M, G)
        g, _ = giou(boxes[:, None], gt_boxes[None])  # (M, G)
        l1 = (boxes[:, None] - gt_boxes[None]).abs().sum(-1) / stride  # (M, G)
        gc, gwh = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2, gt_boxes[:, 2:] - gt_boxes[:, :2]  # (G, 2) each
        reach = gwh.div(2).clamp(min=self.radius * stride)  # (G, 2)
        outside = ((centres[:, None] - gc[None]).abs() > reach[None]).any(-1)  # (M, G)
        cost = self.w_cls * (pos - neg) + self.w_l1 * l1 - self.w_giou * g + 1e4 * outside
        if self.method == 'hungarian':
            from scipy.optimize import linear_sum_assignment
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            return torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)
        return assign_min_cost(cost)


def assign_min_cost(cost):
    """cost (M, G) -> (rows (K,), cols (K,)) one-to-one, K = min(M, G), by the rounds rule of MinCostMatcher."""
    M, G = cost.shape
    cost = cost.clone()
    match = torch.full((G,), -1, dtype=torch.long, device=cost.device)  # GT g -> prediction
    ar = torch.arange(G, device=cost.device)
    for _ in range(min(M, G)):  # a bound, never reached: each round matches at least one GT
        todo = (match < 0).nonzero().squeeze(1)  # (T,) unmatched GT
        if len(todo) == 0 or len(todo) <= G - M:
            break
        c = cost[:, todo]  # (M, T)
        best = c.argmin(0)  # (T,) each GT's cheapest free prediction
        order = c[best, ar[:len(todo)]].argsort(stable=True)  # proposals, cheapest first (ties: lower GT index)
        pred = best[order]
        first = torch.full((M,), len(todo), device=cost.device).scatter_reduce(
            0, pred, ar[:len(todo)], 'amin')  # (M,) position of each prediction's cheapest proposal
        win = first[pred] == ar[:len(todo)]  # (T,) in `order` order
        match[todo[order[win]]] = pred[win]
        cost[pred[win]] = float('inf')  # taken predictions leave the game
    gt = (match >= 0).nonzero().squeeze(1)
    return match[gt], gt


def detection_loss(out, targets, matcher, w_cls=2.0, w_l1=1.0, w_giou=2.0, alpha=0.25, gamma=2.0, cls_loss='focal'):
    """Set-prediction loss of a Detector output against a list of B target dicts (boxes, labels on any device).

    Every cell is a prediction; the matched cell of each GT is a positive for its class, all other (cell, class)
    pairs are negatives. Sigmoid focal loss over all of them (or, cls_loss='varifocal', VarifocalNet's IoU-aware
    loss: a positive's target is the IoU of its box with its GT, weighted by that IoU; negatives as focal with
    alpha 0.75), plus L1 (in stride units, so a 10 px box still gets gradient) and 1 - GIoU on the matched pairs;
    each term is divided by the number of GT in the batch.
    -> (total loss, dict of detached numbers for logging: the terms, the mean IoU of the matched pairs, and the
    number of (cell, class) scores above 0.3 per GT: about 1 when the one-to-one matching has taught the head not
    to duplicate)."""
    logits, boxes, centres, stride = out['logits'], out['boxes'], out['centres'], out['stride']
    is_pos = torch.zeros_like(logits, dtype=torch.bool)  # (B, M, C)
    quality = torch.zeros_like(logits, dtype=torch.float32)  # (B, M, C) IoU of each positive, for varifocal
    src, tgt = [], []
    for b, t in enumerate(targets):  # one matching per image: boxes per image differ in number
        gt_boxes, gt_labels = t['boxes'].to(boxes.device).float(), t['labels'].to(boxes.device)
        if len(gt_boxes) == 0:
            continue
        pi, gi = matcher(logits[b].detach(), boxes[b].detach(), centres, gt_boxes, gt_labels, stride)
        is_pos[b, pi, gt_labels[gi]] = True
        quality[b, pi, gt_labels[gi]] = giou(boxes[b, pi].detach().float(), gt_boxes[gi])[1].clamp(min=1e-3)
        src.append(boxes[b, pi])
        tgt.append(gt_boxes[gi])
    n = max(sum(len(t['boxes']) for t in targets), 1)
    if cls_loss == 'varifocal':
        x = logits.float()
        pos = quality * F.binary_cross_entropy_with_logits(x, quality, reduction='none')
        neg = 0.75 * x.sigmoid() ** gamma * F.softplus(x)  # -log(1 - p) = softplus(x)
    else:
        pos, neg = focal_terms(logits.float(), alpha, gamma)  # (B, M, C) each
    loss_cls = torch.where(is_pos, pos, neg).sum() / n
    iou = torch.zeros(())
    if src:
        src, tgt = torch.cat(src), torch.cat(tgt)
        loss_l1 = (src - tgt).abs().sum() / stride / n
        g, iou = giou(src, tgt)
        loss_giou = (1 - g).sum() / n
    else:
        loss_l1 = loss_giou = boxes.sum() * 0.0
    total = w_cls * loss_cls + w_l1 * loss_l1 + w_giou * loss_giou
    above = (logits.detach().float() > math.log(0.3 / 0.7)).sum().item() / n  # sigmoid > 0.3
    return total, {'cls': loss_cls.item(), 'l1': loss_l1.item(), 'giou': loss_giou.item(),
                   'iou': iou.detach().mean().item() if iou.numel() else 0.0, 'above_0.3_per_gt': above}


@torch.no_grad()
def postprocess(out, max_det=1000, conf=0.001, sizes=None):
    """Top-`max_det` (cell, class) pairs per image with score > conf, no NMS (the one-to-one matching teaches
    the model not to duplicate). sizes: optional list of (H, W) to clip boxes to.
    -> list of B dicts: boxes (K, 4), scores (K,), labels (K,) on the CPU."""
    logits, boxes = out['logits'], out['boxes']
    B, M, C = logits.shape
    scores, idx = logits.float().sigmoid().flatten(1).topk(min(max_det, M * C), dim=1)  # (B, K)
    results = []
    for b in range(B):
        keep = scores[b] > conf
        s, i = scores[b][keep], idx[b][keep]
        bx = boxes[b, i // C].float()
        if sizes is not None:
            h, w = sizes[b]
            bx = torch.minimum(bx.clamp(min=0), torch.tensor([w, h, w, h], dtype=bx.dtype, device=bx.device))
        results.append({'boxes': bx.cpu(), 'scores': s.cpu(), 'labels': (i % C).cpu()})
    return results


def export(ckpt_path, which, out):
    """Write one encoder of a pretrain.py checkpoint as a plain state dict (timm/MAE key layout)."""
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    if which not in ckpt:
        raise SystemExit(f'{ckpt_path} has no {which!r} encoder (keys: {", ".join(ckpt)})')
    torch.save(ckpt[which], out)
    a = ckpt['args']
    print(f'wrote {out}: the {which} encoder, {a["model"]} ViT/{a["patch_size"]}, {len(ckpt[which])} tensors')


if __name__ == '__main__':
    import argparse
    ap = argparse.ArgumentParser(description='Model utilities.')
    sub = ap.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('export', help='write a pretrained encoder as a plain state dict (timm/MAE key names)')
    sp.add_argument('--ckpt', required=True, help='pretrain.py checkpoint (e.g. runs/pretrain/last.pt)')
    sp.add_argument('--which', choices=['context', 'target'], default='context', help='which encoder '
                                                                                      '(default: %(default)s)')
    sp.add_argument('--out', required=True, help='output file, e.g. encoder.pth')
    args = ap.parse_args()
    export(args.ckpt, args.which, args.out)
