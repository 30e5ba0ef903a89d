"""probe.py: patch labels by hand, the ranking AP, a probe that finds linearly encoded classes, the CLI on every
kind of checkpoint, and pretrain.py --probe-every."""
import json

import numpy as np
import pytest
import torch

import pretrain
import probe
from conftest import make_source
from data import make_loader
from labels import CLASSES
from model import build_vit
from prepare import make_synthetic, split


def test_patch_labels_by_hand():
    # 64 x 64 image, 16 px patches: a 4 x 4 grid whose patch centres sit at 8, 24, 40, 56
    boxes = torch.tensor([[0., 0., 48., 48.],     # covers the centres of rows/cols 0-2 (class 1)
                          [20., 20., 30., 30.],   # inside it, smaller: covers centre (24, 24) = patch (1, 1) (class 2)
                          [50., 2., 54., 6.]])    # 4 px, covers no centre: labels its own patch (0, 3) (class 3)
    lab, small = probe.patch_labels(boxes, torch.tensor([1, 2, 3]), 4, 4, 16, (48, 64), background=9)
    lab, small = lab.view(4, 4), small.view(4, 4)
    assert lab[1, 1] == 2 and lab[0, 3] == 3
    assert (lab[:3, :3] == torch.tensor([[1, 1, 1], [1, 2, 1], [1, 1, 1]])).all()
    assert (lab[1:3, 3] == 9).all()            # background
    assert (lab[3] == -1).all()                # padding: the image is 48 px high
    assert small[1, 1] and small[0, 3] and not small[0, 0]  # 48 px box: not small


def test_average_precision_by_hand():
    s = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert probe.average_precision(s, torch.tensor([True, False, True, False])) == pytest.approx((1 + 2 / 3) / 2)
    assert probe.average_precision(s, torch.tensor([True, True, False, False])) == pytest.approx(1.0)
    assert probe.average_precision(s, torch.zeros(4, dtype=torch.bool)) is None


def test_probe_scores_find_a_linearly_encoded_class_and_not_noise():
    g = torch.Generator().manual_seed(0)

    def split(n, informative):
        y = torch.randint(0, 3, (n,), generator=g)  # classes 0, 1 and background 2
        x = torch.randn(n, 8, generator=g)
        if informative:
            x[:, :3] += 3 * torch.nn.functional.one_hot(y, 3)
        return x, y, torch.zeros(n, dtype=torch.bool)
    good = probe.probe_scores(split(2000, True), split(1000, True), num_classes=2)
    noise = probe.probe_scores(split(2000, False), split(1000, False), num_classes=2)
    assert good['map'] > 0.95 and good['obj_ap'] > 0.95
    assert noise['map'] < 0.5 and noise['obj_ap'] < 0.8  # chance: 1/3 and 2/3
    assert good['small_ap'] is None  # no small-object patches in val


def test_the_padding_of_a_split_tile_is_not_background(tmp_path):
    # a 180 x 120 px image cut into 128^2 tiles: two tiles, each padded from row 120 down; with 16 px patches the
    # image part holds 8 columns x 7 rows of patch centres (row 7's centre is at 120), the padding the 8th row
    make_source(tmp_path / 'src', np.full((120, 180, 3), 50, np.uint8), ['10 10 40 10 40 30 10 30 small-vehicle 0'])
    split(tmp_path / 'src', tmp_path / 'data' / 'val', size=128, gap=32, fmt='png', workers=1,
          classes=CLASSES['dota1.0'])
    loader = make_loader(tmp_path / 'data', 'val', CLASSES['dota1.0'], None, 2, False, 0, 16)
    _, label, _ = probe.extract(build_vit('test', 16), loader, 'cpu', background=15)
    assert len(label) == 2 * 8 * 7  # 2 * 8 * 8 when the padding row counted as background
    assert (label == 15).sum() == len(label) - 1  # the car (30 x 20 px, first tile) covers the centre (24, 24)


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    make_synthetic(root, n_train=8, n_val=4, size=64, seed=2)
    return root


def test_cli_on_random_and_pretrained_encoders(synth, tmp_path, capsys):
    out = tmp_path / 'pre'
    pretrain.main(['--data', str(synth), '--model', 'test', '--img-size', '64', '--patch-size', '8', '--batch-size',
                   '4', '--epochs', '2', '--warmup-epochs', '1', '--workers', '0', '--device', 'cpu', '--out', str(out),
                   '--probe-every', '1'])
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    probed = [r for r in log if 'probe_obj_ap' in r]
    assert [r['epoch'] for r in probed] == [1, 2] and all(0 <= r['probe_obj_ap'] <= 1 for r in probed)
    pre = torch.load(out / 'last.pt', weights_only=True)  # a finetune.py checkpoint holds its backbone in 'model'
    torch.save({'args': pre['args'], 'model': {f'backbone.{k}': v for k, v in pre['context'].items()}},
               tmp_path / 'det.pt')
    for ckpt, extra in [('none', ['--model', 'test', '--patch-size', '8']), (out / 'last.pt', ['--encoder', 'target']),
                        (tmp_path / 'det.pt', [])]:
        probe.main(['--ckpt', str(ckpt), '--data', str(synth), '--workers', '0', '--steps', '20',
                    '--json', str(tmp_path / 'p.json'), *extra])
        r = json.loads((tmp_path / 'p.json').read_text())
        assert r['n_val'] == 4 * 64 and r['n_val_object'] > 0 and 0 <= r['obj_ap'] <= 1
    printed = capsys.readouterr().out
    assert 'probe mAP' in printed and 'last.pt (target)' in printed and 'det.pt (backbone)' in printed
