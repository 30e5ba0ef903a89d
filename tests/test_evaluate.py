"""The official DOTA protocol, AP by size, submission files, NMS and merging tiles back into full images."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, dets, gts
from labels import CLASSES, LabelError, parse_label_file
from submission import merge_tiles, nms, read_labels, read_submission, write_label_files, write_submission
from metrics import box_iou, evaluate_coco, evaluate_dota
from prepare import split

V1 = CLASSES['dota1.0']


def test_iou_048_continuous_052_with_plus_one():
    gt, det = [0, 0, 10, 12], [0, 0, 10, 5.76]
    assert box_iou([det], [gt])[0, 0] == pytest.approx(0.48)
    assert box_iou([det], [gt], plus_one=True)[0, 0] == pytest.approx(0.52)
    assert evaluate_coco([dets([det], [0.9])], [gts([gt])], 1)['ap'][0, 0] == 0.0
    assert evaluate_dota([dets([det], [0.9])], [gts([gt])], 1)['ap'][0] == pytest.approx(1.0)


def test_dota_assigns_each_detection_to_its_max_iou_gt_even_if_taken():
    a, b = [0, 0, 100, 100], [30, 0, 130, 100]
    d1, d2 = [0, 0, 100, 100], [10, 0, 110, 100]  # d2: IoU 0.82 with a (taken by d1), 0.67 with b
    coco = evaluate_coco([dets([d1, d2], [0.9, 0.8])], [gts([a, b])], 1)
    dota = evaluate_dota([dets([d1, d2], [0.9, 0.8])], [gts([a, b])], 1)
    assert coco['ap'][0, 0] == pytest.approx(1.0)  # coco: d2 takes the still-free b
    assert dota['ap'][0] == pytest.approx(6 / 11)  # dota: d2 goes to a, already taken: FP; recall stops at 0.5


def test_dota_difficult_ignored_and_gt_cut_to_integers():
    res = evaluate_dota([dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.95])],
                        [gts([[0, 0, 10, 10], [50, 50, 60, 60]], difficult=[0, 1])], 1)
    assert res['ap'][0] == pytest.approx(1.0) and res['n_gt'][0] == 1  # the hit on the difficult one: no FP
    # GT (0.9, 0.9, 2.9, 2.9) is read as (0, 0, 2, 2): the detection (0, 0, 2, 2) matches it exactly
    assert evaluate_dota([dets([[0, 0, 2, 2]], [0.9])], [gts([[0.9, 0.9, 2.9, 2.9]])], 1)['ap'][0] == pytest.approx(1)
    assert evaluate_coco([dets([[0, 0, 2, 2]], [0.9])], [gts([[0.9, 0.9, 2.9, 2.9]])], 1)['ap'][0, 0] == 0.0


def test_dota_voc07_points_and_mean_over_the_fixed_class_list():
    res = evaluate_dota([dets([[0, 0, 10, 10]], [0.9])], [gts([[0, 0, 10, 10], [20, 20, 30, 30]])], 3)
    assert res['ap'][0] == pytest.approx(6 / 11)  # precision 1 at recall 0, .1, ..., .5
    assert res['ap'][1:].tolist() == [0, 0] and res['ap'].mean() == pytest.approx(6 / 33)
    res = evaluate_dota([dets([], [])], [gts([[0, 0, 10, 10]], labels=[2])], 3)  # GT and no detections: AP 0
    assert res['ap'].tolist() == [0, 0, 0] and res['n_gt'].tolist() == [0, 0, 1]


def test_ap_by_size_ignores_other_sizes_like_coco_area_ranges():
    tiny, medium = [0, 0, 10, 10], [100, 100, 150, 150]
    res = evaluate_coco([dets([[300, 300, 310, 310], tiny, medium], [0.9, 0.8, 0.7])], [gts([tiny, medium])], 1,
                        by_size=True)
    size = res['ap_size']
    assert size['tiny'][0, 0] == pytest.approx(0.5)  # the tiny FP ranks first; the medium hit is ignored here
    assert size['medium'][0, 0] == pytest.approx(1.0)  # the tiny FP and the tiny hit are ignored here
    assert np.isnan(size['small'][0, 0]) and np.isnan(size['large'][0, 0])


def reference_nms(boxes, scores, thr):
    order, keep = np.argsort(-scores, kind='stable'), []
    for i in order:
        if all(box_iou(boxes[i:i + 1], boxes[k:k + 1])[0, 0] <= thr for k in keep):
            keep.append(i)
    return keep


def test_nms_equals_the_sequential_greedy_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xy = rng.uniform(0, 60, (80, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (80, 2))], 1)
        scores = rng.permutation(80) / 80
        got = nms(torch.tensor(boxes), torch.tensor(scores), 0.4).tolist()
        assert got == reference_nms(boxes, scores, 0.4)


def test_nms_in_blocks_of_rows_and_on_polygons_equals_the_greedy_definition():
    from obb import obb_to_poly, poly_iou_matrix
    rng = np.random.default_rng(1)
    for _ in range(5):
        xy = rng.uniform(0, 60, (90, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (90, 2))], 1)
        scores = rng.permutation(90) / 90
        assert nms(torch.tensor(boxes), torch.tensor(scores), 0.4, chunk=300).tolist() == \
            reference_nms(boxes, scores, 0.4)  # 3 rows per block
        obb = np.concatenate([xy, rng.uniform(5, 30, (90, 2)), rng.uniform(-1.5, 1.5, (90, 1))], 1)
        polys = obb_to_poly(obb).reshape(-1, 8)
        iou, order, keep = poly_iou_matrix(polys, polys), np.argsort(-scores, kind='stable'), []
        for i in order:
            if all(iou[k, i] <= 0.3 for k in keep):  # the kept box clips the candidate, as nms does
                keep.append(i)
        assert nms(torch.tensor(polys), torch.tensor(scores), 0.3, chunk=500).tolist() == keep


def test_merge_maps_tiles_back_and_removes_seam_duplicates():
    tiles = {  # the same object seen by two overlapping tiles, and one object at rate 0.5
        'P1__1__0___0': dets([[90, 10, 110, 30]], [0.9], [6]),
        'P1__1__80___0': dets([[10.5, 10, 30.5, 30], [50, 50, 60, 60]], [0.8, 0.7], [6, 6]),
        'P1__0.5__100___0': dets([[0, 0, 10, 10]], [0.6], [0]),
    }
    m = merge_tiles(tiles, 0.5)['P1']
    np.testing.assert_allclose(m['boxes'], [[90, 10, 110, 30], [130, 50, 140, 60], [200, 0, 220, 20]])
    assert m['scores'].tolist() == [0.9, 0.7, 0.6] and m['labels'].tolist() == [6, 6, 0]


def test_detector_boxes_round_trip_through_the_label_reader(tmp_path):
    from labels import Problems, load_labels
    d = {'A': dets([[1, 2, 30, 40.5], [5, 5, 9, 9]], [0.9, 0.1], [6, 0]),  # the 0.1 box is under the threshold
         'B': {'boxes': np.array([[10, 10, 20, 10, 20, 16, 10, 16.0]]), 'scores': np.array([0.5]),
               'labels': np.array([2])},  # an oriented model's polygon
         'C': dets([], [], [])}
    assert write_label_files(tmp_path, d, V1, 0.3, {'checkpoint': 'x.pt'}) == 2
    problems = Problems(strict=True)  # nothing to repair in what it wrote
    boxes, labels, diff = load_labels(tmp_path / 'A.txt', V1, 64, 64, problems)
    np.testing.assert_allclose(boxes, [[1, 2, 30, 40.5]])
    assert labels.tolist() == [6] and not diff.any()
    boxes, labels, _ = load_labels(tmp_path / 'B.txt', V1, 64, 64, problems)
    np.testing.assert_allclose(boxes, [[10, 10, 20, 16]])
    assert labels.tolist() == [2]
    assert parse_label_file(tmp_path / 'C.txt', V1)[0].shape == (0, 8)  # an image without boxes has its file
    side = json.loads((tmp_path / 'detections.json').read_text())
    assert side == {'checkpoint': 'x.pt', 'min_score': 0.3, 'images': 3, 'boxes': 2}


def test_submission_files_round_trip_and_bad_lines(tmp_path):
    d = {'A': dets([[1, 2, 3, 4.5]], [0.75], [6]), 'B': dets([], [], [])}
    write_submission(tmp_path / 'sub', d, V1)
    assert (tmp_path / 'sub' / 'Task2_ship.txt').read_text() == 'A 0.750000 1.00 2.00 3.00 4.50\n'
    back = read_submission(tmp_path / 'sub', V1, ['A', 'B'])
    np.testing.assert_allclose(back['A']['boxes'], [[1, 2, 3, 4.5]]) and len(back['B']['boxes']) == 0
    with pytest.raises(LabelError, match=r"Task2_ship.txt:1: image 'A' has no label file"):
        read_submission(tmp_path / 'sub', V1, ['B'])
    (tmp_path / 'sub' / 'Task2_plane.txt').write_text('A 0.5 1 2 3\n')
    with pytest.raises(LabelError, match=r"Task2_plane.txt:1: expected 'image score x1 y1 x2 y2'"):
        read_submission(tmp_path / 'sub', V1, ['A', 'B'])
    (tmp_path / 'sub' / 'Task2_plane.txt').unlink()
    (tmp_path / 'sub' / 'Task2_ufo.txt').write_text('')
    with pytest.raises(LabelError, match="unknown class 'ufo'"):
        read_submission(tmp_path / 'sub', V1, ['A', 'B'])


def test_real_sample_tiles_merge_back_and_offline_cli(dota_sample, tmp_path):
    split(dota_sample, tmp_path / 'tiles', size=512, gap=200, workers=2, classes=V1)
    manifest = json.loads((tmp_path / 'tiles' / 'manifest.json').read_text())
    # 'perfect' tile-level detections: each tile's own boxes, the cut copies (difficult = 2) scored lower
    tile_dets = {t['name']: dets(t['boxes'], np.where(np.array(t['difficult']) == 2, 0.3, 0.9)
                                 - np.linspace(0, 0.1, len(t['boxes'])), [V1.index(c) for c in t['labels']])
                 for t in manifest['tiles'] if t['boxes']}
    merged = merge_tiles(tile_dets, 0.5)
    write_submission(tmp_path / 'sub', merged, V1)
    gt = read_labels(dota_sample / 'labelTxt', V1)
    assert set(merged) == set(gt)
    res = evaluate_dota([merged[i] for i in gt], list(gt.values()), len(V1))
    # objects smaller than the 200 px overlap are whole in some tile: recovered once each, at the right place
    assert res['ap'][V1.index('ship')] > 0.95 and res['ap'][V1.index('small-vehicle')] > 0.95, res['ap']
    for protocol in ('dota', 'coco'):
        p = subprocess.run([sys.executable, ROOT / 'evaluate.py', '--dets', tmp_path / 'sub', '--labels',
                            dota_sample / 'labelTxt', '--protocol', protocol, '--sizes', '--errors', '--json',
                            tmp_path / f'{protocol}.json'], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        out = json.loads((tmp_path / f'{protocol}.json').read_text())
        if protocol == 'dota':
            assert out['map50_voc07'] == pytest.approx(res['ap'].mean())
            assert 'All (mAP)' in p.stdout and 'ship' in p.stdout
        else:
            assert out['classes']['ship']['n_gt'] == sum(int(((g['labels'] == 6) & ~g['difficult']).sum())
                                                         for g in gt.values())
            assert 'AP by object size' in p.stdout and 'sizes' in out
        ship = out['errors']['ship']  # perfect detections: the top #GT are the objects themselves
        assert ship['tp'] >= 0.95 * ship['n_gt'] and ship['found'] > 0.95 and 'dup' in p.stdout
    assert parse_label_file(dota_sample / 'labelTxt' / 'P0706.txt', V1)[1].tolist().count(6) == 531


def test_pr_curve_is_the_curve_whose_mean_is_ap50(tmp_path):
    from evaluate import plot_pr
    from metrics import evaluate_coco
    rng = np.random.default_rng(0)
    g = [gts(np.tile(rng.uniform(0, 50, (5, 2)), 2) + [0, 0, 10, 10], labels=rng.integers(0, 2, 5)) for _ in range(4)]
    p = [dets(x['boxes'] + rng.normal(0, 2, (5, 4)), rng.random(5), x['labels']) for x in g]
    res = evaluate_coco(p, g, 3)
    assert np.allclose(res['pr50'][:2].mean(1), res['ap'][:2, 0]) and np.isnan(res['pr50'][2]).all()
    assert (np.diff(res['pr50'][:2], axis=1) <= 0).all()  # interpolated: never rises with recall
    pytest.importorskip('matplotlib', reason='matplotlib draws the curve (optional)')
    assert plot_pr(res, ['a', 'b', 'c'], tmp_path / 'pr.png') and (tmp_path / 'pr.png').stat().st_size > 0
