"""The detector: matcher invariants, the two levels, losses on 0 and 1,000 GT, overfitting."""
import itertools

import numpy as np
import pytest
import torch

from data import DOTADataset, collate, to_input
from labels import CLASSES
from detector import Detector, outside_cell, postprocess
from matcher import MinCostMatcher, assign_min_cost, detection_loss, detector_loss, giou
from metrics import evaluate_coco
from model import build_vit
from prepare import make_synthetic


def test_assignment_is_one_to_one_and_takes_mutual_minima():
    torch.manual_seed(0)
    cost = torch.rand(40, 25)
    rows, cols = assign_min_cost(cost)
    assert sorted(cols.tolist()) == list(range(25)) and len(set(rows.tolist())) == 25
    flat = cost.argmin()
    r, c = divmod(flat.item(), 25)
    assert rows[cols == c].item() == r  # the globally cheapest pair is always matched
    # fewer predictions than GT: every prediction used once, the surplus GT unmatched
    rows, cols = assign_min_cost(torch.rand(3, 5))
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and len(set(cols.tolist())) == 3


def test_assignment_is_optimal_on_small_cases_where_greedy_is():
    # when every GT has a distinct cheapest prediction, the rule returns exactly those (the optimum)
    cost = torch.tensor([[0.1, 5, 5], [5, 0.2, 5], [5, 5, 0.3], [1, 1, 1]])
    rows, cols = assign_min_cost(cost)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 0, 1: 1, 2: 2}
    brute = min(itertools.permutations(range(4), 3), key=lambda p: sum(cost[p[g], g] for g in range(3)))
    assert list(brute) == [0, 1, 2]


def test_matcher_gives_neighbouring_cells_to_objects_sharing_a_cell():
    det = Detector(build_vit('test', 8), 2)
    out = det(torch.zeros(1, 3, 32, 32))
    gt = torch.tensor([[9.0, 9, 12, 12], [12.5, 9, 15.5, 12]])  # two 3 px objects in cell (1, 1)
    pi, gi = MinCostMatcher()(out['logits'][0], out['boxes'][0], out['centres'][0], gt, torch.tensor([0, 1]), 8)
    assert len(set(pi.tolist())) == 2 and sorted(gi.tolist()) == [0, 1]


def test_centre_term_gives_the_object_to_the_nearest_of_two_equal_cells():
    # two neighbouring cells (centres 4 and 12 px apart in x) predict the same box; the object's centre, x = 10, is
    # in the second cell. By score alone the first (more confident) cell wins; with w_ctr > 0 the nearer one does.
    centres = torch.tensor([[4.0, 4], [12.0, 4]])
    boxes = torch.tensor([[6.0, 1, 14, 7], [6.0, 1, 14, 7]])
    gt, labels = torch.tensor([[6.0, 1, 14, 7]]), torch.tensor([0])
    logits = torch.tensor([[0.6], [0.5]])  # nearly the same score
    assert MinCostMatcher(w_ctr=0.0)(logits, boxes, centres, gt, labels, 8)[0].tolist() == [0]
    assert MinCostMatcher()(logits, boxes, centres, gt, labels, 8)[0].tolist() == [1]  # w_ctr 1, finetune.py's
    cost = MinCostMatcher(w_ctr=1.0).cost(logits, boxes, centres, gt, labels, 8)
    base = MinCostMatcher(w_ctr=0.0).cost(logits, boxes, centres, gt, labels, 8)
    assert torch.allclose(cost - base, torch.tensor([[6 / 8], [2 / 8]]))  # |dx| + |dy| in cells


