import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat folder of scripts, not a package


@pytest.fixture(scope='session')
def dota_sample():
    """The real DOTA sample (../shared/dota_sample, or $DOTA_SAMPLE); tests using it skip when it is absent."""
    path = Path(os.environ.get('DOTA_SAMPLE', ROOT.parent / 'shared' / 'dota_sample'))
    if not (path / 'labelTxt').is_dir():
        pytest.skip(f'real DOTA sample not found at {path} (set DOTA_SAMPLE to its folder)')
    return path


def make_source(folder, img, lines):
    """A one-image DOTA source folder: folder/images/X1.png (img, (H, W, 3) uint8) and its label file (lines)."""
    (folder / 'images').mkdir(parents=True)
    (folder / 'labelTxt').mkdir()
    Image.fromarray(img).save(folder / 'images' / 'X1.png')
    (folder / 'labelTxt' / 'X1.txt').write_text('imagesource:test\ngsd:1\n' + ''.join(line + '\n' for line in lines))


def dets(boxes, scores, labels=None):
    """Detections of one image for the evaluator tests (class 0 unless labels are given)."""
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return {'boxes': boxes, 'scores': np.asarray(scores, float),
            'labels': np.zeros(len(boxes), int) if labels is None else np.asarray(labels)}


def gts(boxes, labels=None, difficult=None):
    """Ground truth of one image for the evaluator tests."""
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    n = len(boxes)
    return {'boxes': boxes, 'labels': np.zeros(n, int) if labels is None else np.asarray(labels),
            'difficult': np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool)}


@pytest.fixture(scope='session')
def nwpu():
    """NWPU VHR-10 in the DOTA layout (../shared/nwpu_vhr10, or $NWPU_VHR10); tests using it skip when absent."""
    path = Path(os.environ.get('NWPU_VHR10', ROOT.parent / 'shared' / 'nwpu_vhr10'))
    if not (path / 'val' / 'labelTxt').is_dir():
        pytest.skip(f'NWPU VHR-10 not found at {path} (set NWPU_VHR10 to its folder)')
    return path
