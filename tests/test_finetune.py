"""The fine-tuning recipe: the backbone's lr, frozen backbone, the matcher, dataset diagnostics, DDP, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from data import DOTADataset, Loader
from labels import CLASSES
from detector import Detector, outside_cell
from matcher import MinCostMatcher, assign_min_cost
from finetune import lr_parts, shared_centre_share
from model import build_vit, param_groups
from prepare import make_synthetic


def test_the_backbone_lr_scale_covers_every_parameter_once():
    det = Detector(build_vit('mini', 8), 15)
    groups = param_groups(lr_parts(det, 0.1), 0.05)
    seen = [id(p) for g in groups for p in g['params']]
    assert sorted(seen) == sorted(id(p) for p in det.parameters()) and len(seen) == len(set(seen))
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    assert {scale[id(p)] for p in det.backbone.parameters()} == {0.1}  # --backbone-lr 0.1
    assert scale[id(det.cls.weight)] == 1.0 and scale[id(det.prior.layers[0].weight)] == 1.0


def test_frozen_backbone_is_left_out_of_the_optimizer():
    det = Detector(build_vit('test', 8), 3)
    det.backbone.requires_grad_(False)
    params = {id(p) for g in param_groups(lr_parts(det), 0.05) for p in g['params']}
    assert not params & {id(p) for p in det.backbone.parameters()} and id(det.cls.weight) in params


def test_hungarian_is_never_worse_than_the_greedy_rule():
    pytest.importorskip('scipy', reason='scipy is in requirements-dev.txt')
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    worse = 0
    for _ in range(50):
        cost = torch.tensor(rng.random((30, 12)))
        r, c = assign_min_cost(cost)
        hr, hc = linear_sum_assignment(cost.numpy())
        greedy, best = cost[r, c].sum().item(), cost.numpy()[hr, hc].sum()
        assert best <= greedy + 1e-12
        worse += greedy > best + 1e-12
    assert worse > 0  # on random costs the greedy rule is not optimal: the comparison is informative
    det = Detector(build_vit('test', 8), 2)
    out = det(torch.zeros(1, 3, 32, 32))
    gt = torch.tensor([[9.0, 9, 12, 12], [12.5, 9, 15.5, 12]])
    pi, gi = MinCostMatcher()(out['logits'][0], out['boxes'][0], out['centres'][0], gt, torch.tensor([0, 1]),
                              out['stride'], out['claim'])
    assert len(set(pi.tolist())) == 2 and sorted(gi.tolist()) == [0, 1]


def test_shared_centre_share():
    class DS:
        targets = [{'boxes': np.array([[0, 0, 4, 4], [4, 4, 8, 8], [20, 20, 30, 30]], np.float32)},
                   {'boxes': np.zeros((0, 4), np.float32)}]
    assert shared_centre_share(DS, 8) == pytest.approx(2 / 3)  # centres (2,2), (6,6) share cell (0,0)
    assert shared_centre_share(DS, 4) == 0.0


def test_loader_ranks_split_each_epoch_into_disjoint_equal_shares(tmp_path):
    make_synthetic(tmp_path, n_train=11, n_val=0, size=32, seed=0)
    ds = DOTADataset(tmp_path, 'train', CLASSES['dota1.0'], img_size=32, train=True)
    names = []
    for rank in range(2):
        torch.manual_seed(3)  # every rank starts from the same seed
        loader = Loader(ds, 2, 8, workers=0, shuffle=True, drop_last=True, rank=rank, world=2)
        names.append([t['name'] for _ in range(2) for _, targets in loader for t in targets])  # two epochs
        assert len(loader) == 2
    assert len(names[0]) == len(names[1]) == 8
    for epoch in range(2):
        a, b = (set(n[4 * epoch:4 * epoch + 4]) for n in names)
        assert len(a) == len(b) == 4 and not a & b


def test_ddp_fine_tuning_runs_on_two_cpu_processes(tmp_path):
    make_synthetic(tmp_path / 'synth', n_train=8, n_val=2, size=32, seed=0)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           str(ROOT / 'finetune.py'), '--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data',
           str(tmp_path / 'synth'), '--img-size', '32', '--batch-size', '2', '--epochs', '1', '--head-dim', '32',
           '--workers', '0', '--device', 'cpu', '--out', str(tmp_path / 'ft')]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert '2 process(es)' in p.stdout and (tmp_path / 'ft' / 'best.pt').exists()


def test_a_resumed_fine_tune_prints_the_same_table_as_an_uninterrupted_one(tmp_path, capsys):
    from finetune import main
    make_synthetic(tmp_path / 'synth', n_train=16, n_val=4, size=32, seed=0)
    flags = ['--ckpt', 'none', '--model', 'mini', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
             '--img-size', '32', '--batch-size', '4', '--epochs', '2', '--eval-every', '1', '--head-dim', '32',
             '--workers', '2', '--device', 'cpu', '--lr', '1e-3']

    def final_table(out):
        return out[out.rindex('epoch 2 ('):].split('\n', 1)[1].split('; saved')[0]  # no time, no paths
    main(flags + ['--out', str(tmp_path / 'full')])
    full = capsys.readouterr().out
    main(flags + ['--out', str(tmp_path / 'part'), '--max-steps', '3'])  # stops inside epoch 1 (4 steps each)
    assert 'stopped at --max-steps 3' in capsys.readouterr().out
    ck = torch.load(tmp_path / 'part' / 'last.pt', weights_only=True)
    assert (ck['step'], ck['epoch'], ck['batch']) == (3, 0, 3)
    torch.save({**ck, 'seconds': 1000.0}, tmp_path / 'part' / 'last.pt')  # as if the first part had run 1000 s
    main(flags + ['--out', str(tmp_path / 'part'), '--resume', 'auto'])
    rest = capsys.readouterr().out
    assert 'resumed from' in rest and 'epoch 1, batch 3, step 3' in rest
    assert final_table(rest) == final_table(full) and 'All' in final_table(full)
    a, b = (torch.load(tmp_path / d / 'last.pt', weights_only=True) for d in ('full', 'part'))
    assert a['step'] == b['step'] == 8
    assert all(torch.equal(a['model'][n], b['model'][n]) for n in a['model'])  # exact, not approximately
    epochs = lambda d: [r.split(',')[0] for r in (tmp_path / d / 'results.csv').read_text().splitlines()]  # noqa
    assert epochs('part') == epochs('full') == ['epoch', '1', '2']
    seconds = [float(r.split(',')[1]) for r in (tmp_path / 'part' / 'results.csv').read_text().splitlines()[1:]]
    assert 1000 <= seconds[0] <= seconds[1] < 1000 + 600  # the run's clock, not the resumed process's
    main(flags + ['--out', str(tmp_path / 'part'), '--epochs', '1'])  # a fresh run into the same OUT
    assert epochs('part') == ['epoch', '1']  # its own rows, not appended to the last run's


def test_results_csv_every_epoch_and_the_curves_only_with_matplotlib(tmp_path, monkeypatch):
    from finetune import main
    make_synthetic(tmp_path / 'synth', n_train=8, n_val=2, size=32, seed=0)
    flags = ['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
             '--img-size', '32', '--batch-size', '4', '--epochs', '3', '--eval-every', '2', '--head-dim', '32',
             '--workers', '0', '--device', 'cpu']
    import evaluate
    monkeypatch.setattr(evaluate, '_pyplot', lambda: None)  # what it returns when matplotlib is not installed
    main(flags + ['--fine', '0', '--out', str(tmp_path / 'no_mpl')])
    model, _ = evaluate.load_detector(tmp_path / 'no_mpl' / 'best.pt', torch.device('cpu'))  # the options rebuilt
    assert model.prior is not None and model.fine == 0
    lines = (tmp_path / 'no_mpl' / 'results.csv').read_text().splitlines()
    head, rows = lines[0].split(','), [line.split(',') for line in lines[1:]]
    assert head[:4] == ['epoch', 'seconds', 'lr', 'loss'] and head[-2:] == ['mAP50', 'mAP50-95'] and 'giou' in head
    assert [r[0] for r in rows] == ['1', '2', '3'] and all(len(r) == len(head) for r in rows)
    assert rows[0][-1] == '' and rows[1][-1] != '' and rows[2][-1] != ''  # evaluated at epochs 2 and 3 only
    assert not (tmp_path / 'no_mpl' / 'results.png').exists() and not (tmp_path / 'no_mpl' / 'PR_curve.png').exists()
    monkeypatch.undo()
    pytest.importorskip('matplotlib', reason='matplotlib draws results.png (optional)')
    main(flags + ['--no-spatial-prior', '--out', str(tmp_path / 'mpl')])
    assert (tmp_path / 'mpl' / 'results.png').stat().st_size > 0 and (tmp_path / 'mpl' / 'PR_curve.png').exists()


def test_time_budget_sets_the_epochs_from_the_time_per_epoch(tmp_path, capsys):
    import time
    from finetune import main
    from runtime import epochs_in_budget
    t0 = time.time() - 10  # 10 s for 2 epochs: 5 s each
    assert epochs_in_budget(1.0, t0, epoch=1, ddp=False) == 11  # 60 s / 5.x s
    assert epochs_in_budget(0.1, t0, epoch=1, ddp=False) == 2  # spent: stop after this epoch
    # a resumed run: its clock starts the checkpoint's seconds back, so 9 s for 9 epochs leave 51 s at 1 s each
    assert epochs_in_budget(1.0, time.time() - 9, epoch=8, ddp=False) == 59
    make_synthetic(tmp_path / 'synth', n_train=8, n_val=2, size=32, seed=0)
    main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'), '--img-size',
          '32', '--batch-size', '4', '--epochs', '50', '--eval-every', '10', '--head-dim', '32', '--workers', '0',
          '--device', 'cpu', '--time', '0.0001', '--out', str(tmp_path / 'run')])
    rows = (tmp_path / 'run' / 'results.csv').read_text().splitlines()[1:]
    assert len(rows) == 1 and rows[0].split(',')[-1] != ''  # one epoch, and it was the last: evaluated
    assert torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)['epoch'] == 1


def test_a_resumed_time_budgeted_run_keeps_the_epochs_the_budget_set(tmp_path, monkeypatch, capsys):
    import runtime
    from finetune import main
    monkeypatch.setattr(runtime, 'epochs_in_budget', lambda *a: 3)  # the budget fits 3 epochs, whatever the clock
    make_synthetic(tmp_path / 'synth', n_train=16, n_val=4, size=32, seed=0)
    flags = ['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
             '--img-size', '32', '--batch-size', '4', '--epochs', '50', '--time', '60', '--warmup-epochs', '0',
             '--eval-every', '3', '--head-dim', '32', '--workers', '0', '--device', 'cpu', '--lr', '1e-3']
    main(flags + ['--out', str(tmp_path / 'full')])
    main(flags + ['--out', str(tmp_path / 'part'), '--max-steps', '6'])  # killed inside epoch 2 (4 steps each)
    main(flags + ['--out', str(tmp_path / 'part'), '--resume', 'auto'])
    bars = capsys.readouterr().err  # tqdm's: all three runs
    assert 'epoch 2/3' in bars and 'epoch 2/50' not in bars  # not 2/50: the lr schedule spans the budget's 3 epochs
    a, b = (torch.load(tmp_path / d / 'last.pt', weights_only=True) for d in ('full', 'part'))
    assert a['step'] == b['step'] == 12 and a['args']['epochs'] == b['args']['epochs'] == 3
    assert all(torch.equal(a['model'][n], b['model'][n]) for n in a['model'])


@pytest.mark.parametrize('flags,stride,fine', [(['--patch-size', '16'], 16, 32), (['--patch-size', '8'], 8, 16),
                                               (['--patch-size', '16', '--stride', '8'], 8, 16),
                                               (['--patch-size', '8', '--stride', '4'], 4, 0),
                                               (['--patch-size', '16', '--fine', '0'], 16, 0)])
def test_default_maps_the_patch_grid_and_a_finer_one_for_objects_under_two_cells(flags, stride, fine):
    from finetune import build, get_parser
    args = get_parser().parse_args(['--ckpt', 'none', '--model', 'test', '--head-dim', '32', *flags])
    det = build(args)
    assert (det.stride, det.fine, args.stride, args.fine) == (stride, fine, stride, fine)  # args: what the ckpt keeps


def test_a_fine_level_trains_and_evaluate_rebuilds_it_from_the_checkpoint(tmp_path):
    from evaluate import load_detector
    from finetune import main
    make_synthetic(tmp_path / 'synth', n_train=8, n_val=2, size=32, seed=0)
    main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
          '--img-size', '32', '--batch-size', '4', '--epochs', '1', '--head-dim', '32', '--workers', '0',
          '--device', 'cpu', '--fine', '12', '--ring-boxes', '0.5', '--centre-gate', '0.1',
          '--out', str(tmp_path / 'ft')])
    with pytest.raises(SystemExit, match='needs stride >= 8'):  # no room for a map at stride 2: an error
        main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
              '--stride', '4', '--fine', '16', '--out', str(tmp_path / 'dec')])
    with pytest.raises(SystemExit, match=r'^--stride 3: stride 3 must be the patch size 8'):  # --fine unset: unnamed
        main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'),
              '--stride', '3', '--out', str(tmp_path / 'dec')])
    model, ck = load_detector(tmp_path / 'ft' / 'last.pt', 'cpu')  # strict: every key of the fine level loads
    out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert model.fine == 12 and out['logits'].shape[1] == 4 * 4 + 8 * 8
    # the centre gate on a two-level map: each cell measured in its own level's cells
    c = (out['boxes'][..., :2] + out['boxes'][..., 2:]) / 2
    far = ((c - out['centres']).abs().amax(-1) / out['stride']) > 0.6
    assert torch.equal(outside_cell(out, 0.1), far) and ck['args']['centre_gate'] == 0.1
    # evaluate.py applies the checkpoint's gate unless told otherwise
    from evaluate import main as evaluate
    n_pred = {}
    for gate in (None, '0.1', '-1'):
        js = tmp_path / f'{gate}.json'
        evaluate(['--ckpt', str(tmp_path / 'ft' / 'last.pt'), '--workers', '0', '--device', 'cpu', '--conf', '0',
                  '--json', str(js)] + ([] if gate is None else ['--centre-gate', gate]))
        n_pred[gate] = sum(c['n_pred'] for c in json.loads(js.read_text())['classes'].values())
    assert n_pred[None] == n_pred['0.1'] <= n_pred['-1']


def test_label_fraction_trains_on_the_tiles_of_fewer_images(tmp_path, capsys):
    from finetune import main
    make_synthetic(tmp_path / 'synth', n_train=8, n_val=2, size=32, seed=0)
    main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'), '--img-size',
          '32', '--batch-size', '2', '--epochs', '1', '--head-dim', '32', '--workers', '0', '--device', 'cpu',
          '--label-fraction', '0.5', '--out', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    assert '--label-fraction 0.5: 4 train tiles of 4 of 8 source images' in out
    assert '4 train / 2 val images' in out  # what the detector trained on, val unchanged


def test_a_checkpoint_of_a_removed_option_names_it_and_the_commit_that_has_it(tmp_path):
    from evaluate import load_detector
    from finetune import main
    make_synthetic(tmp_path / 'synth', n_train=4, n_val=1, size=32, seed=0)
    main(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--data', str(tmp_path / 'synth'), '--img-size',
          '32', '--batch-size', '4', '--epochs', '1', '--head-dim', '32', '--workers', '0', '--device', 'cpu',
          '--out', str(tmp_path / 'run')])
    ck = torch.load(tmp_path / 'run' / 'best.pt', weights_only=True)
    assert load_detector(tmp_path / 'run' / 'best.pt', 'cpu')[0].fine == 16  # today's checkpoint loads
    ck['args'].update(max_filter=True, whiten=8, ema=0.0)  # as an older run with a max filter wrote it
    torch.save(ck, tmp_path / 'old.pt')
    with pytest.raises(SystemExit, match=r'--max-filter True, --whiten 8: options removed .*git checkout d94a794b30'):
        load_detector(tmp_path / 'old.pt', 'cpu')
    ck['args'].update(max_filter=False, whiten=0, dec_layers=2, num_queries=1000)  # removed later, another commit
    torch.save(ck, tmp_path / 'old.pt')
    with pytest.raises(SystemExit, match=r'--dec-layers 2: options removed .*git checkout a60b129'):
        load_detector(tmp_path / 'old.pt', 'cpu')
    ck['args'].update(dec_layers=0, o2m=3, cls_loss='focal', ema=0.999)  # training-only options:
    ck['model'].update({'cls_o2m.weight': torch.zeros(1), 'box_o2m.bias': torch.zeros(1)})  # the weights load
    torch.save(ck, tmp_path / 'old.pt')
    assert load_detector(tmp_path / 'old.pt', 'cpu')[0].fine == 16
