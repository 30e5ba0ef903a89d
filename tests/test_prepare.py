"""Offline preparation: DOTA_devkit-style splitting (real sample and generated images), resume, manifest, check."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_source
from data import DOTADataset
from labels import CLASSES, LabelError, parse_label_file, parse_tile_name, read_image
from obb import clip_to_rect, obb_to_poly, poly_to_obb, polygon_area, polygon_iou
from prepare import check, split, synth_image, windows

V1 = CLASSES['dota1.0']


def test_windows_follow_the_devkit():
    assert windows(1111, 1024, 200) == [0, 87]  # P0706: one full step is impossible, the last window snaps
    assert windows(3000, 1024, 200) == [0, 824, 1648, 1976]
    assert windows(1024, 1024, 200) == [0] and windows(500, 1024, 200) == [0] and windows(1025, 1024, 200) == [0, 1]


def test_clip_polygons_areas():
    square = np.array([[[0, 0], [10, 0], [10, 10], [0, 10]]], float)
    diamond = np.array([[[5, 0], [10, 5], [5, 10], [0, 5]]], float)
    assert polygon_area(clip_to_rect(square, 5, -1, 20, 20)) == pytest.approx([50])
    assert polygon_area(clip_to_rect(square, -5, -5, 20, 20)) == pytest.approx([100])
    assert polygon_area(clip_to_rect(square, 20, 20, 30, 30)) == pytest.approx([0])
    assert polygon_area(clip_to_rect(diamond, 0, 0, 5, 5)) == pytest.approx([12.5])
    # against a fine raster on random convex quads (rotated rectangles)
    rng = np.random.default_rng(0)
    c, a = rng.uniform(10, 40, (20, 2)), rng.uniform(0, np.pi, 20)
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [12, 5]
    rot = np.stack([np.cos(a), np.sin(a), -np.sin(a), np.cos(a)], 1).reshape(-1, 2, 2)
    quads = np.einsum('kj,nji->nki', local, rot) + c[:, None]
    got = polygon_area(clip_to_rect(quads, 15, 12, 35, 30))
    g = (np.mgrid[0:50:0.1, 0:50:0.1] + 0.05).reshape(2, -1).T  # sample points, 0.1 px apart
    in_box = (g[:, 0] >= 15) & (g[:, 0] <= 35) & (g[:, 1] >= 12) & (g[:, 1] <= 30)
    for q, area in zip(quads, got):
        e, r = np.roll(q, -1, 0) - q, g[:, None] - q[None]  # (4, 2) edges, (P, 4, 2) from each vertex
        side = e[None, :, 0] * r[..., 1] - e[None, :, 1] * r[..., 0]  # (P, 4) 2D cross products
        inside = (side >= 0).all(1) | (side <= 0).all(1)
        assert area == pytest.approx((inside & in_box).sum() * 0.01, abs=1.0)


def tile_lines(path):
    polys, labels, difficult, _ = parse_label_file(path, V1)
    return polys.reshape(-1, 4, 2), labels, difficult


def test_split_real_sample(dota_sample, tmp_path):
    split(dota_sample, tmp_path / 'train', size=512, gap=200, fmt='png', workers=2, classes=V1)
    tiles = sorted((tmp_path / 'train' / 'images').glob('*.png'))
    assert len(tiles) > 10
    sources = {p.stem: read_image(p) for p in (dota_sample / 'images').glob('*.png')}
    by_image = {}
    for t in tiles:
        stem, rate, left, top = parse_tile_name(t.stem)
        assert rate == 1.0 and t.stem == f'{stem}__1__{left}___{top}'
        crop = sources[stem][top:top + 512, left:left + 512]
        tile = read_image(t)
        assert (tile[:crop.shape[0], :crop.shape[1]] == crop).all() and (tile[crop.shape[0]:] == 0).all()
        by_image.setdefault(stem, []).append((left, top, *tile_lines(tmp_path / 'train' / 'labelTxt' / f'{t.stem}.txt')))
    for stem, img in sources.items():
        h, w = img.shape[:2]
        polys, labels, difficult, _ = parse_label_file(dota_sample / 'labelTxt' / f'{stem}.txt', V1)
        for poly, label, diff in zip(polys.reshape(-1, 4, 2), labels, difficult):
            if polygon_area(poly[None])[0] == 0:
                continue
            lo, hi = poly.min(0), poly.max(0)
            homes = [(l, t, p, lab, d) for l, t, p, lab, d in by_image[stem]
                     if (lo >= (l, t)).all() and (hi <= (min(l + 512, w), min(t + 512, h))).all()]
            if homes:  # fully inside some tile: written there with exact coordinates, shifted by the offset
                l, t, p, lab, d = homes[0]
                hit = (np.abs(p - (poly - (l, t))).max((1, 2)) < 0.01) & (lab == label) & (d == diff)
                assert hit.sum() == 1, (stem, poly.tolist())
            else:  # only cut: the minimum-area rectangle of its visible part is in some tile
                found = False
                for l, t, p, _, _ in by_image[stem]:
                    visible = clip_to_rect(poly[None] - (l, t), 0, 0, min(512, w - l), min(512, h - t))
                    if len(p) and polygon_area(visible)[0] > 0:
                        want = obb_to_poly(poly_to_obb(visible))  # (1, 4, 2)
                        found |= (polygon_iou(p, np.repeat(want, len(p), 0)) > 0.999).any()
                assert found, (stem, poly.tolist())
    manifest = json.loads((tmp_path / 'train' / 'manifest.json').read_text())
    assert sorted(t['name'] for t in manifest['tiles']) == [t.stem for t in tiles]
    ds = DOTADataset(tmp_path, 'train', V1)  # reads the manifest
    ds_obb = DOTADataset(tmp_path, 'train', V1, boxes='obb')
    for i in range(0, len(ds), 5):
        img, target = ds[i]
        p, labels, _ = tile_lines(tmp_path / 'train' / 'labelTxt' / f'{target["name"]}.txt')
        hbb = np.concatenate([p.min(1), p.max(1)], 1)  # of the written polygons; a cut one's box is inside it
        got = target['boxes'].numpy()
        assert (got[:, :2] >= hbb[:, :2] - 0.01).all() and (got[:, 2:] <= hbb[:, 2:] + 0.01).all()
        assert target['labels'].tolist() == labels.tolist() and img.shape == (512, 512, 3)
        np.testing.assert_allclose(ds_obb.targets[i]['boxes'], poly_to_obb(p), atol=0.01)


def test_the_manifest_records_the_image_part_and_training_crops_stay_in_it(tmp_path):
    # 180 x 120 px, cut into 128^2 tiles: two windows across, each padded from row 120 down (NWPU at half
    # resolution: 42 % of its 512^2 tiles' pixels are such padding)
    img = np.full((120, 180, 3), 50, np.uint8)
    make_source(tmp_path / 'src', img, ['10 10 40 10 40 30 10 30 small-vehicle 0'])
    split(tmp_path / 'src', tmp_path / 'data' / 'train', size=128, gap=32, fmt='png', workers=1, classes=V1)
    tiles = json.loads((tmp_path / 'data' / 'train' / 'manifest.json').read_text())['tiles']
    assert [t['content'] for t in tiles] == [[128, 120], [128, 120]] and tiles[0]['height'] == 128
    ds = DOTADataset(tmp_path / 'data', 'train', V1, img_size=64, train=True, flips=False)
    for seed in range(30):
        crop, target = ds[(seed % 2, seed)]
        top, left = target['origin']
        assert crop.shape == (64, 64, 3) and (crop == 50).all() and top <= 120 - 64 and left <= 128 - 64
    crop, target = DOTADataset(tmp_path / 'data', 'train', V1, img_size=128, train=True, flips=False)[(0, 1)]
    assert target['origin'] == (0, 0) and (crop[:120] == 50).all() and (crop[120:] == 0).all()  # the tile itself


def test_cut_objects_get_difficult_2_below_min_visible(tmp_path):
    img = np.full((300, 300, 3), 50, np.uint8)
    # windows of 200 with gap 100: x starts 0, 100. Object A spans x 180..220 (x1 = 200 for tile 0: 50 %
    # visible there), object B spans x 185..200 (fully inside tile 0), object C 150..300 across everything.
    make_source(tmp_path / 'src', img, ['180 10 220 10 220 30 180 30 ship 0', '185 40 200 40 200 60 185 60 plane 1',
                                        '150 100 300 100 300 110 150 110 harbor 0'])
    split(tmp_path / 'src', tmp_path / 'dst', size=200, gap=100, fmt='png', workers=1, classes=V1)
    p, labels, diff = tile_lines(tmp_path / 'dst' / 'labelTxt' / 'X1__1__0___0.txt')
    got = {V1[c]: (q.min(0).tolist() + q.max(0).tolist(), d) for q, c, d in zip(p, labels, diff)}
    assert got['ship'] == ([180, 10, 200, 30], 2)  # half visible: difficult 2, box of the visible part
    assert got['plane'] == ([185, 40, 200, 60], 1)  # fully inside (touching the edge): exact, flag kept
    assert got['harbor'] == ([150, 100, 200, 110], 2)  # a third visible
    p, labels, diff = tile_lines(tmp_path / 'dst' / 'labelTxt' / 'X1__1__100___0.txt')
    got = {V1[c]: (q.min(0).tolist() + q.max(0).tolist(), d) for q, c, d in zip(p, labels, diff)}
    assert got['ship'] == ([80, 10, 120, 30], 0) and got['harbor'] == ([50, 100, 200, 110], 0)


def test_resume_redoes_only_unfinished_images_and_ignores_temporaries(tmp_path, capsys):
    for i in range(3):
        img, objects = synth_image(np.random.default_rng(i), 300)
        (tmp_path / 'src' / 'images').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'src' / 'labelTxt').mkdir(exist_ok=True)
        img.save(tmp_path / 'src' / 'images' / f'S{i}.png')
        (tmp_path / 'src' / 'labelTxt' / f'S{i}.txt').write_text(
            ''.join(' '.join(f'{v:.1f}' for v in p.ravel()) + f' {n} 0\n' for p, n in objects))
    split(tmp_path / 'src', tmp_path / 'dst', size=200, gap=50, workers=2, classes=V1)
    first = (tmp_path / 'dst' / 'manifest.json').read_text()
    # an interrupted run: S1 has no done-marker, one of its tiles is half-written, a temporary file is left over
    (tmp_path / 'dst' / '.done' / 'S1.json').unlink()
    tile = tmp_path / 'dst' / 'images' / 'S1__1__0___0.jpg'
    tile.write_bytes(tile.read_bytes()[:100])
    (tmp_path / 'dst' / 'images' / '.S1__1__150___0.jpg.tmp').write_bytes(b'partial')
    capsys.readouterr()
    split(tmp_path / 'src', tmp_path / 'dst', size=200, gap=50, workers=2, classes=V1)
    assert '2 already done, 1 to split' in capsys.readouterr().out
    assert (tmp_path / 'dst' / 'manifest.json').read_text() == first
    read_image(tile)  # rewritten whole
    ds = DOTADataset(tmp_path, 'dst', V1)
    assert len(ds) == len(json.loads(first)['tiles']) and not any('.tmp' in f.name for f in ds.files)


def test_large_generated_image_and_multiscale(tmp_path):
    img, objects = synth_image(np.random.default_rng(7), 3000, n_rows=20, n_single=600)
    assert len(objects) > 500
    lines = [' '.join(f'{v:.1f}' for v in p.ravel()) + f' {n} 0' for p, n in objects]
    make_source(tmp_path / 'src', np.asarray(img), lines)
    split(tmp_path / 'src', tmp_path / 'dst', size=1024, gap=200, rates=(1.0, 0.5), workers=2, classes=V1)
    m = json.loads((tmp_path / 'dst' / 'manifest.json').read_text())
    names = [t['name'] for t in m['tiles']]
    assert sum('__1__' in n for n in names) == 16 and sum('__0.5__' in n for n in names) == 4
    # every object's centre lies in some rate-1 tile that lists it
    centres = np.array([p.mean(0) for p, _ in objects])
    covered = np.zeros(len(objects), bool)
    for t in m['tiles']:
        _, rate, left, top = parse_tile_name(t['name'])
        if rate == 1 and t['boxes']:
            b = np.array(t['boxes']) + [left, top, left, top]
            covered |= ((centres[:, None, :] >= b[None, :, :2]) & (centres[:, None, :] <= b[None, :, 2:])).all(2).any(1)
    assert covered.all()
    half = [t for t in m['tiles'] if t['name'] == 'X1__0.5__0___0'][0]
    assert len(half['boxes']) > 0 and max(max(b) for b in half['boxes']) <= 1024


def test_images_only_unknown_class_and_check(tmp_path, capsys):
    make_source(tmp_path / 'strict', np.zeros((100, 100, 3), np.uint8), ['90 1 109 1 109 9 90 9 ship 0'])
    split(tmp_path / 'strict', tmp_path / 'ok', size=64, gap=16, workers=1, classes=V1)  # clipped, counted
    with pytest.raises(LabelError, match=r'X1.txt:3: object reaching outside the image \(clipped\) .*--strict'):
        split(tmp_path / 'strict', tmp_path / 'no', size=64, gap=16, workers=1, classes=V1, strict=True)
    make_source(tmp_path / 'src', np.zeros((100, 100, 3), np.uint8), ['1 1 9 1 9 9 1 9 helipad 0'])
    with pytest.raises(LabelError, match=r'X1.txt:3: unknown class .helipad.\. It is a dota2.0 class'):
        split(tmp_path / 'src', tmp_path / 'dst', size=64, gap=16, workers=1, classes=V1)
    (tmp_path / 'src' / 'labelTxt' / 'X1.txt').unlink()
    split(tmp_path / 'src', tmp_path / 'test', size=64, gap=16, workers=1, classes=V1)  # no labels: images only
    m = json.loads((tmp_path / 'test' / 'manifest.json').read_text())
    assert len(m['tiles']) == 4 and 'boxes' not in m['tiles'][0]
    # check: a corrupt image and a label without an image are reported; the exit code says so
    data = tmp_path / 'data' / 'train'
    make_source(data, np.zeros((64, 64, 3), np.uint8), ['1 1 9 1 9 9 1 9 ship 0', '2 2 2 2 2 2 2 2 ship 0'])
    assert check(tmp_path / 'data', V1, workers=1) == 0
    out = capsys.readouterr().out
    assert 'ship' in out and 'tiny [0, 16) px: 1' in out and '1 x zero-area' in out
    (data / 'images' / 'X2.png').write_bytes(b'garbage')
    (data / 'labelTxt' / 'X3.txt').write_text('')
    p = subprocess.run([sys.executable, ROOT / 'prepare.py', 'check', '--data', tmp_path / 'data', '--workers', '1'],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "X2.png: not an image (the file starts with b'garbage')" in p.stdout
    assert '1 x label file without an image' in p.stdout
