"""The DETR-style detector on a ViT backbone, its one-to-one matcher, losses and post-processing.

    ViT tokens (stride = patch size) -> neck (ViTDet-style upsampling) -> a map at `stride` (8 by default)
    -> encoder stage: at every cell, class scores and a box (dense; trained one-to-one on its own)
    -> the top-K cells by score become queries (RT-DETR / DINO two-stage query selection)
    -> `dec_layers` decoder layers (self-attention among queries, cross-attention to the map, FFN), each refining
       the boxes of the layer before and predicting class scores; the last layer is the output.
With dec_layers = 0 the dense encoder stage is the output (the fallback and an ablation). No NMS inside a tile:
one-to-one matching teaches the model not to predict an object twice.
Boxes are axis-aligned (x1, y1, x2, y2), or with obb=True oriented (cx, cy, w, h, theta) as obb.py defines them;
their overlap in the matching cost and the loss is then ProbIoU (the Gaussians' Bhattacharyya overlap), not GIoU.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from obb import wrap_angle


def giou(a, b):
    """Generalized IoU of boxes a (..., 4) and b (..., 4), xyxy, broadcasting. -> (giou, iou), each (...).
    Per coordinate, so that pairwise use (a[:, None], b[None]) makes (M, G) tensors, never (M, G, 2) ones."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    area_a = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area_b = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    inter = ((torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) *
             (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0))
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = ((torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)).clamp(min=0) *
            (torch.maximum(ay2, by2) - torch.minimum(ay1, by1)).clamp(min=0))
    return iou - (hull - union) / hull.clamp(min=1e-9), iou


def gaussian(b):
    """Oriented boxes (..., 5) -> the covariance (a, b, c) (each (...), Sigma = [[a, c], [c, b]]) of the uniform
    distribution over each box: R diag(w^2, h^2) R^T / 12. Only (cos 2 theta, sin 2 theta) enter, so theta and
    theta + pi give the same Gaussian (no jump at +-pi/2), and so do (w, h, theta) and (h, w, theta + pi/2)."""
    w2, h2, t = b[..., 2] ** 2 / 12, b[..., 3] ** 2 / 12, 2 * b[..., 4]
    mean, half = (w2 + h2) / 2, (w2 - h2) / 2
    return mean + half * torch.cos(t), mean - half * torch.cos(t), half * torch.sin(t)


def probiou(p, q, eps=1e-7):
    """ProbIoU (Llerena et al. 2021) of oriented boxes p (..., 5) and q (..., 5), broadcasting -> (...) in [0, 1]:
    1 - the Hellinger distance sqrt(1 - exp(-B)) of their Gaussians, with B the Bhattacharyya distance
    B = (mu_p - mu_q)^T S^-1 (mu_p - mu_q) / 8 + ln(det S / sqrt(det S_p det S_q)) / 2, S = (S_p + S_q) / 2.
    Differentiable everywhere, 1 for identical boxes, independent of the scale (a 6 px car learns like a plane);
    a square's angle changes nothing (its Gaussian is round); identical boxes give 1 - sqrt(eps) (the eps keeps
    the gradient finite there). Per coordinate: pairwise use makes (M, G) tensors."""
    (a1, b1, c1), (a2, b2, c2) = gaussian(p.float()), gaussian(q.float())
    a, b, c = (a1 + a2) / 2, (b1 + b2) / 2, (c1 + c2) / 2
    det = (a * b - c ** 2).clamp(min=eps)
    dx, dy = p[..., 0].float() - q[..., 0].float(), p[..., 1].float() - q[..., 1].float()
    maha = (b * dx ** 2 - 2 * c * dx * dy + a * dy ** 2) / det / 8
    spread = 0.5 * torch.log(det / ((a1 * b1 - c1 ** 2).clamp(min=eps) * (a2 * b2 - c2 ** 2).clamp(min=eps)).sqrt())
    bd = (maha + spread).clamp(min=0, max=100)
    return 1 - (1 - torch.exp(-bd) + eps).sqrt()


def overlap(a, b):
    """(overlap used by the cost and loss, IoU-like quality) of boxes a, b broadcasting: (GIoU, IoU) for (..., 4)
    xyxy boxes, (ProbIoU, ProbIoU) for (..., 5) oriented ones."""
    if a.shape[-1] == 5:
        p = probiou(a, b)
        return p, p
    return giou(a, b)


