"""Oriented boxes (DOTA task 1): geometry, polygon IoU, the angle in data and loss, the task-1 rules, files."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT
from data import DOTADataset, collate, orient, random_crop, random_dihedral, to_input
from labels import CLASSES
from detector import Detector, postprocess
from matcher import MinCostMatcher, detector_loss, probiou
from metrics import evaluate_coco, evaluate_dota
from model import build_vit
from obb import clip_to_rect, obb_to_poly, poly_iou_matrix, poly_to_obb, polygon_area, polygon_iou
from prepare import make_synthetic, synth_image
from submission import merge_tiles, read_submission, write_submission

sys.path.insert(0, str(ROOT / 'bench'))
from eval_bench import devkit_task1  # noqa: E402  the devkit's loop, rewritten: the reference for task 1


def quad(*xy):
    return np.asarray(xy, np.float64).reshape(1, 4, 2)


def iou(p, q):
    return float(polygon_iou(p, q)[0])


# ------------------------------------------------------------------------------------------------- geometry
def test_polygon_iou_hand_cases():
    square = quad(0, 0, 10, 0, 10, 10, 0, 10)
    assert iou(square, square) == 1.0
    assert iou(square, square[:, ::-1]) == 1.0  # either winding
    assert iou(square, square + 20) == 0.0  # disjoint
    assert iou(square, quad(2, 2, 4, 2, 4, 4, 2, 4)) == pytest.approx(4 / 100)  # contained
    assert iou(quad(2, 2, 4, 2, 4, 4, 2, 4), square) == pytest.approx(4 / 100)
    diamond = quad(5, 0, 10, 5, 5, 10, 0, 5)  # the 45-degree square whose corners touch the square's sides
    assert iou(square, diamond) == pytest.approx(0.5) and iou(diamond, square) == pytest.approx(0.5)
    assert iou(square, square + (10, 0)) == 0.0  # sharing an edge: no area in common
    assert iou(square, square + (5, 0)) == pytest.approx(50 / 150)
    line = quad(0, 0, 10, 10, 10, 10, 0, 0)  # degenerate: zero area
    assert iou(line, square) == 0.0 and iou(line, line) == 0.0 and iou(square, line) == 0.0


def test_polygon_iou_matches_shapely_on_random_convex_quads():
    shapely = pytest.importorskip('shapely.geometry', reason='shapely (requirements-dev.txt) is the reference')
    rng = np.random.default_rng(0)
    n = 3000
    centre = rng.uniform(0, 40, (n, 2, 1, 2))
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n, 2, 4)), -1)  # 4 points on a circle: a convex quad
    polys = centre + rng.uniform(2, 25, (n, 2, 1, 1)) * np.stack([np.cos(angles), np.sin(angles)], -1)
    polys[::3, 1] = polys[::3, 1, ::-1]  # both windings
    ours = polygon_iou(polys[:, 0], polys[:, 1])
    ref = []
    for p, q in polys:
        a, b = shapely.Polygon(p), shapely.Polygon(q)
        inter = a.intersection(b).area
        ref.append(inter / (a.area + b.area - inter))
    assert (np.asarray(ref) > 0).sum() > n // 4  # many overlapping pairs, not only disjoint ones
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    m = poly_iou_matrix(polys[:50, 0].reshape(-1, 8), polys[:40, 1].reshape(-1, 8), plus_one_filter=True)
    np.testing.assert_allclose(m[np.arange(40), np.arange(40)], ref[:40], atol=1e-9)


def test_non_convex_label_polygon_against_a_rectangle():
    """A hand-clicked label polygon need not be convex: poly_iou_matrix clips it (b) by the detection (a)."""
    shapely = pytest.importorskip('shapely.geometry', reason='shapely (requirements-dev.txt) is the reference')
    dart = np.array([0.0, 0, 10, 5, 0, 10, 4, 5])  # concave at (4, 5)
    rects = obb_to_poly([[5.0, 5, 10, 6, 0.0], [3, 5, 8, 8, 0.5], [8, 5, 4, 12, 0.0]]).reshape(-1, 8)
    got = poly_iou_matrix(rects, dart[None])[:, 0]
    for r, v in zip(rects, got):
        a, b = shapely.Polygon(r.reshape(4, 2)), shapely.Polygon(dart.reshape(4, 2))
        inter = a.intersection(b).area
        assert v == pytest.approx(inter / (a.area + b.area - inter), abs=1e-12)


def test_min_area_rectangle_round_trip_and_convention():
    rng = np.random.default_rng(1)
    boxes = np.stack([*rng.uniform(0, 100, (2, 500)), rng.uniform(5, 40, 500), rng.uniform(1, 5, 500),
                      rng.uniform(-np.pi / 2, np.pi / 2, 500)], 1)
    poly = obb_to_poly(boxes)
    for corners in (poly, poly[:, ::-1], np.roll(poly, 1, 1)):  # any winding, any first corner
        np.testing.assert_allclose(poly_to_obb(corners), boxes, atol=1e-9)
    # w along theta is the long side; a box given with its short side along theta comes back turned by pi/2
    turned = poly_to_obb(obb_to_poly([[0, 0, 2, 10, 0.0]]))[0]
    np.testing.assert_allclose(turned, [0, 0, 10, 2, -np.pi / 2], atol=1e-9)
    # a hand-clicked quadrilateral: the rectangle contains it and is the smallest one (brute force over angles)
    q = np.array([[[0.0, 0], [10, 1], [11, 5], [-1, 4]]])
    box = poly_to_obb(q)
    assert polygon_iou(q, obb_to_poly(box))[0] == pytest.approx(polygon_area(q)[0] / (box[0, 2] * box[0, 3]))
    t = np.linspace(0, np.pi, 20001)
    u = np.stack([np.cos(t), np.sin(t)], 1)
    a, b = q[0] @ u.T, q[0] @ np.stack([-u[:, 1], u[:, 0]], 1).T  # (4, T)
    assert box[0, 2] * box[0, 3] <= ((a.max(0) - a.min(0)) * (b.max(0) - b.min(0))).min() + 1e-9


def test_clip_to_rect():
    square = quad(0, 0, 10, 0, 10, 10, 0, 10)
    assert polygon_area(clip_to_rect(square, 5, -1, 20, 20)) == pytest.approx([50])
    assert polygon_area(clip_to_rect(square, 20, 20, 30, 30)) == pytest.approx([0])


# ------------------------------------------------------------------------------------------------- data
def raster(poly, size):
    img = Image.new('L', size)
    ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=255)
    return np.asarray(img) > 0


def moments(mask):
    """Centre (x, y) and long-axis angle of a pixel mask (pixel (i, j) is the square [j, j+1] x [i, i+1])."""
    ys, xs = np.nonzero(mask)
    x, y = xs + 0.5, ys + 0.5
    dx, dy = x - x.mean(), y - y.mean()
    return x.mean(), y.mean(), 0.5 * np.arctan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean())


def test_dihedral_moves_oriented_boxes_with_pixels():
    """All 8 flips/turns: the box moved by random_dihedral has the centre and the long-axis direction of the pixels
    moved by orient (measured by the mask's moments, free of the drawing's rounding)."""
    box = torch.tensor([[26.0, 21, 30, 8, 0.4]], dtype=torch.float64)  # not symmetric under any flip
    h = w = 48
    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    img[..., 0] = torch.from_numpy(raster(obb_to_poly(box.numpy())[0], (w, h))).to(torch.uint8) * 255
    x0, y0, t0 = moments(img[..., 0].numpy() > 0)
    assert abs(x0 - 26) < 0.3 and abs(y0 - 21) < 0.3 and abs(t0 - 0.4) < 0.05  # the measurement itself is sound
    seen = set()
    for seed in range(80):
        boxes, flips = random_dihedral(box, (h, w), torch.Generator().manual_seed(seed))
        images, (t,) = collate([(img, {'boxes': boxes, 'flips': flips, 'size': (h, w)})], multiple=16)
        x, y, theta = moments(orient(images.permute(0, 3, 1, 2), [t])[0, 0].numpy() > 0)
        cx, cy, _, _, angle = t['boxes'][0].tolist()
        assert abs(x - cx) < 0.3 and abs(y - cy) < 0.3, (flips, t['boxes'])
        assert abs(math.remainder(theta - angle, math.pi)) < 0.05, (flips, theta, angle)
        assert -math.pi / 2 <= angle < math.pi / 2
        seen.add(tuple(flips.tolist()))
    assert len(seen) == 8


def test_random_crop_cuts_oriented_boxes_to_their_visible_part():
    img = torch.zeros(40, 80, 3, dtype=torch.uint8)
    boxes = torch.tensor([[40.0, 20, 20, 10, 0.3], [10.0, 10, 8, 4, -0.5]], dtype=torch.float64)
    cuts = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        top, left = (int(torch.randint(0, max(n - 40, 0) + 1, (), generator=g)) for n in (40, 80))  # as it draws
        out, got, keep, origin = random_crop(img, boxes, 40, torch.Generator().manual_seed(seed))
        assert origin == (top, left)
        assert out.shape[:2] == (40, 40)
        corners = obb_to_poly(boxes.numpy()) - (left, top)
        inside = ((corners >= 0) & (corners <= 40)).all((1, 2))
        want = np.where(inside[:, None], boxes.numpy() - (left, top, 0, 0, 0),
                        poly_to_obb(clip_to_rect(corners, 0, 0, 40, 40)))  # the rectangle of the visible part
        want_keep = (want[:, 2] >= 1) & (want[:, 3] >= 1)
        assert keep.tolist() == want_keep.tolist()
        np.testing.assert_allclose(got.numpy(), want[want_keep], atol=1e-9)
        cuts += int((~inside & want_keep).sum())
    assert cuts > 3  # the case was exercised


def test_dataset_reads_oriented_boxes_and_synthetic_rows_turn(tmp_path):
    make_synthetic(tmp_path, n_train=4, n_val=0, size=96, seed=2, rotated=True)
    ds = DOTADataset(tmp_path, 'train', CLASSES['dota1.0'], boxes='obb')
    hbb = DOTADataset(tmp_path, 'train', CLASSES['dota1.0'])
    for t, h in zip(ds.targets, hbb.targets):
        corners = obb_to_poly(t['boxes'])
        np.testing.assert_allclose(np.concatenate([corners.min(1), corners.max(1)], 1), h['boxes'], atol=0.1)
        assert (t['boxes'][:, 2] >= t['boxes'][:, 3]).all()  # (labels round to 0.1 px: rectangles up to 0.1 larger)
    rows = [synth_image(np.random.default_rng(k), 256, n_rows=3, n_single=0, rotated=True)[1] for k in range(6)]
    angles = np.concatenate([poly_to_obb(np.stack([p for p, _ in objs]))[:, 4] for objs in rows if objs])
    off_axis = np.minimum(np.abs(angles) % (np.pi / 2), np.pi / 2 - np.abs(angles) % (np.pi / 2))
    assert (off_axis > 0.3).mean() > 0.3  # rows in any direction, not only along x or y


# ------------------------------------------------------------------------------------------------- loss
def test_probiou_periodic_and_continuous_at_the_boundary():
    b = torch.tensor([[10.0, 10, 20, 6, 0.3]])
    same = probiou(b, b)
    assert same > 0.999
    torch.testing.assert_close(probiou(b, b + torch.tensor([0, 0, 0, 0, math.pi])), same)
    torch.testing.assert_close(probiou(b, torch.tensor([[10.0, 10, 6, 20, 0.3 + math.pi / 2]])), same)  # w <-> h
    eps = 0.01  # across the +-pi/2 boundary the two boxes differ by 0.02 rad, and the overlap knows it
    near = probiou(torch.tensor([[0.0, 0, 20, 6, math.pi / 2 - eps]]),
                   torch.tensor([[0.0, 0, 20, 6, -math.pi / 2 + eps]]))
    far = probiou(torch.tensor([[0.0, 0, 20, 6, 0.0]]), torch.tensor([[0.0, 0, 20, 6, 0.5]]))
    assert near > 0.97 and far < 0.8
    square = torch.tensor([[5.0, 5, 8, 8, 0.0]])
    torch.testing.assert_close(probiou(square, square + torch.tensor([0, 0, 0, 0, 0.7])), probiou(square, square))
    p = torch.tensor([[10.0, 10, 20, 6, 0.3]], requires_grad=True)
    probiou(p, b).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_loss_is_the_same_for_theta_and_theta_plus_pi():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 8), 3, 32, obb=True)
    out = det(torch.randn(1, 3, 32, 32))
    t = torch.tensor([[12.0, 14, 14, 5, 1.5]])
    a = detector_loss(out, [{'boxes': t, 'labels': torch.tensor([1])}], MinCostMatcher())[0]
    b = detector_loss(out, [{'boxes': t + torch.tensor([0, 0, 0, 0, -math.pi]), 'labels': torch.tensor([1])}],
                      MinCostMatcher())[0]
    torch.testing.assert_close(a, b)


def test_detector_overfits_one_rotated_synthetic_image(tmp_path):
    torch.manual_seed(0)
    make_synthetic(tmp_path, n_train=1, n_val=0, size=64, seed=5, rotated=True)
    images, (t,) = collate([DOTADataset(tmp_path, 'train', CLASSES['dota1.0'], boxes='obb')[0]], multiple=8)
    assert len(t['boxes']) >= 3 and (t['boxes'][:, 4].abs() > 0.2).any()
    det = Detector(build_vit('test', 8), 15, head_dim=32, obb=True)
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3, weight_decay=0.0)
    x = to_input(images, [t], torch.device('cpu'))
    for _ in range(300):
        loss, parts = detector_loss(det(x), [t], MinCostMatcher())
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        (pred,) = postprocess(det(x), max_det=100)
    poly = {'boxes': obb_to_poly(pred['boxes'].numpy()).reshape(-1, 8), 'scores': pred['scores'].numpy(),
            'labels': pred['labels'].numpy()}
    gt = {'boxes': obb_to_poly(t['boxes'].numpy()).reshape(-1, 8), 'labels': t['labels'].numpy(),
          'difficult': np.zeros(len(t['labels']), bool)}
    res = evaluate_coco([poly], [gt], 15)
    assert np.nanmean(res['ap'][:, 0]) >= 0.9, res['ap'][:, 0]  # AP50 by exact polygon IoU


# ------------------------------------------------------------------------------------------------- task 1
def polys(*boxes):
    return obb_to_poly(np.asarray(boxes, np.float64)).reshape(-1, 8)


def test_task1_rules_on_hand_cases():
    # GT 0: a 45-degree bar; GT 1: difficult; class 1 has no GT at all (contributes 0 to the mean)
    gt = {'boxes': polys([50, 50, 40, 8, math.pi / 4], [150, 50, 40, 8, 0]), 'labels': np.array([0, 0]),
          'difficult': np.array([False, True])}
    det = {'boxes': polys([50, 50, 40, 8, math.pi / 4], [51, 50, 40, 8, math.pi / 4], [150, 50, 40, 8, 0],
                          [50, 50, 40, 8, -math.pi / 4], [300, 300, 10, 10, 0]),
           'scores': np.array([0.9, 0.8, 0.7, 0.6, 0.5]), 'labels': np.array([0, 0, 0, 0, 1])}
    res = evaluate_dota([det], [gt], 2)
    # ranking of class 0: TP, FP (GT 0 taken), ignored (difficult), FP (crossing bar, IoU < 0.5) -> P = 1, 1/2, 1/3
    assert res['n_gt'].tolist() == [1, 0] and res['n_pred'].tolist() == [4, 1]
    assert res['ap'].tolist() == pytest.approx([1.0, 0.0])
    # the axis-aligned view of the same two bars overlaps fully: only polygon IoU tells them apart
    cross = polys([50, 50, 40, 8, math.pi / 4], [50, 50, 40, 8, -math.pi / 4])
    assert poly_iou_matrix(cross[:1], cross[1:])[0, 0] < 0.2
    np.testing.assert_allclose(devkit_task1([det], [gt], 2)['ap'], res['ap'])


def test_task1_matches_the_devkit_loop_on_random_cases():
    rng = np.random.default_rng(3)
    preds, gts = [], []
    for _ in range(12):
        g = rng.integers(0, 25)
        gb = np.stack([*rng.uniform(0, 200, (2, g)), rng.uniform(8, 40, g), rng.uniform(3, 8, g),
                       rng.uniform(-1.6, 1.6, g)], 1)
        k = rng.integers(0, 3, g)
        near = np.repeat(gb, 2, 0) + rng.normal(0, [2, 2, 2, 1, 0.15], (2 * g, 5))
        junk = np.stack([*rng.uniform(0, 200, (2, 10)), rng.uniform(8, 40, 10), rng.uniform(3, 8, 10),
                         rng.uniform(-1.6, 1.6, 10)], 1)
        db = np.concatenate([near, junk])
        gts.append({'boxes': polys(*gb) if g else np.zeros((0, 8)), 'labels': k,
                    'difficult': rng.uniform(size=g) < 0.15})
        preds.append({'boxes': polys(*db), 'scores': rng.permutation(len(db)) / len(db) + rng.uniform(),
                      'labels': np.concatenate([np.repeat(k, 2), rng.integers(0, 3, 10)])})
    ours, ref = evaluate_dota(preds, gts, 3), devkit_task1(preds, gts, 3)
    assert ours['ap'].min() > 0.1  # a case with real matches in every class
    np.testing.assert_allclose(ours['ap'], ref['ap'], atol=1e-12)
    assert ours['n_gt'].tolist() == ref['n_gt'].tolist()


# ------------------------------------------------------------------------------------------------- files
def test_task1_files_round_trip_and_offline_evaluation(tmp_path):
    names = CLASSES['dota1.0']
    dets = {'P1': {'boxes': polys([50, 50, 40, 8, 0.7], [10, 10, 6, 3, -1.2]), 'scores': np.array([0.9, 0.4]),
                   'labels': np.array([6, 4])}}
    assert write_submission(tmp_path / 'sub', dets, names) == 1
    assert (tmp_path / 'sub' / 'Task1_ship.txt').read_text().startswith('P1 0.900000 ')
    back = read_submission(tmp_path / 'sub', names, ['P1'], task=1)['P1']
    order = np.argsort(back['labels'])[::-1]  # read back by class file
    np.testing.assert_allclose(back['boxes'][order], dets['P1']['boxes'], atol=0.005)
    assert back['labels'][order].tolist() == [6, 4]
    (tmp_path / 'labels').mkdir()
    lines = [' '.join(f'{v:.1f}' for v in p) + f' {names[c]} 0' for p, c in zip(dets['P1']['boxes'], [6, 4])]
    (tmp_path / 'labels' / 'P1.txt').write_text('\n'.join(lines) + '\n')
    run = subprocess.run([sys.executable, 'evaluate.py', '--dets', str(tmp_path / 'sub'), '--labels',
                          str(tmp_path / 'labels'), '--protocol', 'dota', '--json', str(tmp_path / 'r.json')],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['classes']['ship']['ap50_voc07'] == pytest.approx(1.0)
    assert r['classes']['small-vehicle']['ap50_voc07'] == pytest.approx(1.0)


def test_merge_removes_oriented_duplicates_across_a_seam():
    box = obb_to_poly([[100.0, 30, 40, 8, 0.6]]).reshape(8)
    tile = {'A__1__0___0': {'boxes': box[None], 'scores': np.array([0.9]), 'labels': np.array([2])},
            'A__1__80___0': {'boxes': (box - [80, 0] * 4)[None], 'scores': np.array([0.8]), 'labels': np.array([2])},
            'A__1__0___200': {'boxes': np.zeros((0, 8)), 'scores': np.zeros(0), 'labels': np.zeros(0, int)}}
    merged = merge_tiles(tile)['A']
    assert len(merged['boxes']) == 1 and merged['scores'][0] == 0.9
    np.testing.assert_allclose(merged['boxes'][0], box)


def test_as_hbb_takes_polygons_and_a_tile_without_any():
    from evaluate import as_hbb
    square = np.array([[2, 1, 6, 3, 4, 7, 0, 5]], np.float64)  # a turned square's corners
    assert as_hbb({'boxes': square})['boxes'].tolist() == [[0, 1, 6, 7]]
    assert as_hbb({'boxes': np.zeros((0, 8))})['boxes'].shape == (0, 4)  # it was a reshape error
    assert as_hbb({'boxes': np.ones((2, 4))})['boxes'].shape == (2, 4)  # axis-aligned boxes pass unchanged
