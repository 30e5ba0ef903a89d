"""The whole chain through the command lines, at toy size: synth -> pretrain -> finetune -> evaluate."""
import importlib
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, cwd):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f'{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p.stdout


@pytest.mark.parametrize('script', ['pretrain', 'finetune', 'evaluate'])
def test_every_flag_is_documented(script):
    parser = importlib.import_module(script).get_parser()
    actions = [a for a in parser._actions if a.dest != 'help']
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    common = {'data', 'batch_size', 'device', 'workers', 'out'}  # evaluate.py reads the model from its checkpoint
    if script != 'evaluate':
        common |= {'model', 'img_size', 'patch_size', 'seed'}
    assert common <= {a.dest for a in actions}


def test_prepare_cli_help():
    assert 'synth' in run(ROOT / 'prepare.py', '--help', cwd=ROOT)


def test_chain_end_to_end(tmp_path):
    data = tmp_path / 'synth'
    run(ROOT / 'prepare.py', 'synth', '--out', data, '--n-train', 16, '--n-val', 4, '--size', 64, cwd=tmp_path)
    common = ['--img-size', 64, '--batch-size', 8, '--workers', 0, '--device', 'cpu']
    out = run(ROOT / 'pretrain.py', '--data', data, '--model', 'test', '--patch-size', 8, '--epochs', 2,
              '--out', tmp_path / 'pre', *common, cwd=tmp_path)
    assert 'epoch 2: loss' in out and (tmp_path / 'pre' / 'last.pt').exists()
    out = run(ROOT / 'finetune.py', '--ckpt', tmp_path / 'pre' / 'last.pt', '--epochs', 2, '--eval-every', 1,
              '--head-dim', 32, '--out', tmp_path / 'ft', *common, cwd=tmp_path)
    assert 'best val mAP50' in out
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--workers', 0, '--json',
              tmp_path / 'e.json', cwd=tmp_path)
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith('Class'))
    assert lines[head].split() == ['Class', '#GT', '#Pred', 'Precision', 'Recall', 'mAP50', 'mAP50-95']
    assert lines[head + 1].split()[0] == 'All'
    result = json.loads((tmp_path / 'e.json').read_text())
    assert 0 <= result['map50'] <= 1 and result['classes']
    for k in range(1):
        assert (tmp_path / 'ft' / f'val_batch{k}_labels.jpg').exists()
        assert (tmp_path / 'ft' / f'val_batch{k}_pred.jpg').exists()
    # tiles -> full images: split the val images into overlapping tiles, merge the detections back, official number
    run(ROOT / 'prepare.py', 'split', '--src', data / 'val', '--dst', tmp_path / 'tiles' / 'val', '--size', 48, '--gap', 16,
        '--workers', 1, cwd=tmp_path)
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--data', tmp_path / 'tiles', '--merge',
              '--labels', data / 'val' / 'labelTxt', '--protocol', 'dota', '--workers', 0, '--json',
              tmp_path / 'm.json', cwd=tmp_path)
    assert 'All (mAP)' in out and (tmp_path / 'ft' / 'submission' / 'Task2_ship.txt').exists()
    merged = json.loads((tmp_path / 'm.json').read_text())
    assert merged['protocol'] == 'dota' and 0 <= merged['map50_voc07'] <= 1
    # the test split: images only, no labels -> submission files, no score
    run(ROOT / 'prepare.py', 'split', '--src', data / 'val', '--dst', tmp_path / 'tiles' / 'test', '--size', 48,
        '--gap', 16, '--workers', 1, '--images-only', cwd=tmp_path)
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--data', tmp_path / 'tiles', '--split',
              'test', '--merge', '--workers', 0, '--out', tmp_path / 'test_out', cwd=tmp_path)
    assert '4 images; submission files (no --labels, so no score)' in out
    lines = (tmp_path / 'test_out' / 'submission' / 'Task2_ship.txt').read_text().splitlines()
    assert lines and all(len(line.split()) == 6 for line in lines)  # image score x1 y1 x2 y2
    # the detector's boxes on those unlabelled tiles as label files, and a pretraining that masks them with those
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--data', tmp_path / 'tiles', '--split',
              'test', '--workers', 0, '--out', tmp_path / 'test_out', '--write-labels', tmp_path / 'boxes',
              '--label-conf', 0.0, cwd=tmp_path)
    tiles = sorted(p.stem for p in (tmp_path / 'tiles' / 'test' / 'images').glob('*'))
    assert sorted(p.stem for p in (tmp_path / 'boxes').glob('*.txt')) == tiles
    assert json.loads((tmp_path / 'boxes' / 'detections.json').read_text())['checkpoint'].endswith('best.pt')
    out = run(ROOT / 'pretrain.py', '--data', data, '--model', 'test', '--patch-size', 8, '--epochs', 1,
              '--unlabelled', tmp_path / 'tiles' / 'test', '--unlabelled-boxes', tmp_path / 'boxes',
              '--out', tmp_path / 'pre2', *common, cwd=tmp_path)
    assert f'16 train images + {len(tiles)} unlabelled' in out
    # from scratch
    out = run(ROOT / 'finetune.py', '--ckpt', 'none', '--model', 'test', '--patch-size', 8, '--data', data,
              '--epochs', 1, '--head-dim', 32, '--stride', 4, '--fine', 0, '--out', tmp_path / 'scratch', *common,
              cwd=tmp_path)
    assert 'best val mAP50' in out and 'stride 4' in out
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'scratch' / 'best.pt', '--workers', 0, cwd=tmp_path)
    assert out.splitlines()[0].split()[0] == 'Class'


