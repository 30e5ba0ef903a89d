"""Label parsing (real DOTA sample and bad input), the Dataset's augmentations, and the synthetic generator."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import DOTADataset, Loader, collate, crop_offsets, orient, random_crop, random_dihedral, to_input
from labels import CLASSES, LabelError, Problems, load_labels, parse_label_file, parse_tile_name, read_image
from prepare import make_synthetic

V1 = CLASSES['dota1.0']


def counts(labels, names=V1):
    return {names[c]: int(n) for c, n in zip(*np.unique(labels, return_counts=True))}


# ------------------------------------------------------------------------------------------- real DOTA sample
def test_p0706_header_crlf_and_counts(dota_sample):
    path = dota_sample / 'labelTxt' / 'P0706.txt'
    assert b'\r\n' in path.read_bytes() and path.read_text().startswith('imagesource:')
    polys, labels, difficult, _ = parse_label_file(path, V1)
    assert counts(labels) == {'ship': 531, 'harbor': 5}
    np.testing.assert_array_equal(polys[0], [1054, 1028, 1063, 1011, 1111, 1040, 1112, 1062])  # first object line
    assert difficult[0] == 1 and len(difficult) == 536


def test_p1888_boxes_inside_image(dota_sample):
    with Image.open(dota_sample / 'images' / 'P1888.png') as im:
        assert im.size == (712, 557)
    problems = Problems()
    boxes, labels, _ = load_labels(dota_sample / 'labelTxt' / 'P1888.txt', V1, 712, 557, problems)
    assert len(boxes) == 64 and not problems.counts
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= 712).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= 557).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_out_of_image_coordinates_are_clipped(dota_sample):
    polys = parse_label_file(dota_sample / 'labelTxt' / 'P0706.txt', V1)[0]
    assert polys[:, 0::2].max() > 1111  # the file has x = 1112 on a 1111 px wide image
    problems = Problems()
    boxes, _, _ = load_labels(dota_sample / 'labelTxt' / 'P0706.txt', V1, 1111, 1182, problems)
    assert boxes[:, 2].max() == 1111 and len(boxes) == 536
    assert problems.counts['object reaching outside the image (clipped)'] >= 1
    with pytest.raises(LabelError, match='P0706.txt:3: object reaching outside'):  # line 3: the first object
        load_labels(dota_sample / 'labelTxt' / 'P0706.txt', V1, 1111, 1182, Problems(strict=True))


def test_float_coordinates_and_labels_without_images(dota_sample):
    _, labels, difficult, _ = parse_label_file(dota_sample / 'labelTxt' / 'P0003.txt', V1)
    assert counts(labels) == {'large-vehicle': 40, 'small-vehicle': 15} and (difficult == 1).sum() == 13
    total = sum(len(parse_label_file(p, V1)[1]) for p in (dota_sample / 'labelTxt_without_images').glob('*.txt'))
    assert total == 384


def test_devkit_tile_loads_with_difficult_2_and_zero_area_dropped(dota_sample, tmp_path):
    src = dota_sample / 'split_example'
    polys, labels, difficult, _ = parse_label_file(next((src / 'labelTxt').glob('*.txt')), V1)
    assert len(labels) == 295 and (difficult == 2).sum() == 5
    (tmp_path / 'val').mkdir()
    for sub in ('images', 'labelTxt'):
        (tmp_path / 'val' / sub).symlink_to(src / sub)
    with pytest.warns(UserWarning, match='2 x zero-area or out-of-image polygon'):
        ds = DOTADataset(tmp_path, 'val', V1)
    img, t = ds[0]
    assert img.shape == (1024, 1024, 3) and img.dtype == torch.uint8
    # kept and flagged: 3 with difficult=1 and 3 with difficult=2 (the other two are the zero-area polygons)
    assert len(t['boxes']) == 293 and t['difficult'].sum() == 6


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('line, message', [
    ('1 2 3 4 5 6 7 8', 'expected'),  # too few tokens
    ('1 2 3 4 5 6 x 8 ship 0', 'coordinates must be numbers'),
    ('1 2 3 4 5 6 7 8 spaceship 0', "unknown class 'spaceship'. Known: plane"),
    ('1 2 3 4 5 6 7 8 helipad 0', "unknown class 'helipad'. It is a dota2.0 class: use --classes dota2.0"),
    ('1 2 3 4 5 6 7 8 container-crane 0', 'It is a dota1.5/dota2.0 class: use --classes dota1.5'),
    ('1 2 3 4 5 6 7 8 ship hard', 'difficult flag'),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / 'bad.txt'
    path.write_text(f'imagesource:x\ngsd:1\n0 0 1 0 1 1 0 1 ship 0\n{line}\n')
    with pytest.raises(LabelError, match=message) as err:
        parse_label_file(path, V1)
    assert f'{path}:4' in str(err.value)


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / 'bin.txt'
    path.write_bytes(b'gsd:1\r\n0 0 1 0 1 1 0 1 sh\xe9p 0\r\n')
    with pytest.raises(LabelError, match=r'bin.txt:2: not UTF-8 text \(byte 0xe9'):
        parse_label_file(path, V1)


def test_crlf_bom_blank_lines_and_empty_files(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_bytes(b'\xef\xbb\xbfimagesource:GoogleEarth\r\ngsd:0.5\r\n\r\n1 1 5 1 5 4 1 4 plane 1\r\n')
    polys, labels, difficult, lines = parse_label_file(path, V1)
    assert polys.tolist() == [[1, 1, 5, 1, 5, 4, 1, 4]] and labels.tolist() == [0] and lines.tolist() == [4]
    (tmp_path / 'empty.txt').write_text('')
    assert parse_label_file(tmp_path / 'empty.txt', V1)[0].shape == (0, 8)


def test_degenerate_polygons_dropped_and_counted_with_line(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_text('0 0 4 0 4 4 0 4 ship 0\n1 1 1 1 1 9 1 9 ship 0\n2 2 6 6 2 2 6 6 ship 0\n')
    problems = Problems()
    boxes, labels, _ = load_labels(path, V1, 100, 100, problems)
    assert len(boxes) == 1 and problems.counts['zero-area or out-of-image polygon (dropped)'] == 2
    assert problems.places['zero-area or out-of-image polygon (dropped)'] == [f'{path}:2']
    with pytest.raises(LabelError, match='a.txt:2: zero-area'):
        load_labels(path, V1, 100, 100, Problems(strict=True))


@pytest.mark.parametrize('mode, value, want', [('L', 77, 77), ('RGBA', (10, 20, 30, 0), (10, 20, 30)),
                                               ('P', 0, (0, 0, 0)), ('I;16', 65535, 255), ('I;16', 32896, 128)])
def test_image_modes_become_8bit_rgb(tmp_path, mode, value, want):
    Image.new(mode, (40, 30), value).save(tmp_path / 'a.png')
    img = read_image(tmp_path / 'a.png')
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert (img == want).all()


def test_unpaired_images_and_labels_are_counted(tmp_path):
    (tmp_path / 'train' / 'images').mkdir(parents=True)
    (tmp_path / 'train' / 'labelTxt').mkdir()
    Image.new('RGB', (40, 30)).save(tmp_path / 'train' / 'images' / 'a.png')
    (tmp_path / 'train' / 'labelTxt' / 'b.txt').write_text('0 0 4 0 4 4 0 4 ship 0\n')
    with pytest.warns(UserWarning) as caught:
        ds = DOTADataset(tmp_path, 'train', V1)
    text = ' | '.join(str(w.message) for w in caught)
    assert '1 x image without a label file' in text and '1 x label file without an image' in text
    img, t = ds[0]
    assert img.shape == (30, 40, 3) and len(t['boxes']) == 0
    with pytest.raises(LabelError, match='label file without an image'):
        DOTADataset(tmp_path, 'train', V1, strict=True)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match='bad.png: cannot read the image'):
        read_image(tmp_path / 'bad.png')
    Image.new('RGB', (200, 200), (9, 9, 9)).save(tmp_path / 'full.jpg')
    data = (tmp_path / 'full.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='cut.jpg: cannot read the image'):
        read_image(tmp_path / 'cut.jpg')


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no images in'):
        DOTADataset(tmp_path, 'train', V1)


# ------------------------------------------------------------------------------------------- augmentation
def box_of(img):
    """Bounding box (x1, y1, x2, y2) of the nonzero pixels of (H, W, 3)."""
    ys, xs = np.nonzero(img.numpy().sum(2))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_dihedral_moves_boxes_with_pixels():
    """random_dihedral moves the boxes on the CPU, orient moves the pixels of the padded batch: they must agree, also
    for an image smaller than its slot (mirrored within its own size) and a non-square one (never turned)."""
    sizes, box = [(32, 32), (20, 20), (24, 32)], torch.tensor([[12.0, 5, 19, 9]])  # box x 12..19, y 5..9
    seen = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        batch = []
        for h, w in sizes:
            img = torch.zeros(h, w, 3, dtype=torch.uint8)
            img[5:9, 12:19] = 255
            boxes, flips = random_dihedral(box, (h, w), g)
            size = (w, h) if flips[0] else (h, w)
            batch.append((img, {'boxes': boxes, 'flips': flips, 'size': size}))
        images, targets = collate(batch, multiple=16)
        out = orient(images.permute(0, 3, 1, 2), targets).permute(0, 2, 3, 1)
        for b, t in zip(out, targets):
            assert box_of(b) == t['boxes'][0].tolist()
            assert b[t['size'][0]:].sum() == 0 and b[:, t['size'][1]:].sum() == 0  # still at the top left
        assert not targets[2]['flips'][0]
        seen.add(tuple(targets[0]['boxes'][0].tolist()))
    assert len(seen) == 8  # all flips and turns occur


def white_box_tiles(root, shapes):
    """ROOT/train with one black image I{k}.png per (h, w, x1, y1, x2, y2), a white rectangle at its one ship box."""
    (root / 'train' / 'images').mkdir(parents=True)
    (root / 'train' / 'labelTxt').mkdir()
    for k, (h, w, x1, y1, x2, y2) in enumerate(shapes):
        a = np.zeros((h, w, 3), np.uint8)
        a[y1:y2, x1:x2] = 255
        Image.fromarray(a).save(root / 'train' / 'images' / f'I{k}.png')
        (root / 'train' / 'labelTxt' / f'I{k}.txt').write_text(f'{x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2} ship 0\n')


def test_loader_targets_match_the_images_the_model_sees(tmp_path):
    """DOTADataset (crop, flips drawn) -> Loader (2 threads) -> to_input (flips applied): in what the model gets,
    the white rectangle of each image lies exactly in its box; and a seeded epoch is the same twice."""
    white_box_tiles(tmp_path, [(48, 48, 10, 20, 30, 26), (40, 40, 3, 3, 9, 30), (48, 30, 5, 1, 8, 47)])
    ds = DOTADataset(tmp_path, 'train', V1, img_size=32, train=True)
    epochs = []
    for epoch in range(12):
        torch.manual_seed(epoch % 6)
        seen = []
        for images, targets in Loader(ds, 3, 16, workers=2, shuffle=True):
            x = to_input(images, targets, torch.device('cpu'))
            white = (x[:, 0] > 0).numpy()  # (B, H, W)
            for b, t in enumerate(targets):
                h, w = t['size']
                assert not white[b, h:].any() and not white[b, :, w:].any()
                if len(t['boxes']):
                    ys, xs = np.nonzero(white[b])
                    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == t['boxes'][0].tolist()
                else:
                    assert not white[b].any()
                seen.append((t['name'], t['boxes'].tolist(), t['flips'].tolist()))
        epochs.append(seen)
    assert epochs[:6] == epochs[6:] and len({str(e) for e in epochs[:6]}) > 1  # seeded, yet epochs differ


def test_no_flips_keeps_orientation(tmp_path):
    """flips=False (finetune.py --no-flips): crops still vary, but no item is flipped or turned."""
    white_box_tiles(tmp_path, [(48, 48, 10, 20, 30, 26)])
    ds = DOTADataset(tmp_path, 'train', V1, img_size=32, train=True, flips=False)
    items = [ds[(0, seed)][1] for seed in range(16)]
    assert all('flips' not in t for t in items)
    boxes = {tuple(t['boxes'][0].tolist()) for t in items if len(t['boxes'])}
    assert len(boxes) > 1  # the crops differ
    for x1, y1, x2, y2 in boxes:  # never turned: the 20 x 6 box stays wide (where it is not cut by the crop)
        assert y2 - y1 <= 6 and (x2 - x1 >= 6 or x1 == 0 or x2 == 32)


def test_random_crop_keeps_scale_and_clips():
    img = torch.zeros(100, 80, 3, dtype=torch.uint8)
    img[40:60, 30:50] = 255
    noise = torch.randint(0, 255, (100, 80, 3), dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        out, boxes, keep, (top, left) = random_crop(img, torch.tensor([[30.0, 40, 50, 60]]), 48)
        torch.manual_seed(seed)
        assert torch.equal(random_crop(noise, boxes, 48)[0], noise[top:top + 48, left:left + 48])  # the origin
        assert out.shape == (48, 48, 3)
        if keep.any():
            assert box_of(out) == boxes[0].tolist()
        else:
            assert out.sum() == 0
    out, boxes, keep, origin = random_crop(img[:20, :20], torch.tensor([[2.0, 3, 10, 12], [15, 15, 30, 30]]), 48)
    assert origin == (0, 0) and out.shape == (20, 20, 3)  # smaller: as is
    assert boxes.tolist() == [[2, 3, 10, 12], [15, 15, 20, 20]]


def test_collate_pads_to_a_multiple_of_the_patch():
    a = (torch.ones(30, 20, 3, dtype=torch.uint8), {'boxes': torch.zeros(0, 4)})
    b = (torch.ones(40, 10, 3, dtype=torch.uint8).transpose(0, 1), {'boxes': torch.zeros(2, 4)})  # a strided view
    images, targets = collate([a, b], multiple=16)
    assert images.shape == (2, 32, 48, 3) and images.dtype == torch.uint8 and len(targets[1]['boxes']) == 2
    assert images[0, :30, :20].all() and images[0, 30:].sum() == 0 and images[0, :, 20:].sum() == 0
    assert images[1, :10, :40].all() and images[1, 10:].sum() == 0 and images[1, :, 40:].sum() == 0


def test_to_input_normalizes_and_moves_channels():
    images = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)
    images[..., 0] = 255
    x = to_input(images, [{}, {}], torch.device('cpu'))
    assert x.shape == (2, 3, 4, 6)
    torch.testing.assert_close(x[:, 0], torch.full((2, 4, 6), (1 - 0.485) / 0.229))
    torch.testing.assert_close(x[:, 1], torch.full((2, 4, 6), -0.456 / 0.224))


def test_tile_names_parse():
    assert parse_tile_name('P0706__1__0___824') == ('P0706', 1.0, 0, 824)
    assert parse_tile_name('P1478__0.5__853___962') == ('P1478', 0.5, 853, 962)
    with pytest.raises(ValueError, match='not a tile name'):
        parse_tile_name('P0706')


# ------------------------------------------------------------------------------------------- synthetic data
def test_synthetic_is_deterministic_dota_format(tmp_path):
    make_synthetic(tmp_path / 'a', n_train=6, n_val=2, size=96, seed=3)
    make_synthetic(tmp_path / 'b', n_train=6, n_val=2, size=96, seed=3)
    for f in sorted((tmp_path / 'a' / 'train' / 'labelTxt').glob('*.txt')):
        assert f.read_bytes() == (tmp_path / 'b' / 'train' / 'labelTxt' / f.name).read_bytes()
    ds = DOTADataset(tmp_path / 'a', 'train', V1)
    sizes = np.concatenate([np.sqrt((t['boxes'][:, 2:] - t['boxes'][:, :2]).prod(1)) for t in ds.targets])
    names = {V1[c] for t in ds.targets for c in t['labels']}
    assert len(sizes) >= 20 and 4 <= sizes.min() and sizes.max() <= 60
    assert len(names) >= 3 and names <= set(V1)
    img, _ = ds[0]
    assert img.shape == (96, 96, 3)


def test_a_training_crop_knows_where_it_was_cut_and_a_whole_image_starts_at_zero(tmp_path):
    make_synthetic(tmp_path, n_train=4, n_val=2, size=64, seed=3)
    ds = DOTADataset(tmp_path, 'train', CLASSES['dota1.0'], 32, train=True)
    origins = set()
    for i in range(4):
        full = torch.from_numpy(read_image(ds.files[i]))
        for seed in range(8):
            img, t = ds[(i, 8 * i + seed)]
            turned = bool(t['flips'][0])
            top, left = t['origin'][::-1] if turned else t['origin']  # a turn transposes the origin too
            assert torch.equal(img, full[top:top + 32, left:left + 32])
            origins.add(t['origin'])
    assert len(origins) > 10 and all(0 <= v <= 32 for o in origins for v in o)
    val = DOTADataset(tmp_path, 'val', CLASSES['dota1.0'], 32)
    assert val[0][1]['origin'] == (0, 0) and val[0][0].shape[:2] == (64, 64)
    # the model's offset: (top, left) in patches, fractional where a crop starts inside a patch
    offsets = crop_offsets([{'origin': (16, 40)}, {'origin': (0, 0)}, {'origin': (3, 8)}], 16, 'cpu')
    assert offsets.dtype == torch.float32 and offsets.tolist() == [[1.0, 2.5], [0.0, 0.0], [0.1875, 0.5]]


def test_keep_sources_keeps_whole_images_evenly_spaced(tmp_path):
    from prepare import split
    make_synthetic(tmp_path / 'src', n_train=10, n_val=1, size=64, seed=1)
    split(tmp_path / 'src' / 'train', tmp_path / 'tiles' / 'train', size=32, gap=0, fmt='png', workers=1, classes=V1)
    ds = DOTADataset(tmp_path / 'tiles', 'train', V1)
    boxes = {f.stem: t['boxes'] for f, t in zip(ds.files, ds.targets)}
    assert ds.keep_sources(0.25) == (3, 10)  # ceil(10 / 4) sources: the 1st, 5th and 9th
    assert sorted({f.stem.split('__')[0] for f in ds.files}) == ['S00000', 'S00004', 'S00008']
    assert len(ds) == len(ds.targets) == len(ds.content) == 12  # every tile of a kept image, lists still aligned
    assert all(np.array_equal(boxes[f.stem], t['boxes']) for f, t in zip(ds.files, ds.targets))
    assert ds.keep_sources(1.0) == (3, 3) and len(ds) == 12
    with pytest.raises(ValueError, match=r'fraction must be in \(0, 1\]'):
        ds.keep_sources(0)
