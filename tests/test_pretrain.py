"""Pretraining as a research tool: every strategy runs, exact resume, safe checkpoints, NaN stop, pixel targets."""
import json
import os
import pickle

import pytest
import torch

import pretrain
from model import Predictor, build_vit, export
from prepare import make_synthetic


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    make_synthetic(root, n_train=16, n_val=2, size=32, seed=1)
    return root


def run(synth, out, *extra):
    pretrain.main(['--data', str(synth), '--model', 'test', '--img-size', '32', '--patch-size', '8',
                   '--batch-size', '4', '--epochs', '2', '--warmup-epochs', '1', '--workers', '0', '--device', 'cpu',
                   '--log-every', '1', '--out', str(out), *map(str, extra)])
    return [json.loads(line) for line in open(out / 'log.jsonl')]


@pytest.mark.parametrize('flags', [
    ['--mask', 'object'],
    ['--mask', 'random', '--target', 'pixels'],
    ['--mask', 'saliency', '--accum', '2'],
])
def test_every_strategy_runs_and_logs(synth, tmp_path, flags):
    log = run(synth, tmp_path, *flags)
    steps = 8 // (2 if '--accum' in flags else 1)
    assert [r['step'] for r in log] == list(range(1, steps + 1))
    assert all(set(r) >= {'loss', 'lr', 'weight_decay', 'momentum', 'target_std', 'pred_std', 'mean_baseline'}
               for r in log)
    assert log[0]['weight_decay'] == pytest.approx(0.04) and log[-1]['weight_decay'] > 0.3  # cosine 0.04 -> 0.4
    ck = torch.load(tmp_path / 'last.pt', weights_only=True)
    assert ck['step'] == steps and ck['epoch'] == 2


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(synth, tmp_path):
    full = run(synth, tmp_path / 'full')
    part = run(synth, tmp_path / 'part', '--max-steps', 3)  # stops mid-epoch 1 (4 steps per epoch)
    assert len(part) == 3
    rest = run(synth, tmp_path / 'part', '--resume', 'auto')
    assert [r['step'] for r in rest] == list(range(1, 9))  # the log file continues from the resumed step
    assert [r['loss'] for r in rest[3:]] == [r['loss'] for r in full[3:]]  # exact, not approximately
    again = run(synth, tmp_path / 'part', '--epochs', 1)  # a fresh run into the same OUT: its own log only
    assert [r['step'] for r in again] == [1, 2, 3, 4]


def test_a_resumed_time_budget_counts_the_time_already_spent(synth, tmp_path):
    run(synth, tmp_path, '--max-steps', 3, '--time', 1)  # stops mid-epoch 1 (4 steps per epoch)
    ck = torch.load(tmp_path / 'last.pt', weights_only=True)
    assert 0 < ck['seconds'] < 600
    torch.save({**ck, 'seconds': 3600.0}, tmp_path / 'last.pt')  # as if the first part had taken an hour
    rest = run(synth, tmp_path, '--resume', 'auto', '--time', 1)
    assert rest[-1]['step'] == 4  # the 1-minute budget is spent: it finishes epoch 1 and stops (2 epochs: 8 steps)


def test_a_checkpoint_whose_pickle_runs_code_is_refused(synth, tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    torch.save({'context': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(pickle.UnpicklingError):
        run(synth, tmp_path / 'out', '--resume', tmp_path / 'evil.pt')
    assert not marker.exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(synth, tmp_path, monkeypatch):
    real, calls = pretrain.jepa_loss, []

    def poisoned(*a, **k):
        loss, stats = real(*a, **k)
        calls.append(1)
        return (loss * float('nan') if len(calls) == 4 else loss), stats
    monkeypatch.setattr(pretrain, 'jepa_loss', poisoned)
    with pytest.raises(FloatingPointError, match=r'at step 3 .*--amp bf16'):
        run(synth, tmp_path, '--save-every', 2)
    ck = torch.load(tmp_path / 'last.pt', weights_only=True)  # the good state of step 2 is intact
    assert ck['step'] == 2 and all(torch.isfinite(v).all() for v in ck['context'].values())


def test_pixel_loss_is_maes_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    context = build_vit('test', 8)
    predictor = Predictor(32, 32, 1, 2, out_dim=8 * 8 * 3)
    ctx, tgt = torch.tensor([[0, 3], [1, 2]]), torch.tensor([[1, 2], [0, 3]])
    student = pretrain.Student(context, predictor)
    loss, _ = pretrain.jepa_loss(student, None, x, ctx, tgt, target_kind='pixels', patch_size=8)
    # MAE: patchify (n, c, h, p, w, q) -> (n, h*w, p*q*c), normalize each patch by its mean and unbiased variance
    patches = torch.einsum('nchpwq->nhwpqc', x.reshape(2, 3, 2, 8, 2, 8)).reshape(2, 4, 192)
    patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = predictor(context(x, ctx), ctx, tgt, 2, 2)
    want = ((pred - patches.gather(1, tgt[..., None].expand(-1, -1, 192))) ** 2).mean(-1).mean()
    torch.testing.assert_close(loss, want)


def test_export_writes_an_encoder_in_timm_layout(synth, tmp_path):
    run(synth, tmp_path, '--max-steps', 1)
    export(tmp_path / 'last.pt', 'target', tmp_path / 'encoder.pth')
    state = torch.load(tmp_path / 'encoder.pth', weights_only=True)
    assert 'blocks.0.attn.qkv.weight' in state
    build_vit('test', 8).load_state_dict(state)  # strict


def test_two_processes_give_the_loss_of_one_with_the_same_global_batch(synth, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    common = ['--data', synth, '--model', 'test', '--img-size', 32, '--patch-size', 8, '--epochs', 2,
              '--warmup-epochs', 1, '--workers', 0, '--device', 'cpu', '--log-every', 1]
    one = run(synth, tmp_path / 'one', '--batch-size', 8)  # run() passes --batch-size 4; the later flag wins
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(ROOT / 'pretrain.py'), *map(str, common), '--batch-size', '4', '--out', str(tmp_path / 'two')],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / 'two' / 'log.jsonl')]
    assert [r['step'] for r in two] == [r['step'] for r in one] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-5)
    assert '2 process(es)' in p.stdout