def test_oriented_chain_end_to_end(tmp_path):
    """--boxes obb: fine-tune, evaluate on tiles (polygon IoU), merge tiles into images (polygon NMS) for the task-1
    number and Task1 files, and the test split's Task1 files; the pictures draw polygons."""
    data = tmp_path / 'synth'
    run(ROOT / 'prepare.py', 'synth', '--out', data, '--n-train', 16, '--n-val', 4, '--size', 64, '--rotated',
        cwd=tmp_path)
    run(ROOT / 'prepare.py', 'split', '--src', data / 'val', '--dst', tmp_path / 'tiles' / 'val', '--size', 48,
        '--gap', 16, '--workers', 1, cwd=tmp_path)
    run(ROOT / 'prepare.py', 'split', '--src', data / 'train', '--dst', tmp_path / 'tiles' / 'train', '--size', 48,
        '--gap', 16, '--workers', 1, cwd=tmp_path)
    out = run(ROOT / 'finetune.py', '--ckpt', 'none', '--model', 'test', '--patch-size', 8, '--data',
              tmp_path / 'tiles', '--boxes', 'obb', '--epochs', 2, '--eval-every', 1, '--head-dim', 32,
              '--img-size', 48, '--batch-size', 8, '--workers', 0, '--device', 'cpu', '--out',
              tmp_path / 'ft', cwd=tmp_path)
    assert 'detector (obb)' in out and 'best val mAP50' in out
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--merge', '--labels',
              data / 'val' / 'labelTxt', '--workers', 0, '--json', tmp_path / 'm.json', cwd=tmp_path)
    assert 'All (mAP)' in out and 'Task1_<class>.txt' in out
    lines = (tmp_path / 'ft' / 'submission' / 'Task1_ship.txt').read_text().splitlines()
    assert lines and all(len(line.split()) == 10 for line in lines)  # image score x1 y1 ... x4 y4
    assert not (tmp_path / 'ft' / 'submission' / 'Task2_ship.txt').exists()
    merged = json.loads((tmp_path / 'm.json').read_text())
    assert merged['protocol'] == 'dota' and 0 <= merged['map50_voc07'] <= 1
    # offline: the files just written, read back as task 1, give the same number
    out = run(ROOT / 'evaluate.py', '--dets', tmp_path / 'ft' / 'submission', '--labels', data / 'val' / 'labelTxt',
              '--protocol', 'dota', '--json', tmp_path / 'o.json', cwd=tmp_path)
    offline = json.loads((tmp_path / 'o.json').read_text())
    assert offline['map50_voc07'] == pytest.approx(merged['map50_voc07'], abs=1e-3)
    assert (tmp_path / 'ft' / 'val_batch0_pred.jpg').exists()
    # the val tiles: task 1 (the model's own) and task 2 (the axis-aligned boxes of its oriented ones)
    for task in (1, 2):
        run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--task', task, '--workers', 0, '--json',
            tmp_path / f't{task}.json', '--out', tmp_path / f'eval{task}', cwd=tmp_path)
        assert 0 <= json.loads((tmp_path / f't{task}.json').read_text())['map50'] <= 1
    out = run(ROOT / 'evaluate.py', '--ckpt', tmp_path / 'ft' / 'best.pt', '--task', 2, '--merge', '--labels',
              data / 'val' / 'labelTxt', '--workers', 0, '--out', tmp_path / 'eval2', cwd=tmp_path)
    assert (tmp_path / 'eval2' / 'submission' / 'Task2_ship.txt').exists()
