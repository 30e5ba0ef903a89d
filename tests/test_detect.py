"""detect.py: scenes of any size in memory give the boxes of split-to-disk + evaluate --merge; inputs as they come."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import detect
import evaluate
import finetune
from conftest import ROOT
from labels import CLASSES
from prepare import split, synth_image


def make_ckpt(path, boxes='hbb'):
    """The detector finetune.py builds (tiny 'test' ViT/8, 64 px tiles), random weights, saved as finetune saves it:
    random weights score every cell, so the merge has thousands of overlapping boxes to get right."""
    args = finetune.get_parser().parse_args(['--ckpt', 'none', '--model', 'test', '--patch-size', '8', '--img-size',
                                             '64', '--boxes', boxes])
    torch.manual_seed(0)
    model = finetune.build(args)
    torch.save({'model': model.state_dict(), 'args': vars(args), 'class_names': CLASSES[args.classes]}, path)
    return path


def scene(seed, size):
    return np.asarray(synth_image(np.random.default_rng(seed), size)[0])


def run_split_and_merge(ckpt, images, tmp, rates, fmt='png'):
    """The labelled-split path: tiles on disk, then evaluate.py --merge -> its submission folder."""
    src = tmp / 'src'
    (src / 'images').mkdir(parents=True)
    for name, img in images.items():
        Image.fromarray(img).save(src / 'images' / f'{name}.png')
    split(src, tmp / 'tiles' / 'scenes', size=64, gap=16, rates=rates, fmt=fmt, workers=1, images_only=True)
    evaluate.main(['--ckpt', str(ckpt), '--data', str(tmp / 'tiles'), '--split', 'scenes', '--merge', '--out',
                   str(tmp / 'ev'), '--device', 'cpu', '--workers', '0', '--batch-size', '4'])
    return tmp / 'ev' / 'submission', src / 'images'


@pytest.mark.parametrize('boxes', ['hbb', 'obb'])
def test_in_memory_tiles_give_the_boxes_and_scores_of_split_and_merge(tmp_path, boxes):
    ckpt = make_ckpt(tmp_path / 'ft.pt', boxes)
    images = {'wide': scene(1, 200)[:150],  # 150 x 200: several tiles each way, border windows snapped
              'small': scene(2, 40)}  # smaller than a tile: padded
    sub, src = run_split_and_merge(ckpt, images, tmp_path, rates=(1.0, 0.5))
    detect.main([str(src), '--ckpt', str(ckpt), '--gap', '16', '--rates', '1', '0.5', '--conf', '0.001', '--out',
                 str(tmp_path / 'det'), '--device', 'cpu', '--batch-size', '4', '--crops', '1'])  # the same batches: a
    # different batch size changes float32 sums in their last digit
    task = 1 if boxes == 'obb' else 2
    files = sorted(sub.glob(f'Task{task}_*.txt'))
    assert len(files) == 15 and sum(len(f.read_text().splitlines()) for f in files) > 1000
    for f in files:  # the same boxes and scores, to the digits the files carry
        assert (tmp_path / 'det' / f.name).read_text() == f.read_text(), f.name
    results = json.loads((tmp_path / 'det' / 'results.json').read_text())
    assert len(results) == sum(len(f.read_text().splitlines()) for f in files)
    assert {r['image_id'] for r in results} == {'wide', 'small'} and ('poly' in results[0]) == (boxes == 'obb')
    lines = (tmp_path / 'det' / 'labels' / 'wide.txt').read_text().splitlines()
    assert len(lines[0].split()) == 2 + 4 * (3 - task) and lines[0].split()[0] in CLASSES['dota1.0']
    assert sum(r['image_id'] == 'wide' for r in results) == len(lines)
    with Image.open(tmp_path / 'det' / 'wide.jpg') as im:
        assert im.size == (200, 150)
    assert (tmp_path / 'det' / 'wide_crop0.jpg').exists()


def test_a_large_scene_is_drawn_downscaled_and_runs_in_bounded_batches(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / 'ft.pt')
    Image.fromarray(scene(3, 600)).save(tmp_path / 'big.png')  # 600 px: 13 x 13 tiles of 64 px at gap 16
    detect.main([str(tmp_path / 'big.png'), '--ckpt', str(ckpt), '--out', str(tmp_path / 'det'), '--device', 'cpu',
                 '--draw-size', '256', '--conf', '0.5'])
    out = capsys.readouterr().out
    assert '1 scenes, 169 tiles of 64 px (gap 16' in out and 'peak memory' in out
    with Image.open(tmp_path / 'det' / 'big.jpg') as im:
        assert im.size == (200, 200)  # reduced by 3, the smallest integer factor that fits 256


def test_a_large_image_is_read_in_strips_to_the_same_pixels(tmp_path, monkeypatch):
    import labels
    img = scene(6, 300)[:, :250]
    Image.fromarray(img).save(tmp_path / 'rgb.png')
    Image.fromarray(img).convert('P').save(tmp_path / 'palette.png')
    small = {n: labels.read_image(tmp_path / f'{n}.png') for n in ('rgb', 'palette')}
    monkeypatch.setattr(labels, 'STRIPS_ABOVE', 100)  # every image here is "large"
    monkeypatch.setattr(labels, 'STRIP', 64)  # 300 rows: 5 strips, the last one short
    for n in ('rgb', 'palette'):
        np.testing.assert_array_equal(labels.read_image(tmp_path / f'{n}.png'), small[n])
    np.testing.assert_array_equal(small['rgb'], img)


def png16_rgb(path, w=4, h=3):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one; it reads one as 8-bit by dropping the low byte)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    raw = b''.join(b'\0' + bytes(6 * w) for _ in range(h))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)) +
                     chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def tiff_bands(path, bands, w=4, h=3):
    """An uncompressed 8-bit TIFF of `bands` interleaved bands, written by hand (what Pillow cannot open)."""
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
               (277, 3, 1, bands), (278, 3, 1, h), (279, 4, 1, w * h * bands)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack('<H', len(entries)) + b''.join(
        struct.pack('<HHI', tag, kind, n) + (struct.pack('<HH', v, 0) if kind == 3 else
                                             struct.pack('<I', data_at if tag == 273 else v))
        for tag, kind, n, v in entries) + struct.pack('<I', 0)
    path.write_bytes(b'II*\0' + struct.pack('<I', 8) + ifd + bytes(w * h * bands))


def test_inputs_as_they_come(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / 'ft.pt')
    ok = tmp_path / 'ok'
    ok.mkdir()
    rgb = scene(4, 70)
    Image.fromarray(rgb).convert('L').save(ok / 'gray.png')
    Image.fromarray(rgb).convert('RGBA').save(ok / 'rgba.png')
    Image.fromarray(rgb).convert('P').save(ok / 'palette.png')
    Image.fromarray(rgb).save(ok / 'plain.jpg')
    (ok / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)  # a header and nothing else
    detect.main([str(ok), '--ckpt', str(ckpt), '--out', str(tmp_path / 'det'), '--device', 'cpu', '--conf', '0.9'])
    cap = capsys.readouterr()
    assert '4 scenes, 16 tiles' in cap.out  # 70 px: 2 x 2 tiles each
    assert 'warning: 1 file(s) could not be read' in cap.err and 'broken.png' in cap.err
    for name in ('gray', 'rgba', 'palette', 'plain'):
        assert (tmp_path / 'det' / f'{name}.jpg').exists() and (tmp_path / 'det' / 'labels' / f'{name}.txt').exists()

    bad = tmp_path / 'bad'
    bad.mkdir()
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(bad / 'gray16.png')
    png16_rgb(bad / 'rgb16.png')
    tiff_bands(bad / 'five.tif', 5)
    with pytest.raises(SystemExit) as e:
        detect.main([str(bad), str(ok / 'plain.jpg'), '--ckpt', str(ckpt), '--out', str(tmp_path / 'x')])
    msg = str(e.value)
    assert 'gray16.png: 16-bit' in msg and 'rgb16.png: 16-bit' in msg and 'five.tif: 5 bands' in msg
    assert msg.count('convert it to 8-bit RGB') == 3 and 'plain.jpg' not in msg
    assert not (tmp_path / 'x').exists()  # refused before anything ran


def test_sources_that_match_nothing_or_collide_are_errors(tmp_path):
    Image.fromarray(scene(5, 32)).save(tmp_path / 'a.png')
    (tmp_path / 'd').mkdir()
    Image.fromarray(scene(5, 32)).save(tmp_path / 'd' / 'a.jpg')
    with pytest.raises(SystemExit, match='no_such'):
        detect.find_scenes([str(tmp_path / 'no_such*.png')])
    with pytest.raises(SystemExit, match="two scenes named 'a'"):
        detect.find_scenes([str(tmp_path / 'a.png'), str(tmp_path / 'd')])
    assert detect.find_scenes([str(tmp_path / '*.png')]) == [tmp_path / 'a.png']


def test_the_readme_names_the_command():
    assert 'python detect.py --ckpt' in (ROOT / 'README.md').read_text()
