"""The coco protocol on hand-worked cases, and against pycocotools on random cases."""
import numpy as np
import pytest

from conftest import dets, gts
from evaluate import format_table, summary
from metrics import IOU_THRS, box_iou, evaluate_coco as evaluate, match_image, match_sequential

HALF = 51 / 101  # AP when precision is 1 up to recall 0.5 and nothing is found beyond: 51 of 101 recall points


A, B = [0, 0, 10, 10], [20, 20, 30, 30]


def test_duplicate_detection_is_a_false_positive():
    res = evaluate([dets([A, A], [0.9, 0.8])], [gts([A, B])], 1)
    np.testing.assert_allclose(res['ap'][0], HALF)
    assert res['n_gt'][0] == 2 and res['n_pred'][0] == 2


def test_perfect_detection_of_one_of_two():
    res = evaluate([dets([A], [0.9])], [gts([A, B])], 1)
    np.testing.assert_allclose(res['ap'][0], HALF)
    assert res['recall'][0] == pytest.approx(0.5) and res['precision'][0] == pytest.approx(1.0)


def test_300_objects_in_one_image_no_cap():
    xy = np.stack(np.meshgrid(np.arange(20), np.arange(15)), -1).reshape(-1, 2) * 12.0  # 300 boxes of 10 px
    boxes = np.concatenate([xy, xy + 10], 1)
    res = evaluate([dets(boxes, np.linspace(1, 0.5, 300))], [gts(boxes)], 1)
    np.testing.assert_allclose(res['ap'][0], 1.0)
    # a cap of 100 detections (pycocotools' default) would find a third of them
    capped = evaluate([dets(boxes, np.linspace(1, 0.5, 300))], [gts(boxes)], 1, max_dets=100)
    assert capped['ap'][0, 0] < 0.35


@pytest.mark.parametrize('hit', [True, False])
def test_difficult_ground_truth(hit):
    det = dets([A, B], [0.9, 0.8]) if hit else dets([A], [0.9])
    ignore = evaluate([det], [gts([A, B], difficult=[0, 1])], 1, difficult='ignore')
    normal = evaluate([det], [gts([A, B], difficult=[0, 1])], 1, difficult='normal')
    np.testing.assert_allclose(ignore['ap'][0], 1.0)  # a hit on a difficult GT is neither TP nor FP
    assert ignore['n_gt'][0] == 1 and normal['n_gt'][0] == 2
    np.testing.assert_allclose(normal['ap'][0], 1.0 if hit else HALF)


def test_iou_just_below_threshold_is_a_miss():
    gt = [0, 0, 100, 100]
    det = [0, 0, 100, 48]  # IoU 0.48
    assert box_iou(np.array([det]), np.array([gt]))[0, 0] == pytest.approx(0.48)
    res = evaluate([dets([det], [0.9])], [gts([gt])], 1)
    np.testing.assert_allclose(res['ap'][0], 0.0)


def test_tied_scores_keep_input_order():
    far = [50, 50, 60, 60]
    fp_first = evaluate([dets([far, A], [0.5, 0.5])], [gts([A])], 1)
    tp_first = evaluate([dets([A, far], [0.5, 0.5])], [gts([A])], 1)
    np.testing.assert_allclose(fp_first['ap'][0], 0.5)
    np.testing.assert_allclose(tp_first['ap'][0], 1.0)


def test_class_with_gt_and_no_detections_scores_zero_and_table_prints():
    res = evaluate([dets([A], [0.9], [0])], [gts([A, B], labels=[0, 1])], 2)
    np.testing.assert_allclose(res['ap'][1], 0.0)
    names = ['plane', 'ship']
    table = format_table(res, names)
    assert table.splitlines()[0].split() == ['Class', '#GT', '#Pred', 'Precision', 'Recall', 'mAP50', 'mAP50-95']
    assert [r.split()[0] for r in table.splitlines()[1:]] == ['All', 'plane', 'ship']
    assert summary(res, names)['map50'] == pytest.approx(0.5)