def test_detector_overfits_one_synthetic_image(tmp_path):
    torch.manual_seed(0)
    make_synthetic(tmp_path, n_train=1, n_val=0, size=64, seed=5)
    images, (t,) = collate([DOTADataset(tmp_path, 'train', CLASSES['dota1.0'])[0]], multiple=8)
    assert len(t['boxes']) >= 3
    det = Detector(build_vit('test', 8), 15, head_dim=32)
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3, weight_decay=0.0)
    x = to_input(images, [t], torch.device('cpu'))
    matcher = MinCostMatcher()
    for _ in range(300):
        loss, _ = detector_loss(det(x), [t], matcher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        preds = postprocess(det(x), max_det=100, sizes=[(64, 64)])
    res = evaluate_coco(preds, [t], 15)
    assert np.nanmean(res['ap'][:, 0]) >= 0.9, res['ap'][:, 0]


def test_prediction_map_stride():
    x = torch.zeros(2, 3, 64, 96)
    # the default, finetune.py's: the patch grid and a map at half its stride for objects under two cells
    assert Detector(build_vit('test', 16), 3, 32)(x)['logits'].shape == (2, 4 * 6 + 8 * 12, 3)
    assert Detector(build_vit('test', 16), 3, 32, stride=16, fine=0)(x)['logits'].shape == (2, 4 * 6, 3)
    assert Detector(build_vit('test', 16), 3, 32, stride=8, fine=0)(x)['logits'].shape == (2, 8 * 12, 3)
    out = Detector(build_vit('test', 8), 3, 32, stride=4)(x)
    assert out['logits'].shape == (2, 16 * 24, 3) and out['stride'] == 4
    torch.testing.assert_close(out['centres'][0, :2], torch.tensor([[2.0, 2.0], [6.0, 2.0]]))
    for bad in (32, 12):
        with pytest.raises(ValueError, match='power of 2'):
            Detector(build_vit('test', 16), 3, 32, stride=bad)


def test_varifocal_loss_matches_its_formula():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 8), 2, 32, fine=0)
    out = det(torch.randn(1, 3, 16, 16))  # 4 cells
    gt = {'boxes': torch.tensor([[2.0, 2, 7, 7]]), 'labels': torch.tensor([1])}
    pi, gi = MinCostMatcher()(out['logits'][0], out['boxes'][0], out['centres'][0], gt['boxes'], gt['labels'], 8)
    q = giou(out['boxes'][0, pi].detach(), gt['boxes'][gi])[1].item()
    p = out['logits'][0].detach().sigmoid()
    want = -0.75 * p ** 2 * torch.log(1 - p)  # every (cell, class) a negative ...
    pp = p[pi.item(), 1]
    want[pi.item(), 1] = -q * (q * torch.log(pp) + (1 - q) * torch.log(1 - pp))  # ... but the positive
    _, parts, _ = detection_loss(out, [gt], MinCostMatcher())
    assert parts['cls'] == pytest.approx(want.sum().item(), rel=1e-5)


@pytest.mark.parametrize('n_gt', [0, 1, 1000])
def test_losses_are_finite_and_every_gt_is_matched(n_gt):
    torch.manual_seed(0)
    det = Detector(build_vit('test', 8), 15, 32, stride=4)  # 256^2: 4096 cells
    xy = torch.rand(n_gt, 2) * 240
    t = {'boxes': torch.cat([xy, xy + 4 + torch.rand(n_gt, 2) * 12], 1), 'labels': torch.randint(0, 15, (n_gt,))}
    out = det(torch.randn(1, 3, 256, 256))
    loss, parts = detector_loss(out, [t], MinCostMatcher())
    loss.backward()
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in det.parameters() if p.grad is not None)
    _, _, [(pi, gi)] = detection_loss(out, [t], MinCostMatcher())
    assert sorted(gi.tolist()) == list(range(n_gt)) and len(set(pi.tolist())) == n_gt  # one-to-one, all GT


