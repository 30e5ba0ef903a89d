"""The timing benchmarks run, and time the detector finetune.py builds by default (a bench nobody runs breaks
silently: finetune_bench.py once did, when the matcher gained an argument)."""
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT


def test_finetune_bench_times_the_default_detector_and_compares_the_matchers():
    cmd = [sys.executable, ROOT / 'bench' / 'finetune_bench.py', '--model', 'test', '--img-size', '64',
           '--batch-size', '2', '--steps', '1']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'the dense head' in p.stdout and 'share of the step spent matching' in p.stdout
    assert 'stride-8 level under 32 px' in p.stdout and 'the level costs' in p.stdout  # and its same-run baseline


def test_gpu_check_fine_tuning_step_runs_on_a_cpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import gpu_check
    args = SimpleNamespace(model='test', img_size=64, batch_size=2, steps=1, warmup=1, device='cpu')
    seconds, _ = gpu_check.measure_finetune(args, n_objects=5)
    assert seconds > 0


def test_positions_bench_moves_only_the_positions(tmp_path, monkeypatch):
    import pretrain
    from prepare import make_synthetic
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import positions
    make_synthetic(tmp_path / 'data', n_train=8, n_val=2, size=32, seed=1)
    pretrain.main(['--data', str(tmp_path / 'data'), '--model', 'test', '--img-size', '16', '--patch-size', '8',
                   '--batch-size', '4', '--epochs', '1', '--workers', '0', '--device', 'cpu', '--out',
                   str(tmp_path / 'pre')])
    common = ['--ckpt', str(tmp_path / 'pre' / 'last.pt'), '--data', str(tmp_path / 'data'), '--crop', '16']
    same = positions.main(common + ['--shift', '0'])
    assert same['at_0'] == same['shifted'] > 0  # the same pixels and masks: only the positions may differ
    moved = positions.main(common)  # shifted by 2 patches
    assert moved['at_0'] == same['at_0'] and moved['shifted'] != moved['at_0']


def test_heldout_bench_scores_both_splits_with_the_same_crops_and_masks_for_every_checkpoint(tmp_path, monkeypatch):
    import pretrain
    from prepare import make_synthetic
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import heldout
    make_synthetic(tmp_path / 'data', n_train=8, n_val=4, size=32, seed=1)
    common = ['--data', str(tmp_path / 'data'), '--model', 'test', '--img-size', '16', '--patch-size', '8',
              '--batch-size', '4', '--workers', '0', '--device', 'cpu']
    pretrain.main(common + ['--epochs', '1', '--out', str(tmp_path / 'a')])
    pretrain.main(common + ['--epochs', '2', '--out', str(tmp_path / 'b')])
    score = lambda run: heldout.main(['--ckpt', str(tmp_path / run / 'last.pt'), '--data', str(tmp_path / 'data'),  # noqa: E731
                                      '--batch-size', '4', '--passes', '2'])
    a, b = score('a'), score('b')
    assert set(a) == {(s, m) for s in ('train', 'val') for m in ('object', 'random')}
    assert all(r > 0 for r in a.values()) and a == score('a')  # deterministic: crops and masks fixed
    assert a != b  # another checkpoint, another loss on the same crops


def test_object_masks_hide_object_patches_no_more_often_than_random_ones_unless_object_keep_is_lowered(tmp_path,
                                                                                                       monkeypatch):
    """The masking arithmetic behind NWPU's level rows: at mask ratio 0.75 a kept share of 0.25 hides 75 % of the
    object patches, as random masks do; only object_keep < 1 - mask_ratio makes the hidden set prefer objects."""
    from prepare import make_synthetic, split
    from labels import CLASSES
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import mask_overlap
    make_synthetic(tmp_path / 'src', n_train=16, n_val=1, size=64, seed=0)
    split(tmp_path / 'src' / 'train', tmp_path / 'data' / 'train', 64, 16, workers=1, classes=CLASSES['dota1.0'])
    common = ['--data', str(tmp_path / 'data'), '--img-size', '64', '--patch-size', '8', '--label-fraction', '0.25']
    default = mask_overlap.main(common)
    assert abs(default['object-gt']['box_hidden'] - default['random']['box_hidden']) < 0.05  # both about 0.75
    hide_all = mask_overlap.main(common + ['--object-keep', '0'])
    assert hide_all['object-gt']['box_hidden'] > 0.99 > hide_all['random']['box_hidden'] + 0.15
    assert hide_all['object-gt']['hidden_on_box'] > hide_all['random']['hidden_on_box']


def test_pseudo_boxes_finds_what_the_box_files_cover_and_names_a_tile_without_truth(tmp_path, monkeypatch):
    import pytest
    from prepare import make_synthetic
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import pseudo_boxes
    make_synthetic(tmp_path / 'src', n_train=4, n_val=1, size=64, seed=0)
    truth, boxes = tmp_path / 'src' / 'train' / 'labelTxt', tmp_path / 'boxes'
    boxes.mkdir()
    lines = {f.name: [ln for ln in f.read_text().splitlines() if ln[:1].isdigit()] for f in truth.glob('*.txt')}
    n = sum(map(len, lines.values()))
    for name, rows in lines.items():  # the truth itself, less the first object of each tile, plus one box on nothing
        (boxes / name).write_text('\n'.join(rows[1:] + ['0 0 1 0 1 1 0 1 plane 0']) + '\n')
    res = pseudo_boxes.main(['--boxes', str(boxes), '--truth', str(truth)])
    dropped = sum(1 for rows in lines.values() if rows)
    assert res['found']['all'] == pytest.approx(((n - dropped) / n,) * 2)
    assert res['boxes'] == n - dropped + len(lines) and res['on_object'] == pytest.approx((n - dropped) / res['boxes'])
    (boxes / 'stray.txt').write_text('')
    with pytest.raises(SystemExit, match='stray.txt: no truth'):
        pseudo_boxes.main(['--boxes', str(boxes), '--truth', str(truth)])


def test_yolo_side_by_side_without_ultralytics_says_how_to_install_it():
    p = subprocess.run([sys.executable, ROOT / 'bench' / 'yolo_side_by_side.py', '--yolo-python', 'no-such-python'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and 'pip install' in p.stderr and 'ultralytics' in p.stderr
    assert 'Traceback' not in p.stderr


def test_yolo_labels_hold_the_boxes_the_project_trains_on(tmp_path, monkeypatch):
    import numpy as np

    from data import DOTADataset
    from labels import CLASSES
    from prepare import make_synthetic
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    from yolo_side_by_side import yolo_dataset
    make_synthetic(tmp_path / 'synth', n_train=3, n_val=2, size=64, seed=0)
    yolo_dataset(tmp_path / 'synth', tmp_path / 'yolo', CLASSES['dota1.0'], size=64)
    assert 'train: images/train' in (tmp_path / 'yolo' / 'data.yaml').read_text()
    for split in ('train', 'val'):
        ds = DOTADataset(tmp_path / 'synth', split, CLASSES['dota1.0'])
        assert len(ds.files) == len(list((tmp_path / 'yolo' / 'images' / split).iterdir()))
        for f, t in zip(ds.files, ds.targets):
            rows = np.loadtxt(tmp_path / 'yolo' / 'labels' / split / f'{f.stem}.txt', ndmin=2)
            cxcy, wh = rows[:, 1:3] * 64, rows[:, 3:5] * 64
            assert len(rows) == len(t['boxes']) > 0 and (rows[:, 0] == t['labels']).all()
            np.testing.assert_allclose(np.concatenate([cxcy - wh / 2, cxcy + wh / 2], 1), t['boxes'], atol=1e-3)