def test_mean_baseline_is_the_loss_of_predicting_each_images_mean_target():
    import torch.nn.functional as F
    torch.manual_seed(0)
    target = build_vit('test', 8)
    x = torch.randn(2, 3, 32, 32)
    ctx, tgt = torch.tensor([[0, 1], [3, 4]]), torch.tensor([[5, 7, 9], [2, 11, 15]])

    def mean_student(x, ctx_idx, tgt_idx, offset=None):  # each image's mean layer-normed target, everywhere
        h = F.layer_norm(target(x), (target.dim,))
        h = h.gather(1, tgt_idx[..., None].expand(-1, -1, h.shape[-1]))
        return h.mean(1, keepdim=True).expand_as(h)
    with torch.no_grad():
        loss, stats = pretrain.jepa_loss(mean_student, target, x, ctx, tgt)
        worse, _ = pretrain.jepa_loss(lambda *a: mean_student(*a) + 0.1, target, x, ctx, tgt)
    assert loss.item() == pytest.approx(stats['mean_baseline'].item(), rel=1e-5) and worse > loss


def test_latent_targets_layer_instance_and_multi_block():
    import torch.nn.functional as F
    torch.manual_seed(0)
    enc = build_vit('mini', 8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = pretrain.latent_targets(enc, x)  # I-JEPA: the output, layer-normed per token
        assert torch.allclose(plain, F.layer_norm(enc(x), (enc.dim,)))
        inst = pretrain.latent_targets(enc, x, layers=1, norm='instance')  # each channel over the image's tokens
        assert torch.allclose(inst.mean(1), torch.zeros(2, enc.dim), atol=1e-5)
        assert torch.allclose(inst.var(1, unbiased=False), torch.ones(2, enc.dim), atol=1e-3)
        outs = enc.last_blocks(x, 2)  # the stream after blocks 2 and 3 (the last through the final norm)
        assert len(outs) == 2 and torch.allclose(outs[-1], enc(x))
        two = pretrain.latent_targets(enc, x, layers=2)
        assert torch.allclose(two, (F.layer_norm(outs[0], (enc.dim,)) + F.layer_norm(outs[1], (enc.dim,))) / 2)


def test_time_budget_stops_pretraining_when_spent(synth, tmp_path):
    log = run(synth, tmp_path, '--time', '0.0001', '--probe-every', '0')  # --epochs 2, but the budget ends epoch 1
    assert max(r['epoch'] for r in log) == 1
    ck = torch.load(tmp_path / 'last.pt', weights_only=True)
    assert ck['epoch'] == 1 and ck['args']['epochs'] == 1


def test_both_encoders_place_each_crop_where_it_was_cut(tmp_path, monkeypatch):
    root = tmp_path / 'big'
    make_synthetic(root, n_train=8, n_val=1, size=64, seed=2)  # 64^2 images, 32^2 crops: origins 0..32 px
    seen, jepa_loss = [], pretrain.jepa_loss

    def spy(*a, **kw):
        seen.append(kw['offset'])
        return jepa_loss(*a, **kw)
    monkeypatch.setattr(pretrain, 'jepa_loss', spy)
    run(root, tmp_path / 'out')
    offsets = torch.cat(seen)  # (steps * B, 2), in patches of 8 px
    assert offsets.shape == (16, 2) and offsets.min() >= 0 and offsets.max() <= 4 and offsets.max() > 0
    assert len({tuple(o) for o in offsets.tolist()}) > 4  # drawn, not fixed


def test_pretraining_reads_unlabelled_folders_with_or_without_a_detectors_boxes(synth, tmp_path, capsys):
    import shutil
    from data import DOTADataset
    from labels import CLASSES
    plain = tmp_path / 'scenes'  # a folder of images, no labelTxt: how DOTA's test set and a user's scenes come
    shutil.copytree(synth / 'val' / 'images', plain)
    names = sorted(p.stem for p in plain.glob('*.png'))
    boxes = tmp_path / 'boxes'  # a detector's boxes for one of them, none for the other
    boxes.mkdir()
    (boxes / f'{names[0]}.txt').write_text('2 2 12 2 12 9 2 9 ship 0\n')
    with pytest.warns(UserWarning, match='1 x unlabelled image without a box file'):
        log = run(synth, tmp_path / 'run', '--unlabelled', plain, '--unlabelled-boxes', boxes, '--mask', 'object',
                  '--batch-size', 6)
    assert '16 train images + 2 unlabelled' in capsys.readouterr().out
    assert len(log) == 6 and all(0 <= r['hidden_on_boxes'] <= 1 for r in log)  # 18 images: 3 steps of 6, 2 epochs
    ds = DOTADataset(synth, 'train', CLASSES['dota1.0'])
    assert ds.add_unlabelled(plain, boxes) == 2
    assert ds.targets[-2]['boxes'].tolist() == [[2, 2, 12, 9]] and len(ds.targets[-1]['boxes']) == 0
    log = run(synth, tmp_path / 'saliency', '--unlabelled', plain, '--mask', 'saliency', '--saliency-share', 0.25)
    assert len(log) == 8  # 18 images: 4 steps of 4 per epoch
    with pytest.raises(SystemExit, match='--target latent'):
        run(synth, tmp_path / 'bad', '--mask', 'saliency', '--target', 'pixels')
