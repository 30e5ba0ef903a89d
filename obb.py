"""Oriented-box geometry in numpy: polygons, minimum-area rectangles, clipping and exact polygon IoU.

Convention (everywhere in this project): an oriented box is (cx, cy, w, h, theta) in pixels of an image whose y axis
points down; w is the LONG side and lies along the direction (cos theta, sin theta), h the short side across it, and
theta is in [-pi/2, pi/2) (a rectangle turned by pi is the same rectangle). Positive theta turns clockwise on screen.
A square's angle is defined modulo pi/2 and whichever the conversion finds is kept; nothing downstream depends on
it (the detector's overlap loss and the polygon IoU are the same for all of them).
Its 4 corners are written in the order (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2) of the box frame: for
theta = 0, top-left, top-right, bottom-right, bottom-left, clockwise on screen like DOTA's label polygons.

Label polygons are hand-clicked quadrilaterals, not rectangles: 781 of the 1,276 polygons in ../shared/dota_sample
have a corner more than 3 degrees off square (all are convex, all clockwise). `poly_to_obb` replaces each by the
minimum-area rectangle that contains it, so the oriented box a model learns is slightly larger than such a polygon;
the evaluator does not use this conversion: it scores against the label polygons themselves (`polygon_iou`).
"""
import numpy as np


def polygon_area(pts):
    """Shoelace area of polygons (..., K, 2) -> (...,). Repeated vertices (the padding below) add nothing."""
    return np.abs(signed_area(pts))


def signed_area(pts):
    """(..., K, 2) -> (...,) positive when the vertices turn clockwise on screen (counter-clockwise in x-right,
    y-up terms; the sign rule of the cross products below)."""
    x, y = pts[..., 0], pts[..., 1]
    return 0.5 * (x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1)