@pytest.mark.parametrize('patch,stride', [(8, 8), (16, 8), (8, 4)])
def test_spatial_prior_adds_a_map_of_the_pixels_at_the_stride(patch, stride):
    torch.manual_seed(0)
    det = Detector(build_vit('test', patch), 3, 32, stride=stride, fine=0)  # the spatial prior: on by default
    x = torch.randn(2, 3, 64, 64)
    assert det.prior(x).shape == (2, 32, 64 // stride, 64 // stride)
    out = det(x)
    assert out['logits'].shape == (2, (64 // stride) ** 2, 3)
    t = {'boxes': torch.tensor([[4.0, 4, 12, 12]]), 'labels': torch.tensor([1])}
    detector_loss(out, [t, t], MinCostMatcher())[0].backward()
    assert det.prior.layers[0].weight.grad.abs().sum() > 0  # trained with the rest


def test_ring_boxes_and_centre_gate_leave_only_the_cell_holding_the_centre():
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(5), indexing='ij')
    centres = ((torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * 8).float()[None]  # (1, 25, 2), stride 8
    gt = torch.tensor([[14.0, 14, 26, 26]])  # centred in cell (2, 2), index 12
    t = [{'boxes': gt, 'labels': torch.tensor([1])}]
    own = torch.cat([centres - 6, centres + 6], -1)  # every cell predicts the GT's size centred on itself
    out = {'logits': torch.zeros(1, 25, 3), 'boxes': own, 'centres': centres, 'stride': 8}
    assert not outside_cell(out, 0.0).any()
    # w_ring: the 8 neighbours (the 12 px box's region is the 3 x 3 around its centre) regress the GT's box: their
    # own-centred boxes are one cell off (L1 2 or 4 cells), the others free
    m = MinCostMatcher()  # its centre region is the ring's region; it matches cell 12 in every case below
    assert detection_loss(out, t, m)[2][0][0].tolist() == [12]
    ring = [float(detection_loss(out, t, m, w_ring=w)[0]) for w in (0, 1)]
    ring_ok = [float(detection_loss({**out, 'boxes': gt.expand(1, 25, 4)}, t, m, w_ring=w)[0]) for w in (0, 1)]
    assert ring[1] > ring[0] + 2 and ring_ok[1] == pytest.approx(ring_ok[0])
    # on a two-level map the finer level has no ring (its tiny objects lost to it): these 25 cells as the fine level
    two = {'logits': torch.zeros(1, 26, 3), 'boxes': torch.cat([own, torch.zeros(1, 1, 4)], 1),
           'centres': torch.cat([centres, torch.full((1, 1, 2), 200.0)], 1), 'stride': torch.tensor([8.0] * 25 + [16])}
    fine = [float(detection_loss(two, t, m, w_ring=w)[0]) for w in (0, 1)]
    assert fine[1] == pytest.approx(fine[0])
    # once they point at the object, the gate drops all but cell 12: in training (no negative term) and decoding
    pointed = {**out, 'boxes': gt.expand(1, 25, 4)}
    assert outside_cell(pointed, 0.0)[0].nonzero().squeeze(1).tolist() == [i for i in range(25) if i != 12]
    assert detection_loss(pointed, t, m)[2][0][0].tolist() == [12]
    cls = [detection_loss(pointed, t, m, gate=g)[1]['cls'] for g in (None, 0.0)]
    positive = detection_loss({**pointed, 'logits': pointed['logits'][:, [12]], 'boxes': gt[None],
                               'centres': centres[:, [12]]}, t, m)
    assert cls[0] > cls[1] == pytest.approx(positive[1]['cls'])
    (d,) = postprocess({**pointed, 'logits': torch.full((1, 25, 3), 2.0)}, centre_gate=0.0)
    assert len(d['scores']) == 3 and (d['boxes'] == gt).all()  # cell 12, three classes
    (d,) = postprocess({**pointed, 'logits': torch.full((1, 25, 3), 2.0)})
    assert len(d['scores']) == 75


def test_the_detector_places_a_crop_where_its_origin_says():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 8), 3).eval()
    x = torch.randn(2, 3, 32, 32)
    zero = det(x, torch.zeros(2, 2))['logits']
    torch.testing.assert_close(zero, det(x)['logits'])
    moved = det(x, torch.tensor([[0.0, 0.0], [1.5, 2.0]]))['logits']  # fractional: a crop need not start on a patch
    torch.testing.assert_close(moved[0], zero[0])
    assert not torch.allclose(moved[1], zero[1])


def test_fine_level_gives_small_objects_to_its_cells_and_the_rest_to_the_coarse_map():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 16), 3, 32, stride=8, spatial_prior=True, fine=16)
    out = det(torch.randn(2, 3, 64, 96))
    M, M2 = 8 * 12, 16 * 24
    assert out['logits'].shape == (2, M + M2, 3) and out['boxes'].shape == (2, M + M2, 4)
    assert out['stride'].tolist() == [8] * M + [4] * M2
    torch.testing.assert_close(out['centres'][0, [0, M]], torch.tensor([[4.0, 4.0], [2.0, 2.0]]))
    # a 6 px car and a 30 px plane: the car goes to a stride-4 cell, the plane to a stride-8 one
    t = {'boxes': torch.tensor([[20.0, 20, 26, 26], [40.0, 10, 70, 40]]), 'labels': torch.tensor([0, 1])}
    none = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0).long()}
    _, _, [(pi, gi), empty] = detection_loss(out, [t, none], MinCostMatcher(w_ctr=1.0))
    assert dict(zip(gi.tolist(), out['stride'][pi].tolist())) == {0: 4, 1: 8} and len(empty[0]) == 0
    # without the claim the plane's nearest cell could be a fine one: the claim is what keeps the levels apart
    cost = MinCostMatcher(w_ctr=1.0).cost(out['logits'][0], out['boxes'][0], out['centres'][0], t['boxes'],
                                          t['labels'], out['stride'], out['claim'])
    assert (cost[:M, 0] >= 1e4).all() and (cost[M:, 1] >= 1e4).all()
    loss, _ = detector_loss(out, [t, t], MinCostMatcher())
    loss.backward()
    assert det.box_fine.weight.grad.abs().sum() > 0 and det.fine_prior.layers[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='stride >= 8'):
        Detector(build_vit('test', 8), 3, 32, stride=4, fine=8)
    obb = Detector(build_vit('test', 16), 3, 32, stride=8, obb=True, fine=16)(torch.randn(1, 3, 64, 64))
    t = {'boxes': torch.tensor([[23.0, 23, 6, 3, 0.5], [55.0, 25, 30, 12, -0.3]]), 'labels': torch.tensor([0, 1])}
    _, _, [(pi, gi)] = detection_loss(obb, [t], MinCostMatcher(w_ctr=1.0))  # oriented: the claim by the extent
    assert dict(zip(gi.tolist(), obb['stride'][pi].tolist())) == {0: 4, 1: 8}


def test_the_matcher_builds_the_cost_of_in_region_cells_only_and_matches_as_on_the_full_matrix():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 16), 3, 32, stride=8, fine=16)
    out = det(torch.randn(1, 3, 128, 128))
    m = MinCostMatcher(w_ctr=1.0)
    xy = torch.rand(60, 2) * 110
    wh = torch.rand(60, 2) * 30 + 3
    gt, labels = torch.cat([xy, xy + wh], 1), torch.randint(0, 3, (60,))
    gt[0] = torch.tensor([300.0, 300, 310, 310])  # no cell within reach: the full matrix must decide
    args = out['logits'][0], out['boxes'][0], out['centres'][0]
    for boxes in (gt[1:], gt):  # the fast path, then the fallback
        full = m.cost(*args, boxes, labels[:len(boxes)], out['stride'], out['claim'])
        want = assign_min_cost(full)
        got = m(*args, boxes, labels[:len(boxes)], out['stride'], out['claim'])
        order = lambda r, c: sorted(zip(c.tolist(), r.tolist()))  # noqa: E731
        assert order(*got) == order(*want) and len(got[1]) == len(boxes)
