"""`prepare.py check` and the Dataset on a corpus of damaged files: each is read or reported by path and reason,
the walk goes on, the exit status says so, and training skips what it cannot decode (--strict: stops)."""
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data import DOTADataset
from labels import CLASSES, LabelError
from prepare import check

V1 = CLASSES['dota1.0']
LABEL = 'imagesource:test\n2 2 20 2 20 20 2 20 ship 0\n'


def image_bytes(fmt, size=48):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def damaged_split(root):
    """A split folder with one good image and a file of every kind of damage. -> {file name: expected words}."""
    img, lbl = root / 'images', root / 'labelTxt'
    img.mkdir(parents=True)
    lbl.mkdir()
    jpg, png = image_bytes('JPEG'), image_bytes('PNG')
    (img / 'good.png').write_bytes(png)
    (img / 'text.jpg').write_text('this is not an image\n')
    (img / 'empty.png').write_bytes(b'')
    (img / 'cut.jpg').write_bytes(jpg[:len(jpg) // 2])  # header fine, data truncated
    bad = bytearray(png)
    bad[len(bad) // 2:len(bad) // 2 + 64] = bytes(64)  # a corrupt PNG data chunk (its CRC no longer matches)
    (img / 'corrupt.png').write_bytes(bytes(bad))
    (img / 'folder.png').mkdir()
    os.symlink(root / 'nowhere.png', img / 'dangling.png')
    (img / 'wrong.jpg').write_bytes(png)  # readable: PNG data under a .jpg name
    (img / 'notes.txt').write_text('not an image extension')
    (img / 'dirlabel.png').write_bytes(png)
    (img / 'binary.png').write_bytes(png)
    for name in ('good', 'text', 'empty', 'cut', 'corrupt', 'folder', 'dangling', 'wrong', 'orphan'):
        (lbl / f'{name}.txt').write_text(LABEL)
    (lbl / 'dirlabel.txt').mkdir()
    (lbl / 'binary.txt').write_bytes(b'\x89\xff\x00 not text')
    return {'text.jpg': "not an image (the file starts with b'this is ", 'empty.png': 'zero bytes',
            'cut.jpg': 'truncated', 'corrupt.png': 'cannot read the image', 'folder.png': 'a directory where',
            'dangling.png': 'cannot be opened (No such file or directory)',
            'dirlabel.txt': 'cannot read the label file (Is a directory)', 'binary.txt': 'not UTF-8 text'}


def test_check_reports_every_damaged_file_and_goes_on(tmp_path):
    errors = damaged_split(tmp_path / 'data' / 'train')
    p = subprocess.run([sys.executable, ROOT / 'prepare.py', 'check', '--data', tmp_path / 'data', '--workers', '2'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    lines = [line for line in p.stdout.splitlines() if 'ERROR' in line]
    assert len(lines) == len(errors), p.stdout
    for name, words in errors.items():
        assert any(name in line and words in line for line in lines), (name, p.stdout)
    out = p.stdout
    assert 'wrong.jpg: PNG data in a .jpg file' in out and '1 x extension does not match' in out
    assert '1 x file without an image extension in images/' in out and 'notes.txt' in out
    assert '1 x label file without an image' in out and 'orphan.txt' in out
    assert '10 images (4 readable)' in out  # good, wrong, dirlabel, binary
    assert f'{len(errors)} error(s)' in out


def test_permission_denied_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip('running as root: file permissions do not stop root from reading')
    root = tmp_path / 'data' / 'train'
    (root / 'images').mkdir(parents=True)
    (root / 'images' / 'locked.png').write_bytes(image_bytes('PNG'))
    (root / 'images' / 'locked.png').chmod(0)
    assert check(tmp_path / 'data', V1, workers=1) == 1


def test_dataset_skips_damaged_images_with_a_counted_warning_and_strict_stops(tmp_path):
    damaged_split(tmp_path / 'train')
    for name in ('dirlabel', 'binary'):  # label errors stay errors (they name the file); images are skipped
        (tmp_path / 'train' / 'labelTxt' / f'{name}.txt').rename(tmp_path / f'{name}.txt')
    with pytest.warns(UserWarning) as caught:
        ds = DOTADataset(tmp_path, 'train', V1, img_size=32, train=True)
    names = sorted(f.name for f in ds.files)
    assert names == ['binary.png', 'corrupt.png', 'cut.jpg', 'dirlabel.png', 'good.png', 'wrong.jpg']  # headers read
    assert any('4 x unreadable image (skipped)' in str(w.message) for w in caught)
    cut = names.index('cut.jpg')
    with pytest.warns(UserWarning, match=r'cut.jpg: cannot read the image .*1 damaged image\(s\) so far'):
        img, target = ds[cut]
    assert img.shape == (32, 32, 3) and len(target['boxes']) == 0 and ds.damaged == [str(ds.files[cut])]
    with pytest.warns(UserWarning, match=r'corrupt.png: cannot read the image .*2 damaged image\(s\) so far'):
        ds[names.index('corrupt.png')]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ds[names.index('good.png')]  # a good image: no warning
    for f in ('labelTxt/orphan.txt', 'images/binary.png', 'images/dirlabel.png'):  # other warnings, not images
        (tmp_path / 'train' / f).unlink()
    with pytest.raises(LabelError, match='unreadable image'):
        DOTADataset(tmp_path, 'train', V1, img_size=32, train=True, strict=True)
    ds.strict = True
    with pytest.raises(ValueError, match='cut.jpg'):
        ds[cut]