def _coco_ap(gt_list, det_list, num_classes):
    """Per-class AP (C, T) from pycocotools with maxDets raised and one 'all' area range."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, anns, results = [], [], []
    for i, (g, d) in enumerate(zip(gt_list, det_list)):
        images.append({'id': i, 'width': 1000, 'height': 1000})
        for b, c in zip(g['boxes'], g['labels']):
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': int(c), 'iscrowd': 0,
                         'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]], 'area': (b[2] - b[0]) * (b[3] - b[1])})
        for b, s, c in zip(d['boxes'], d['scores'], d['labels']):
            results.append({'image_id': i, 'category_id': int(c), 'score': float(s),
                            'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': anns,
                    'categories': [{'id': c} for c in range(num_classes)]}
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(results), 'bbox')
    ev.params.maxDets, ev.params.areaRng, ev.params.areaRngLbl = [10000], [[0, 1e10]], ['all']
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval['precision'][:, :, :, 0, 0]  # (T, R, K)
    return np.where((prec > -1).all(1), prec.mean(1), np.nan).T  # (K, T)


def random_case(rng, num_classes=3):
    gt_list, det_list = [], []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(0, 15))
        xy = rng.integers(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(4, 60, (n, 2))], 1).astype(float)
        labels = rng.integers(0, num_classes, n)
        gt_list.append(gts(boxes, labels))
        jitter = boxes + rng.normal(0, 3, boxes.shape)  # near-hits, some duplicates, some junk
        twice = rng.random(n) < 0.3
        dup = boxes[twice] + rng.normal(0, 3, (int(twice.sum()), 4))
        m = int(rng.integers(0, 8))
        junk_xy = rng.uniform(0, 200, (m, 2))
        junk = np.concatenate([junk_xy, junk_xy + rng.uniform(4, 60, (m, 2))], 1)
        keep = rng.random(n) < 0.85
        dboxes = np.concatenate([jitter[keep], dup, junk])
        dlabels = np.concatenate([labels[keep], labels[twice], rng.integers(0, num_classes, m)])
        dboxes[:, 2:] = np.maximum(dboxes[:, 2:], dboxes[:, :2] + 1)
        det_list.append(dets(dboxes, rng.permutation(len(dboxes)) / len(dboxes) * 0.9 + rng.random() * 0.05,
                             dlabels))
    return gt_list, det_list


def test_matches_pycocotools_on_random_cases():
    pytest.importorskip('pycocotools', reason='pycocotools is in requirements-dev.txt')
    rng = np.random.default_rng(0)
    compared = 0
    while compared < 60:
        gt_list, det_list = random_case(rng)
        if sum(len(d['boxes']) for d in det_list) == 0:
            continue  # pycocotools cannot load an empty result list
        scores = np.concatenate([d['scores'] for d in det_list])
        if len(np.unique(scores)) < len(scores):
            continue  # tie order is implementation-defined between images; unique scores only
        ours = evaluate(det_list, gt_list, 3)['ap']
        theirs = _coco_ap(gt_list, det_list, 3)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9, equal_nan=True)
        compared += 1


def test_loop_free_matching_equals_the_sequential_rule():
    rng = np.random.default_rng(1)
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[:, None]
    fast = 0
    for _ in range(200):
        xy = rng.integers(0, 300, (12, 2))
        gt = np.concatenate([xy, xy + rng.integers(5, 60, (12, 2))], 1).astype(float)
        if rng.random() < 0.5:  # a grid of disjoint GT, the common case in aerial images
            xy = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * 70.0
            gt = np.concatenate([xy, xy + rng.uniform(10, 60, (12, 2))], 1)
        det = np.concatenate([gt, gt, gt])[rng.permutation(36)[:20]] + rng.normal(0, 4, (20, 4))
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        ignore = rng.random(12) < 0.2
        got = match_image(det, gt, ignore)
        want = match_sequential(box_iou(det, gt), ignore, thr)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        fast += int(((box_iou(det, gt) >= 0.5).sum(1) <= 1).all())
    assert 50 < fast < 200  # both paths were exercised


def test_error_breakdown_counts_each_kind_once_in_the_top_n_gt():
    from metrics import error_breakdown
    gt = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10],  # class 0: A..E
          [0, 40, 10, 50],  # class 1: F
          [40, 40, 50, 50]]  # class 0, difficult: G
    det = [[40, 40, 50, 50],  # on the difficult G: left out, as in the AP
           [0, 0, 10, 10],  # A: tp
           [0, 0, 10, 10],  # A again: dup
           [25, 0, 35, 10],  # B shifted by half a box, IoU 1/3: loc
           [0, 40, 10, 50],  # F, another class's object: cls
           [0, 80, 10, 90],  # nothing there: bg
           [40, 0, 50, 10]]  # C: a tp, but 6th of the 5 that count (n_gt = 5)
    err = error_breakdown([dets(det, [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1])],
                          [gts(gt, [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1])], 2)
    assert err['n_gt'].tolist() == [5, 1]
    assert [int(err[k][0]) for k in ('tp', 'dup', 'loc', 'cls', 'bg')] == [1, 1, 1, 1, 1]
    assert err['found'][0] == pytest.approx(2 / 5) and err['found'][1] == 0  # A and C reached; F by no class-1 det
