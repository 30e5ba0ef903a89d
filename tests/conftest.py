import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat folder of scripts, not a package


@pytest.fixture(scope='session')
def dota_sample():
    """The real DOTA sample (../shared/dota_sample, or $DOTA_SAMPLE); tests using it skip when it is absent."""
    path = Path(os.environ.get('DOTA_SAMPLE', ROOT.parent / 'shared' / 'dota_sample'))
    if not (path / 'labelTxt').is_dir():
        pytest.skip(f'real DOTA sample not found at {path} (set DOTA_SAMPLE to its folder)')
    return path