def obb_to_poly(boxes):
    """(n, 5) cx, cy, w, h, theta -> (n, 4, 2) corners in the order of the module docstring."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    c, s = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    u = np.stack([c, s], 1) * boxes[:, 2:3] / 2  # (n, 2) half of the long side, along theta
    v = np.stack([-s, c], 1) * boxes[:, 3:4] / 2  # (n, 2) half of the short side, across it
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)  # (4, 2) corner = centre + a u + b v
    return boxes[:, None, :2] + signs[None, :, :1] * u[:, None] + signs[None, :, 1:] * v[:, None]


def wrap_angle(theta):
    """Angles (a numpy array or a torch tensor) -> [-pi/2, pi/2) (a box's angle has period pi)."""
    return (theta + np.pi / 2) % np.pi - np.pi / 2


def poly_to_obb(polys):
    """The minimum-area rectangle containing each polygon (n, K, 2) (or (n, 2K)) -> (n, 5) in the convention above.

    The smallest rectangle around a point set has a side along an edge of its convex hull (Freeman & Shapira 1975);
    every hull edge joins two of the points, so trying the directions of all K(K-1)/2 point pairs finds it without
    building the hull (6 directions for a quadrilateral, 28 for the 8-gons that clipping makes), vectorized over
    polygons and directions. Zero-area polygons give w or h = 0."""
    P = np.asarray(polys, np.float64)
    if P.size == 0:
        return np.zeros((len(P), 5))
    P = P.reshape(len(P), -1, 2)
    n, K = P.shape[:2]
    if K < 2:
        return np.zeros((n, 5))
    i, j = np.triu_indices(K, 1)
    d = P[:, j] - P[:, i]  # (n, D, 2) candidate directions
    norm = np.hypot(d[..., 0], d[..., 1])
    u = d / np.where(norm > 0, norm, 1)[..., None]
    u[norm == 0] = (1, 0)  # repeated points: any direction will do, the others decide
    along = np.einsum('nkc,ndc->ndk', P, u)  # (n, D, K) coordinates of the points along each direction
    across = np.einsum('nkc,ndc->ndk', P, np.stack([-u[..., 1], u[..., 0]], -1))
    lo_a, hi_a, lo_c, hi_c = along.min(-1), along.max(-1), across.min(-1), across.max(-1)  # (n, D) each
    best = ((hi_a - lo_a) * (hi_c - lo_c)).argmin(1)  # (n,)
    k = np.arange(n)
    ua, la, ha, lc, hc = u[k, best], lo_a[k, best], hi_a[k, best], lo_c[k, best], hi_c[k, best]
    ub = np.stack([-ua[:, 1], ua[:, 0]], 1)
    centre = ua * ((la + ha) / 2)[:, None] + ub * ((lc + hc) / 2)[:, None]
    w, h, theta = ha - la, hc - lc, np.arctan2(ua[:, 1], ua[:, 0])
    swap = h > w  # the long side defines the angle
    w, h, theta = np.where(swap, h, w), np.where(swap, w, h), np.where(swap, theta + np.pi / 2, theta)
    return np.concatenate([centre, np.stack([w, h, wrap_angle(theta)], 1)], 1)


def clip_convex(polys, clip):
    """Sutherland-Hodgman: the part of each polygon polys[i] (n, K, 2) inside the convex polygon clip[i] (n, L, 2),
    vectorized over the n pairs -> (n, K', 2). Either winding of `clip` works; the subject may be any simple polygon
    (a non-convex one can come out with zero-width bridges between its pieces: its area is still exact).

    Unused vertex slots repeat the last real vertex (a zero-length edge changes neither the clipping nor the area),
    which keeps the arrays rectangular; an empty result is all zeros."""
    P = np.asarray(polys, np.float64)
    C = np.asarray(clip, np.float64)
    n = len(P)
    sign = np.where(signed_area(C) < 0, -1.0, 1.0)  # (n,) makes "inside" the same side for both windings
    for e in range(C.shape[1]):
        if n == 0:
            break
        a, d = C[:, e], C[:, (e + 1) % C.shape[1]] - C[:, e]  # (n, 2) a point of the edge and its direction

        Q = np.roll(P, -1, axis=1)  # the next vertex of each edge of the subject
        dx, dy, ax, ay = d[:, None, 0], d[:, None, 1], a[:, None, 0], a[:, None, 1]  # (n, 1) each
        fp, fq = (sign[:, None] * (dx * (X[..., 1] - ay) - dy * (X[..., 0] - ax)) for X in (P, Q))
        # fp, fq (n, K): cross(d, X - a), >= 0 inside the edge's half-plane
        p_in, q_in = fp >= 0, fq >= 0
        denom = fp - fq
        t = np.divide(fp, denom, out=np.zeros_like(denom), where=denom != 0)
        cross = P + t[..., None] * (Q - P)  # where the edge meets the clip line
        out = np.stack([P, cross], 2).reshape(n, -1, 2)  # (n, 2K, 2): for each edge, its start then the crossing
        valid = np.stack([p_in, p_in != q_in], 2).reshape(n, -1)
        count = valid.sum(1)  # (n,)
        order = np.argsort(~valid, axis=1, kind='stable')  # valid slots first, in order
        k = max(int(count.max()), 1)
        idx = np.minimum(np.arange(k)[None], np.maximum(count[:, None] - 1, 0))  # pad by repeating the last
        P = np.take_along_axis(out, np.take_along_axis(order, idx, 1)[..., None], 1)
        P[count == 0] = 0
    return P


def clip_to_rect(polys, x0, y0, x1, y1):
    """The part of each polygon (n, K, 2) inside the rectangle [x0, x1] x [y0, y1] -> (n, K', 2)."""
    rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    return clip_convex(polys, np.broadcast_to(rect, (len(polys), 4, 2)))


def polygon_iou(p, q):
    """IoU of polygon pairs p[i], q[i] (n, K, 2) x (n, L, 2) -> (n,) float64: the intersection by clipping p by q's
    edges, areas by the shoelace formula. Exact when q is convex (p may be any simple polygon), either winding."""
    inter = polygon_area(clip_convex(p, q))
    union = polygon_area(p) + polygon_area(q) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def poly_iou_matrix(a, b, plus_one_filter=False):
    """All-pairs IoU of polygons a (n, 8) and b (m, 8) -> (n, m) float64, exact when a's polygons are convex (b's may
    be any simple polygon: pass detections, which are rectangles here, as a and label polygons, hand-clicked and so
    possibly not convex, as b). Only pairs whose axis-aligned extents
    overlap are clipped (the others are 0); plus_one_filter: decide "overlap" by the DOTA devkit's horizontal
    pre-filter, HBB IoU > 0 with the +1 pixel convention (it lets through pairs up to 1 px apart, whose polygon IoU
    is then 0, so the filter changes which pairs are computed, never a value)."""
    return poly_iou_blocks([(a, b)], plus_one_filter)[0]


def poly_iou_blocks(blocks, plus_one_filter=False, chunk=200_000):
    """poly_iou_matrix of many (a, b) pairs at once -> a list of (n_k, m_k) matrices. The candidate pairs of all
    blocks are clipped together, in chunks of `chunk` pairs: an evaluation has thousands of small blocks (an image
    and a class each), and one vectorized call per block would cost more in call overhead than in arithmetic."""
    e = 1.0 if plus_one_filter else 0.0
    out, P, Q, where = [], [], [], []
    for a, b in blocks:
        a = np.asarray(a, np.float64).reshape(-1, 4, 2)
        b = np.asarray(b, np.float64).reshape(-1, 4, 2)
        lo_a, hi_a, lo_b, hi_b = a.min(1), a.max(1), b.min(1), b.max(1)  # (n, 2), (m, 2) extents
        wh = np.minimum(hi_a[:, None], hi_b[None]) - np.maximum(lo_a[:, None], lo_b[None]) + e  # (n, m, 2)
        i, j = np.nonzero((wh > 0).all(-1))
        out.append(np.zeros((len(a), len(b))))
        P.append(a[i])
        Q.append(b[j])
        where.append((i, j))
    if not out:
        return out
    P, Q = np.concatenate(P), np.concatenate(Q)  # b's polygons are the subjects, clipped by a's edges
    values = np.concatenate([polygon_iou(Q[s:s + chunk], P[s:s + chunk]) for s in range(0, len(P), chunk)] or
                            [np.zeros(0)])
    start = 0
    for m, (i, j) in zip(out, where):
        m[i, j] = values[start:start + len(i)]
        start += len(i)
    return out
