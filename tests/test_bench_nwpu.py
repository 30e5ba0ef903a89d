"""bench/nwpu.py: its rows run end to end (on synthetic stand-in data), and the real set cuts as documented."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from data import DOTADataset
from labels import CLASSES
from prepare import make_synthetic, split as split_images


def test_every_kind_of_row_runs_and_leaves_a_checkpoint_a_probe_and_a_table(tmp_path):
    make_synthetic(tmp_path / 'src', n_train=8, n_val=2, size=128, seed=0)
    rows = 'scratch,jepa-object,jepa-object-frozen,pixels-random'
    cmd = [sys.executable, ROOT / 'bench' / 'nwpu.py', '--src', tmp_path / 'src', '--out', tmp_path / 'out', '--rows',
           rows, '--budget', 'both', '--model', 'test', '--patch-size', '8', '--img-size', '64', '--epochs', '3',
           '--pretrain-img-size', '32', '--pretrain-epochs', '2', '--pretrain-batch-size', '4',
           '--transfer-args', '--backbone-lr 0.5',
           '--finetune-args', '--head-dim 32 --batch-size 4 --eval-every 1']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index('row '):p.stdout.index('linear probe')].split('\n\n')[0].splitlines()
    cells = ['scratch', 'jepa-object', 'jepa-object@total', 'jepa-object-frozen', 'pixels-random',
             'pixels-random@total']
    assert [line.split()[0] for line in table[1:]] == cells
    assert 'AP50 small' in table[0] and 'loss/base' in table[0] and 'probe obj' in table[0]
    for cell in cells:
        assert (tmp_path / 'out' / cell / 'finetune' / 'best.pt').exists()
    # the frozen row reused jepa-object's pretraining: one pretraining log, and it counts those minutes too
    assert not (tmp_path / 'out' / 'jepa-object-frozen' / 'pretrain').exists()
    assert (tmp_path / 'out' / 'jepa-object' / 'pretrain' / 'log.jsonl').exists()
    res = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert set(res['rows']) == set(cells) and all(r['minutes'] > 0 for r in res['rows'].values())
    assert {'random weights', 'jepa-object (context)', 'jepa-object (EMA target)', 'pixels-random (context)',
            'fine-tuned scratch backbone'} == set(res['probes'])
    # a rerun asks for the same pretrainings, fine-tunes and evaluations: all reused, the same table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count('# reused') == 2 + 6 + 6 + 5  # pre, fine-tune, eval, probe
    assert again.stdout[again.stdout.index('row '):] == p.stdout[p.stdout.index('row '):]
    # half the labels, two fine-tuning seeds: the object-aware pretraining reads the labels of half the images only
    cmd[cmd.index(rows)] = 'scratch,jepa-object'
    half = subprocess.run([*cmd, '--label-fraction', '0.5', '--seeds', '2', '--no-probe'], capture_output=True,
                          text=True, timeout=600)
    assert half.returncode == 0, half.stdout[-3000:] + half.stderr[-3000:]
    assert f'# reused {tmp_path / "out" / "scratch" / "finetune"}' not in half.stdout
    pre = tmp_path / 'out' / 'jepa-object@0.5labels'
    assert '4 train images + 4 unlabelled' in (pre / 'pretrain.log').read_text()
    for cell in ('scratch@0.5labels', 'jepa-object@0.5labels', 'jepa-object@total@0.5labels'):
        for ft in ('finetune', 'finetune_s1'):
            assert (tmp_path / 'out' / cell / ft / 'best.pt').exists()
        assert '4 train tiles of 4 of 8 source images' in (tmp_path / 'out' / cell / 'finetune_s1.log').read_text()
    table = half.stdout[half.stdout.index('row '):].splitlines()
    assert 'mAP50 range' in table[0] and [line.split()[2] for line in table[1:4]] == ['2', '2', '2']  # seeds
    res = json.loads((tmp_path / 'out' / 'results.json').read_text())['rows']
    assert {k: len(v['seeds']) for k, v in res.items()} == {
        'scratch@0.5labels': 2, 'jepa-object@0.5labels': 2, 'jepa-object@total@0.5labels': 2}
    assert res['scratch@0.5labels']['map50'] == pytest.approx(np.mean([r['map50'] for r in
                                                                       res['scratch@0.5labels']['seeds']]))


def test_the_fair_split_leaves_no_label_of_an_unlabelled_image_where_the_pretraining_reads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import nwpu
    make_synthetic(tmp_path / 'src', n_train=8, n_val=1, size=64, seed=0)
    split_images(tmp_path / 'src' / 'train', tmp_path / 'data' / 'train', 48, 16, workers=1, classes=CLASSES['dota1.0'])
    fair = nwpu.fair_split(tmp_path / 'data', 0.25)
    full = DOTADataset(tmp_path / 'data', 'train', CLASSES['dota1.0'])
    labelled = DOTADataset(fair, 'train', CLASSES['dota1.0'])
    full.keep_sources(0.25)  # the tiles finetune.py --label-fraction 0.25 trains on
    assert [f.name for f in labelled.files] == [f.name for f in full.files] and len(labelled) == 2 * 4
    assert [t['boxes'].tolist() for t in labelled.targets] == [t['boxes'].tolist() for t in full.targets]
    # what the pretraining reads: no label files, and manifest records of the image alone
    assert not list(fair.rglob('*.txt'))
    records = json.loads((fair / 'unlabelled' / 'manifest.json').read_text())['tiles']
    assert len(records) == 6 * 4 and all(set(t) == {'name', 'file', 'width', 'height', 'content'} for t in records)
    assert not {t['name'] for t in records} & {f.stem for f in labelled.files}
    labelled.add_unlabelled(fair / 'unlabelled')
    assert len(labelled) == 32 and sum(len(t['boxes']) for t in labelled.targets[8:]) == 0
    # the held-back truth of those tiles lies outside it, for scoring the detector's boxes
    held = json.loads((tmp_path / 'data' / 'heldback@0.25' / 'unlabelled' / 'manifest.json').read_text())['tiles']
    assert [t['name'] for t in held] == [t['name'] for t in records] and any(t.get('labels') for t in held)
    assert nwpu.fair_split(tmp_path / 'data', 0) and not json.loads(
        (tmp_path / 'data' / 'fair@0' / 'train' / 'manifest.json').read_text())['tiles']  # F = 0: none labelled


def test_the_real_set_cuts_into_the_documented_half_resolution_tiles(nwpu, tmp_path):
    subprocess.run([sys.executable, ROOT / 'prepare.py', 'split', '--src', nwpu / 'val', '--dst', tmp_path / 'val',
                    '--size', '512', '--gap', '128', '--rates', '0.5'], check=True, capture_output=True, timeout=300)
    ds = DOTADataset(tmp_path, 'val', CLASSES['dota1.0'])
    assert len(ds) == 83
    boxes = np.concatenate([t['boxes'] for t in ds.targets])
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert 20 < np.median(side) < 45  # DOTA-small at half resolution, as SOURCE.md says (~32 px)


def test_the_cache_reruns_a_step_whose_defaults_or_code_version_changed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))  # not left on sys.path for the other tests
    import nwpu
    calls = []
    monkeypatch.setattr(nwpu, 'run', lambda log, *cmd: calls.append(cmd) or 60.0)  # 60 s, nothing run
    cmd = ['probe.py', '--ckpt', 'none', '--data', tmp_path]
    assert nwpu.cached(tmp_path, cmd, tmp_path / 'log') == 1.0 and len(calls) == 1
    assert nwpu.cached(tmp_path, cmd, tmp_path / 'log') == 1.0 and len(calls) == 1  # same command: reused
    record = json.loads((tmp_path / 'done.json').read_text())
    assert record['args']['steps'] == '300'  # probe.py's default, recorded
    record['args']['steps'] = '200'  # as if it had run when the default was 200
    (tmp_path / 'done.json').write_text(json.dumps(record))
    nwpu.cached(tmp_path, cmd, tmp_path / 'log')
    assert len(calls) == 2  # same command line, other defaults: run again
    record = json.loads((tmp_path / 'done.json').read_text())
    del record['version']  # as if it had run before the code changed (records without a version are version 1)
    (tmp_path / 'done.json').write_text(json.dumps(record))
    nwpu.cached(tmp_path, cmd, tmp_path / 'log')
    assert len(calls) == 3
    nwpu.cached(tmp_path, cmd, tmp_path / 'log', nwpu.PROBE_VERSION)  # a probe's own version: a probe of before,
    assert len(calls) == 4 and nwpu.PROBE_VERSION != nwpu.CODE_VERSION  # with the padding as background, reruns


def test_a_cut_without_the_image_parts_is_redone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))
    import nwpu
    calls = []
    monkeypatch.setattr(nwpu, 'run', lambda log, *cmd: calls.append(cmd) or 1.0)  # nothing run
    for split in ('train', 'val'):
        (tmp_path / 'src' / split / 'labelTxt').mkdir(parents=True)
        (tmp_path / 'dst' / split).mkdir(parents=True)
    tile = {'name': 'N1__0.5__0___0', 'file': 'images/N1__0.5__0___0.jpg', 'width': 512, 'height': 512}
    (tmp_path / 'dst' / 'train' / 'manifest.json').write_text(json.dumps({'tiles': [tile]}))  # an older cut
    (tmp_path / 'dst' / 'val' / 'manifest.json').write_text(json.dumps({'tiles': [{**tile, 'content': [480, 400]}]}))
    nwpu.prepare(tmp_path / 'src', tmp_path / 'dst')
    assert [c[1] for c in calls] == ['split'] and calls[0][5] == tmp_path / 'dst' / 'train'  # train only
