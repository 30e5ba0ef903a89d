"""How the detector is trained: box overlaps (GIoU; ProbIoU for oriented boxes), the one-to-one matcher between
predicted cells and ground-truth objects, and the losses.

The matcher is a DETR-style set matching restricted by a centre prior (a cell may only claim objects near it); the
model itself (detector.py) neither knows nor imports any of this.
"""
import math

import torch
import torch.nn.functional as F

from detector import outside_cell


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


def focal_terms(logits, alpha=0.25, gamma=2.0):
    """Focal-loss cost of calling each logit positive and negative (sigmoid focal loss, RetinaNet)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.softplus(-logits)  # -log p = softplus(-x)
    neg = (1 - alpha) * p ** gamma * F.softplus(logits)  # -log(1 - p) = softplus(x)
    return pos, neg


class MinCostMatcher:
    """One-to-one assignment of the G ground-truth boxes of an image to its M >= G predictions.

    cost[m, g] = w_cls * (pos_m,c - neg_m,c) + w_l1 * |box_m - gt_g|_1 / stride_m - w_giou * GIoU(box_m, gt_g)
                 + w_ctr * |centre of cell m - centre of gt g|_1 / stride_m
                 + 1e4 * [centre of cell m is outside the centre region of gt g, or (two-level maps) the size of
                          gt g is outside claim_m]
    with c the class of gt g and pos/neg the focal costs of calling logit (m, c) positive/negative (Deformable
    DETR's class cost). w_ctr > 0 (finetune.py: 1.0) breaks the tie between neighbouring cells that predict the
    same box at nearly the same score in favour of the cell nearest the object's centre: without it, which of the
    two is matched depends on their scores alone, a choice the head cannot learn, and at test time both fire
    (RESULTS.md: the duplicates). The centre region of a box (cx, cy, w, h) is |x - cx| <= max(w/2, 1.5 stride) and
    the same in y: a spatial prior that makes the assignment stable early in training and gives 6 px objects a few
    cells. The rule (a min-cost greedy, not the Hungarian optimum): in rounds, every unmatched GT proposes its cheapest
    free prediction; a prediction proposed by several GT takes the one with the lowest cost (ties: lower GT index)
    and leaves the game. Each round matches at least one GT, usually almost all; torch ops only, no loop over boxes.
    Oriented boxes: ProbIoU in place of GIoU, L1 on (cx, cy, long side, short side) (l1_form), and the centre
    region from the box's axis-aligned extent.
    Two-level maps (Detector(fine=T)): stride_m is the stride of cell m's level, and claim_m = [lo, hi) the sizes
    (longer side of the axis-aligned extent, px) its level may take: the fine level the objects under T px, the
    coarse one the rest. A rule by size, visible in the pixels, so which level fires is learnable (FPN's level
    assignment); without it the two levels' cells near one object would be chosen between by their scores.
    """

    def __init__(self, w_cls=2.0, w_l1=1.0, w_giou=2.0, radius=1.5, w_ctr=1.0):
        self.w_cls, self.w_l1, self.w_giou, self.radius, self.w_ctr = w_cls, w_l1, w_giou, radius, w_ctr

    @torch.no_grad()
    def __call__(self, logits, boxes, centres, gt_boxes, gt_labels, stride, claim=None):
        """logits (M, C), boxes (M, 4), centres (M, 2) cell centres, gt_boxes (G, 4), gt_labels (G,), stride a
        number or (M,), claim None or (M, 2) -> (pred idx (G,), gt idx (G,)), both long."""
        # Only a cell inside some GT's centre region (and of its level) can be matched below the 1e4 penalty, so the
        # cost is built for those cells alone (a few thousand of the 20,480 of a two-level 512^2 map). When every GT
        # gets such a cell the rounds run exactly as on the full matrix (every proposal is an in-region cell); else
        # the full matrix decides, as the rule says.
        s = torch.as_tensor(stride, dtype=torch.float32, device=boxes.device).reshape(-1)  # (M,) or (1,)
        idx = self.allowed(centres, gt_boxes, s[:, None], claim)[0].any(1).nonzero().squeeze(1)  # (M',)
        take = (lambda t: t if t is None or len(t) == 1 else t[idx])  # noqa: E731
        cost = self.cost(logits[idx], boxes[idx], centres[idx], gt_boxes, gt_labels, take(s), take(claim))
        rows, cols = assign_min_cost(cost)
        if len(cols) == len(gt_boxes) and (cost[rows, cols] < 1e4 / 2).all():
            return idx[rows], cols
        return assign_min_cost(self.cost(logits, boxes, centres, gt_boxes, gt_labels, stride, claim))

    def allowed(self, centres, gt_boxes, s, claim=None):
        """centres (M, 2), gt_boxes (G, 4 | 5), s (M or 1, 1) strides, claim None or (M, 2) -> ((M, G) bool: cell m
        may take GT g (its centre inside g's centre region; of g's size, with a claim), dx, dy (M, G) each: the
        distances in x and y from each cell centre to each GT centre)."""
        gc, half = half_extent(gt_boxes)  # (G, 2) each
        reach = torch.maximum(half, self.radius * s[..., None])  # (M or 1, G, 2)
        dx, dy = (centres[:, None, 0] - gc[:, 0]).abs(), (centres[:, None, 1] - gc[:, 1]).abs()  # (M, G) each
        ok = (dx <= reach[..., 0]) & (dy <= reach[..., 1])
        if claim is not None:
            size = 2 * half.amax(-1)  # (G,)
            ok &= (size >= claim[:, :1]) & (size < claim[:, 1:])
        return ok, dx, dy

    @torch.no_grad()
    def cost(self, logits, boxes, centres, gt_boxes, gt_labels, stride, claim=None):
        """The cost matrix (M, G) of the docstring above."""
        # Each term is built at (M, G) directly, never (M, G, 2 or 4): this matrix is the matcher's main cost.
        s = torch.as_tensor(stride, dtype=torch.float32, device=boxes.device).reshape(-1, 1)  # (M or 1, 1)
        pos, neg = focal_terms(logits.float())  # (M, C) each, gathered per GT below (C << G in dense tiles)
        cost = self.w_cls * (pos - neg)[:, gt_labels]  # (M, G)
        cost += self.w_l1 / s * torch.cdist(l1_form(boxes.float()), l1_form(gt_boxes.float()), p=1)  # (M, G)
        cost -= self.w_giou * overlap(boxes[:, None], gt_boxes[None])[0]
        ok, dx, dy = self.allowed(centres, gt_boxes, s, claim)
        if self.w_ctr:
            cost += self.w_ctr / s * (dx + dy)
        return cost + 1e4 * ~ok


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


def detection_loss(out, targets, matcher, w_cls=2.0, w_l1=1.0, w_giou=2.0, gamma=2.0, num_gt=None,
                   w_ring=0.0, gate=None):
    """Set-prediction loss of a Detector's output (logits (B, K, C), boxes (B, K, 4), centres (B, K, 2)) against a
    list of B target dicts (boxes, labels on any device). Oriented boxes (..., 5) use ProbIoU where the text below
    says GIoU or IoU, and l1_form's coordinates for L1.

    Each GT is matched to one prediction (matcher); the matched prediction is a positive for its class, all other
    (prediction, class) pairs are negatives. VarifocalNet's IoU-aware loss over all of them (a positive's target is
    the IoU of its box with its GT, weighted by that IoU; negatives as the focal loss with alpha 0.75), plus L1 (in
    stride units, so a 10 px box still gets gradient) and 1 - GIoU on the matched pairs; each term is divided by the
    number of GT in the batch (or by num_gt: under DDP, the mean over ranks). -> (total loss, dict of detached
    numbers for logging: the terms, the mean IoU of the matched pairs, and the number of (prediction, class) scores
    above 0.3 per GT: about 1 when the one-to-one matching has taught the head not to duplicate), the matches: B
    (pred idx, gt idx) pairs).
    w_ring > 0: every other cell of a matched object's centre region (matcher.allowed, on the matched cell's level;
    of a two-level map, the coarser level's objects only) also regresses that object's box (the nearest object's,
    where regions overlap), w_ring x the box loss averaged per object, so that these cells point at the centre
    outside them. gate = m: a cell whose box centre lies more than 0.5 + m cells from its own
    (detector.outside_cell) is not a negative."""
    logits, boxes, centres = out['logits'], out['boxes'], out['centres']
    # (K,) each prediction's stride (a two-level map has two), so that L1 is in the units of its own cells
    stride = torch.as_tensor(out['stride'], dtype=torch.float32, device=boxes.device).expand(logits.shape[1])
    is_pos = torch.zeros_like(logits, dtype=torch.bool)  # (B, K, C)
    quality = torch.zeros_like(logits, dtype=torch.float32)  # (B, K, C) IoU of each positive, for varifocal
    src, tgt, per, found, ring_src, ring_tgt, ring_per, ring_w = [], [], [], [], [], [], [], []
    for b, t in enumerate(targets):  # one matching per image: images hold different numbers of boxes
        gt_boxes, gt_labels = t['boxes'].to(boxes.device).float(), t['labels'].to(boxes.device)
        if len(gt_boxes):
            pi, gi = matcher(logits[b].detach(), boxes[b].detach(), centres[b], gt_boxes, gt_labels, stride,
                             out.get('claim'))
        else:
            pi = gi = torch.zeros(0, dtype=torch.long, device=boxes.device)
        found.append((pi, gi))
        is_pos[b, pi, gt_labels[gi]] = True
        if w_ring and len(pi):
            # each matched object's region: the cells the matcher may give it (its centre region), on its cell's level;
            # on a two-level map the coarse level's objects only: the finer level's lost to it (synthetic, RESULTS.md)
            ok, dx, dy = matcher.allowed(centres[b], gt_boxes[gi], stride[:, None])  # (K, P) each
            region = (ok & (stride[:, None] == stride[pi]) & (stride[pi] == stride.max())).T  # (P, K)
            region[:, pi] = False  # a matched cell regresses its own GT
            k_idx = region.any(0).nonzero().squeeze(1)  # (R,) the region cells
            d = ((dx + dy) / stride[:, None]).T.masked_fill(~region, float('inf'))  # (P, K) in cells
            p_idx = d[:, k_idx].argmin(0)  # (R,) the object whose centre is nearest
            ring_src.append(boxes[b, k_idx])
            ring_tgt.append(gt_boxes[gi[p_idx]])
            ring_per.append(stride[k_idx])
            ring_w.append(1 / torch.bincount(p_idx, minlength=len(pi)).float()[p_idx])  # (R,) 1 per object
        quality[b, pi, gt_labels[gi]] = overlap(boxes[b, pi].detach().float(), gt_boxes[gi])[1].clamp(min=1e-3)
        src.append(boxes[b, pi])
        tgt.append(gt_boxes[gi])
        per.append(stride[pi])
    n = max(sum(len(t['boxes']) for t in targets), 1) if num_gt is None else num_gt.clamp(min=1)  # a tensor
    x = logits.float()
    pos = quality * F.binary_cross_entropy_with_logits(x, quality, reduction='none')  # (B, K, C)
    neg = 0.75 * x.sigmoid() ** gamma * F.softplus(x)  # -log(1 - p) = softplus(x)
    if gate is not None:  # cells that postprocess drops are not taught to be silent
        neg = neg * ~outside_cell(out, gate)[..., None]
    loss_cls = torch.where(is_pos, pos, neg).sum() / n
    src, tgt = torch.cat(src).float(), torch.cat(tgt)
    per = torch.cat(per)[:, None]  # (P, 1) the matched cells' strides
    loss_l1 = ((l1_form(src) - l1_form(tgt)).abs() / per).sum() / n  # 0 (with a gradient path) when there is no GT
    g, iou = overlap(src, tgt)
    oriented = src.shape[-1] == 5  # then g is ProbIoU and the term is logged as such
    loss_giou = (1 - g).sum() / n
    total = w_cls * loss_cls + w_l1 * loss_l1 + w_giou * loss_giou
    if ring_src:
        rs, rt, rp = torch.cat(ring_src).float(), torch.cat(ring_tgt), torch.cat(ring_per)[:, None]
        loss_ring = w_l1 * ((l1_form(rs) - l1_form(rt)).abs() / rp).sum(-1) + w_giou * (1 - overlap(rs, rt)[0])
        total = total + w_ring * (torch.cat(ring_w) * loss_ring).sum() / n
    parts = {'cls': loss_cls.detach(), 'l1': loss_l1.detach(), 'probiou' if oriented else 'giou': loss_giou.detach(),
             'iou': iou.detach().mean() if iou.numel() else torch.zeros(()),
             'above_0.3_per_gt': (logits.detach().float() > math.log(0.3 / 0.7)).sum() / n}  # sigmoid > 0.3
    return total, parts, found


def detector_loss(out, targets, matcher, **kw):
    """detection_loss of a Detector output -> (total, dict of floats for logging: its terms and diagnostics)."""
    total, parts, _ = detection_loss(out, targets, matcher, **kw)
    values = torch.stack(list(parts.values())).tolist()  # one host sync for all the numbers
    return total, dict(zip(parts, values))