def l1_form(boxes):
    """The coordinates the L1 terms compare: xyxy as they are; oriented boxes as (cx, cy, long side, short side),
    so that (w, h, theta) and (h, w, theta + pi/2), one box, cost the same (the angle is ProbIoU's business)."""
    if boxes.shape[-1] == 5:
        w, h = boxes[..., 2], boxes[..., 3]
        return torch.stack([boxes[..., 0], boxes[..., 1], torch.maximum(w, h), torch.minimum(w, h)], -1)
    return boxes


def half_extent(boxes):
    """(..., 4) xyxy or (..., 5) oriented -> centre (..., 2) and half the axis-aligned extent (..., 2)."""
    if boxes.shape[-1] == 5:
        c, s = torch.cos(boxes[..., 4]).abs(), torch.sin(boxes[..., 4]).abs()
        w, h = boxes[..., 2], boxes[..., 3]
        return boxes[..., :2], torch.stack([w * c + h * s, w * s + h * c], -1) / 2
    return (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2


def sincos(v, dim):
    """Sinusoidal features of coordinates v (..., n) -> (..., n * dim / n), dim / (2n) frequencies per coordinate."""
    k = dim // (2 * v.shape[-1])
    omega = 1.0 / 100 ** (torch.arange(k, device=v.device, dtype=torch.float32) / k)  # (k,) periods 1..100 cells
    a = v.float()[..., None] * omega  # (..., n, k)
    return torch.cat([a.sin(), a.cos()], -1).flatten(-2)


class MultiheadAttention(nn.Module):
    """Attention of queries (B, Nq, D) over keys (B, Nk, D) and values (B, Nk, D) via SDPA."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v):
        B, Nq, D = q.shape
        split = lambda x: x.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731 (B, h, N, d)
        x = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)))  # (B, h, Nq, d)
        return self.proj(x.transpose(1, 2).reshape(B, Nq, D))


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention among the queries, cross-attention to the feature map, FFN. Positions enter the
    queries and keys only (DETR's rule), as sinusoids of the reference boxes and of the cell centres."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn, self.cross_attn = MultiheadAttention(dim, heads), MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, q, q_pos, mem, mem_pos):  # q (B, K, D), q_pos (B, K, D), mem (B, M, D), mem_pos (M, D)
        h = self.norm1(q)
        q = q + self.self_attn(h + q_pos, h + q_pos, h)
        q = q + self.cross_attn(self.norm2(q) + q_pos, mem + mem_pos, mem)
        return q + self.mlp(self.norm3(q))


class Detector(nn.Module):
    """ViT backbone -> `stride` map -> dense encoder stage -> top-K queries -> `dec_layers` decoder layers.

    Boxes of the encoder stage are decoded from the cell centre c and outputs (dx, dy, dw, dh) as centre
    c + (dx, dy) * stride and size exp(dw, dh) * stride: a cell may claim an object whose centre lies in a
    neighbouring cell (several small objects sharing a cell), and a 6 px car whose box holds no cell centre is still
    a valid target (distances to the four sides would have to go negative). Each decoder layer refines its
    reference box b = (cx, cy, w, h) by (cx, cy) += (dx, dy) * (w, h), (w, h) *= exp(dw, dh); the reference passed
    to the next layer is detached (Deformable DETR's iterative refinement).
    obb=True: the cell also predicts (u, v), and theta = atan2(v, 1 + u) / 2 (0 at the start, when both are 0): a
    direction of 2 theta, continuous across the +-pi/2 boundary; each decoder layer adds a predicted turn to the
    angle of its reference box, and its query position also encodes the reference angle.
    """

    def __init__(self, backbone, num_classes, head_dim=128, stride=8, dec_layers=2, num_queries=1000, heads=4,
                 obb=False, o2m=0, max_filter=False):
        super().__init__()
        self.backbone, self.num_classes, self.num_queries, self.obb = backbone, num_classes, num_queries, obb
        self.o2m, self.max_filter = o2m, max_filter
        p, c, layers = backbone.patch_size, backbone.dim, []
        if stride > p or p % stride or (p // stride) & (p // stride - 1):
            raise ValueError(f'stride {stride} must be the patch size {p} divided by a power of 2')
        while p > stride:  # ViTDet's simple pyramid, one level: transposed conv, norm, GELU per factor 2
            layers += [nn.ConvTranspose2d(c, c, 2, 2), nn.GroupNorm(8, c), nn.GELU()]
            p //= 2
        self.stride = p
        self.neck = nn.Sequential(*layers, nn.Conv2d(c, head_dim, 1), nn.GroupNorm(8, head_dim), nn.GELU(),
                                  nn.Conv2d(head_dim, head_dim, 3, padding=1), nn.GroupNorm(8, head_dim), nn.GELU())
        # max_filter: the class scores also see how far each cell's features are below their 3 x 3 neighbourhood's
        # maximum, so that of two neighbours seeing the same object only one need fire (DeFCN's max filtering,
        # one scale): a one-to-one head without NMS otherwise has to tell near-identical cells apart
        self.cls = nn.Conv2d(head_dim * (2 if max_filter else 1), num_classes, 3, padding=1)
        self.box = nn.Conv2d(head_dim, 6 if obb else 4, 3, padding=1)
        if o2m:  # a second dense head on the same map, trained one-to-many and used in training only (YOLOv10)
            self.cls_o2m = nn.Conv2d(head_dim, num_classes, 3, padding=1)
            self.box_o2m = nn.Conv2d(head_dim, 6 if obb else 4, 3, padding=1)
        if dec_layers:  # (only then: DDP requires every parameter to take part in the loss)
            self.query = nn.Sequential(nn.Linear(head_dim, head_dim), nn.LayerNorm(head_dim))  # cell feature -> query
            self.size_pos = nn.Linear(head_dim // 2, head_dim // 2)  # sinusoids of log (w, h) -> half a query position
        self.layers = nn.ModuleList(DecoderLayer(head_dim, heads) for _ in range(dec_layers))
        self.dec_cls = nn.ModuleList(nn.Linear(head_dim, num_classes) for _ in range(dec_layers))
        self.dec_box = nn.ModuleList(nn.Sequential(nn.Linear(head_dim, head_dim), nn.GELU(),
                                                   nn.Linear(head_dim, 5 if obb else 4)) for _ in range(dec_layers))
        if obb and dec_layers:  # (cos 2 theta, sin 2 theta) of the reference -> added to the size half of q_pos
            self.angle_pos = nn.Linear(2, head_dim // 2)
        prior = -math.log(99)  # probability 0.01 at the start: the focal loss starts stable
        for m in [self.cls, *self.dec_cls] + ([self.cls_o2m] if o2m else []):
            nn.init.constant_(m.bias, prior)
        for m in [self.box, *(b[-1] for b in self.dec_box)] + ([self.box_o2m] if o2m else []):  # the cell / ref box
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def dense(self, f, cls, box, centres, g=None):
        """One dense stage on the map f (B, Dh, h, w) with its class and box convolutions (cls reads g if given)
        -> (output dict: logits (B, M, C), boxes (B, M, 4 | 5), centres, stride; and the decoded (cxcy, wh, theta or
        None), each (B, M, .))"""
        logits = cls(f if g is None else g).flatten(2).transpose(1, 2)  # (B, M, C)
        d = box(f).flatten(2).transpose(1, 2).float()  # (B, M, 4 | 6)
        cxcy = centres + d[..., :2] * self.stride
        wh = d[..., 2:4].clamp(-4, 7).exp() * self.stride
        theta = torch.atan2(d[..., 5], 1 + d[..., 4])[..., None] / 2 if self.obb else None  # (B, M, 1)
        boxes = torch.cat([cxcy, wh, theta], -1) if self.obb else torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
        out = {'logits': logits, 'boxes': boxes, 'centres': centres.expand(len(f), -1, -1), 'stride': self.stride}
        return out, (cxcy, wh, theta)

    def forward(self, x):
        """x (B, 3, H, W) normalized -> dict: logits (B, K, C), boxes (B, K, 4) xyxy px (obb: (B, K, 5) cx, cy, w, h,
        theta; theta unwrapped, postprocess wraps it), centres (B, K, 2) (the cell
        each prediction started from), stride; with decoder layers also 'aux' (the earlier layers' outputs) and
        'dense' (the encoder stage, all M cells). Without, K = M and the encoder stage is the output. In training
        with o2m = k > 0 also 'o2m': the one-to-many head's dense output (all M cells) and its 'topk' k."""
        B, _, H, W = x.shape
        p = self.backbone.patch_size
        f = self.backbone(x).transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, H/p, W/p)
        f = self.neck(f)  # (B, Dh, h, w), h = H / stride
        h, w = f.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing='ij')
        centres = (torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * self.stride  # (M, 2), M = h * w
        g = torch.cat([f, f - F.max_pool2d(f, 3, 1, 1)], 1) if self.max_filter else f  # (B, Dh or 2 Dh, h, w)
        dense, (cxcy, wh, theta) = self.dense(f, self.cls, self.box, centres, g)
        extra = {}
        if self.o2m and self.training:  # the one-to-many head: more positives per GT for the shared neck to learn from
            extra['o2m'] = {**self.dense(f, self.cls_o2m, self.box_o2m, centres)[0], 'topk': self.o2m}
        if not self.layers:
            return {**dense, **extra}
        # query selection: the K cells whose best class score is highest; their features and boxes start the decoder
        mem = f.flatten(2).transpose(1, 2)  # (B, M, Dh)
        K = min(self.num_queries, mem.shape[1])
        idx = dense['logits'].detach().amax(-1).topk(K, dim=1).indices  # (B, K)
        take = lambda t: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731 (B, M, n) -> (B, K, n)
        q = self.query(take(mem))  # (B, K, Dh)
        ref = torch.cat([take(cxcy), take(wh)] + ([take(theta)] if self.obb else []), -1).detach()  # (B, K, 4|5)
        start = take(dense['centres'])  # (B, K, 2) the cells the queries come from: the matcher's centre prior
        grid = torch.stack([xs, ys], -1).reshape(-1, 2)  # (M, 2) cell coordinates, the units of q_pos below
        mem_pos = torch.cat([sincos(grid, mem.shape[-1] // 2), torch.zeros_like(mem[0, :, mem.shape[-1] // 2:])], -1)
        outs = []
        for layer, cls_head, box_head in zip(self.layers, self.dec_cls, self.dec_box):
            size_pos = self.size_pos(sincos(torch.log(ref[..., 2:4] / self.stride), q.shape[-1] // 2))
            if self.obb:
                size_pos = size_pos + self.angle_pos(torch.cat([torch.cos(2 * ref[..., 4:]),
                                                                torch.sin(2 * ref[..., 4:])], -1))
            q_pos = torch.cat([sincos(ref[..., :2] / self.stride - 0.5, q.shape[-1] // 2), size_pos], -1)  # grid units
            q = layer(q, q_pos.to(q.dtype), mem, mem_pos)
            dd = box_head(q).float()  # (B, K, 4 | 5)
            c2 = ref[..., :2] + dd[..., :2] * ref[..., 2:4]
            s2 = ref[..., 2:4] * dd[..., 2:4].clamp(-4, 4).exp()
            box = torch.cat([c2, s2, ref[..., 4:] + dd[..., 4:]], -1) if self.obb else \
                torch.cat([c2 - s2 / 2, c2 + s2 / 2], -1)
            outs.append({'logits': cls_head(q), 'boxes': box, 'centres': start, 'stride': self.stride})
            ref = (box if self.obb else torch.cat([c2, s2], -1)).detach()
        return {**outs[-1], 'aux': outs[:-1], 'dense': dense, **extra}


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
    Oriented boxes: ProbIoU in place of GIoU, L1 on (cx, cy, long side, short side) (l1_form), and the centre
    region from the box's axis-aligned extent.
    """

    def __init__(self, w_cls=2.0, w_l1=1.0, w_giou=2.0, radius=1.5, method='greedy'):
        """method: 'greedy' (the rule above) or 'hungarian' (scipy's linear_sum_assignment on the same cost, for
        comparison; scipy is not a run-time requirement)."""
        self.w_cls, self.w_l1, self.w_giou, self.radius, self.method = w_cls, w_l1, w_giou, radius, method
        if method == 'hungarian':
            from scipy.optimize import linear_sum_assignment  # noqa: F401  fail now, not mid-training

    @torch.no_grad()
    def __call__(self, logits, boxes, centres, gt_boxes, gt_labels, stride, k=1):
        """logits (M, C), boxes (M, 4), centres (M, 2) cell centres, gt_boxes (G, 4), gt_labels (G,)
        -> (pred idx (G,), gt idx (G,)), both long. k > 1: one-to-many (assign_top_k), (N,) each, N <= k G."""
        cost = self.cost(logits, boxes, centres, gt_boxes, gt_labels, stride)
        if k > 1:
            return assign_top_k(cost, k)
        if self.method == 'hungarian':
            from scipy.optimize import linear_sum_assignment
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            return torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)
        return assign_min_cost(cost)

    @torch.no_grad()
    def cost(self, logits, boxes, centres, gt_boxes, gt_labels, stride):
        """The cost matrix (M, G) of the docstring above."""
        # Each term is built at (M, G) directly, never (M, G, 2 or 4): this matrix is the matcher's main cost.
        pos, neg = focal_terms(logits.float())  # (M, C) each, gathered per GT below (C << G in dense tiles)
        cost = self.w_cls * (pos - neg)[:, gt_labels]  # (M, G)
        cost += self.w_l1 / stride * torch.cdist(l1_form(boxes.float()), l1_form(gt_boxes.float()), p=1)  # (M, G)
        cost -= self.w_giou * overlap(boxes[:, None], gt_boxes[None])[0]
        gc, half = half_extent(gt_boxes)  # (G, 2) each
        reach = half.clamp(min=self.radius * stride)  # (G, 2)
        outside = ((centres[:, None, 0] - gc[:, 0]).abs() > reach[:, 0]) | \
                  ((centres[:, None, 1] - gc[:, 1]).abs() > reach[:, 1])  # (M, G)
        return cost + 1e4 * outside


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


def assign_top_k(cost, k):
    """cost (M, G) -> (rows (N,), cols (N,)): each GT takes its k cheapest predictions inside its centre region
    (cost < 1e4); a prediction several GT take goes to the cheapest of them (ties: the lower GT index). The
    one-to-many assignment of the training-only head (YOLOv10's dual assignments, TOOD's top-k)."""
    M, G = cost.shape
    vals, rows = cost.topk(min(k, M), dim=0, largest=False)  # (k, G) each GT's k cheapest
    cols = torch.arange(G, device=cost.device).expand_as(rows)
    ok = vals < 1e4
    vals, rows, cols = vals[ok], rows[ok], cols[ok]  # (N,) candidate pairs, ordered by rank then GT
    order = torch.argsort(vals, stable=True)  # cheapest first; equal costs keep the lower GT index first
    rows, cols = rows[order], cols[order]
    first = torch.full((M,), len(rows), device=cost.device).scatter_reduce(
        0, rows, torch.arange(len(rows), device=cost.device), 'amin')  # (M,) each prediction's cheapest pair
    win = first[rows] == torch.arange(len(rows), device=cost.device)
    return rows[win], cols[win]


def detection_loss(out, targets, matcher, w_cls=2.0, w_l1=1.0, w_giou=2.0, alpha=0.25, gamma=2.0, cls_loss='focal',
                   matches=None, num_gt=None):
    """Set-prediction loss of one stage's output (logits (B, K, C), boxes (B, K, 4), centres (B, K, 2)) against a
    list of B target dicts (boxes, labels on any device). Oriented boxes (..., 5) use ProbIoU where the text below
    says GIoU or IoU, and l1_form's coordinates for L1.

    Each GT is matched to one prediction (to up to k for an output with 'topk' k; or `matches` are reused: a list
    of B (pred idx, gt idx) pairs); the matched prediction is a positive for its class, all other (prediction,
    class) pairs are negatives. Sigmoid focal loss over all of them (or, cls_loss='varifocal', VarifocalNet's
    IoU-aware loss: a positive's target is the IoU of its box with its GT, weighted by that IoU; negatives as focal
    with alpha 0.75), plus L1 (in stride units, so a 10 px box still gets gradient) and 1 - GIoU on the matched
    pairs; each term is divided by the number of GT in the batch (or by num_gt: under DDP, the mean over ranks;
    one-to-many: by the number of matched pairs). -> (total loss, dict of detached numbers for logging: the terms,
    the mean IoU of the matched pairs, and the number of (prediction, class) scores above 0.3 per GT: about 1 when
    the one-to-one matching has taught the head not to duplicate), matches)."""
    logits, boxes, centres, stride = out['logits'], out['boxes'], out['centres'], out['stride']
    is_pos = torch.zeros_like(logits, dtype=torch.bool)  # (B, K, C)
    quality = torch.zeros_like(logits, dtype=torch.float32)  # (B, K, C) IoU of each positive, for varifocal
    src, tgt, found = [], [], []
    for b, t in enumerate(targets):  # one matching per image: images hold different numbers of boxes
        gt_boxes, gt_labels = t['boxes'].to(boxes.device).float(), t['labels'].to(boxes.device)
        if matches is not None:
            pi, gi = matches[b]
        elif len(gt_boxes):
            pi, gi = matcher(logits[b].detach(), boxes[b].detach(), centres[b], gt_boxes, gt_labels, stride,
                             out.get('topk', 1))
        else:
            pi = gi = torch.zeros(0, dtype=torch.long, device=boxes.device)
        found.append((pi, gi))
        is_pos[b, pi, gt_labels[gi]] = True
        quality[b, pi, gt_labels[gi]] = overlap(boxes[b, pi].detach().float(), gt_boxes[gi])[1].clamp(min=1e-3)
        src.append(boxes[b, pi])
        tgt.append(gt_boxes[gi])
    n = max(sum(len(t['boxes']) for t in targets), 1) if num_gt is None else num_gt.clamp(min=1)  # a tensor
    if out.get('topk', 1) > 1:  # one-to-many: the mean over positives (FCOS, TOOD), not k times a one-to-one loss
        n = max(sum(len(pi) for pi, _ in found), 1)
    if cls_loss == 'varifocal':
        x = logits.float()
        pos = quality * F.binary_cross_entropy_with_logits(x, quality, reduction='none')
        neg = 0.75 * x.sigmoid() ** gamma * F.softplus(x)  # -log(1 - p) = softplus(x)
    else:
        pos, neg = focal_terms(logits.float(), alpha, gamma)  # (B, K, C) each
    loss_cls = torch.where(is_pos, pos, neg).sum() / n
    src, tgt = torch.cat(src).float(), torch.cat(tgt)
    loss_l1 = (l1_form(src) - l1_form(tgt)).abs().sum() / stride / n  # 0 (with a gradient path) when there is no GT
    g, iou = overlap(src, tgt)
    oriented = src.shape[-1] == 5  # then g is ProbIoU and the term is logged as such
    loss_giou = (1 - g).sum() / n
    total = w_cls * loss_cls + w_l1 * loss_l1 + w_giou * loss_giou
    parts = {'cls': loss_cls.detach(), 'l1': loss_l1.detach(), 'probiou' if oriented else 'giou': loss_giou.detach(),
             'iou': iou.detach().mean() if iou.numel() else torch.zeros(()),
             'above_0.3_per_gt': (logits.detach().float() > math.log(0.3 / 0.7)).sum() / n}  # sigmoid > 0.3
    return total, parts, found


def detector_loss(out, targets, matcher, **kw):
    """The loss of every stage of a Detector output: the last decoder layer (matched once), the earlier layers
    (auxiliary losses, reusing those matches: the queries are the same K cells in every layer) and the dense
    encoder stage (matched on its own, over all cells; it teaches the query selection which cells hold objects) and
    the one-to-many head when there is one (each GT matched to its top-k cells).
    -> (total, dict of floats for logging: the last layer's terms and diagnostics, and the encoder stage's loss)."""
    total, parts, matches = detection_loss(out, targets, matcher, **kw)
    for aux in out.get('aux', []):
        total = total + detection_loss(aux, targets, matcher, matches=matches, **kw)[0]
    if 'dense' in out:
        dense = detection_loss(out['dense'], targets, matcher, **kw)[0]
        total, parts['enc'] = total + dense, dense.detach()
    if 'o2m' in out:  # the training-only one-to-many head, each GT matched to its top-k cells
        many = detection_loss(out['o2m'], targets, matcher, **kw)[0]
        total, parts['o2m'] = total + many, many.detach()
    values = torch.stack(list(parts.values())).tolist()  # one host sync for all the numbers
    return total, dict(zip(parts, values))


@torch.no_grad()
def postprocess(out, max_det=1000, conf=0.001, sizes=None):
    """Top-`max_det` (cell, class) pairs per image with score > conf, no NMS (the one-to-one matching teaches
    the model not to duplicate). sizes: optional list of (H, W) to clip axis-aligned boxes to.
    -> list of B dicts: boxes (K, 4), scores (K,), labels (K,) on the CPU."""
    logits, boxes = out['logits'], out['boxes']
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


