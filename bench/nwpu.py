"""Real aerial images the detector never trains on: NWPU VHR-10 at half resolution, the seed's rows.

    python bench/nwpu.py                                   # scratch vs jepa-object, equal fine-tuning epochs
    python bench/nwpu.py --budget both                     # + the pretrained rows at an equal total budget
    python bench/nwpu.py --rows all --out runs/nwpu        # the four rows of the seed (and the frozen checks)
    python bench/nwpu.py --label-fraction 0.25 --rows scratch,jepa-random,jepa-object-det --seeds 3
                                                           # labels on a quarter: no row reads any other label

The data: ../shared/nwpu_vhr10 (or --src, or $NWPU_VHR10), real Google Earth / Vaihingen images in the DOTA layout,
cut once by `prepare.py split --size 512 --gap 128 --rates 0.5` into OUT/data/{train,val} (496 / 83 tiles; at half
resolution the median object is ~32 px, DOTA-small). Val holds whole images that no row trains on.

Rows (each fine-tunes the same detector with the same recipe and is scored on val; which boxes each pretraining may
read: PRETRAIN below):
    scratch             fine-tuning only, from random weights
    jepa-random         JEPA pretraining, random masking (reads no label)
    jepa-object         object-aware masking: ground truth of the labelled images, random masks on the others
    jepa-object-det     the same, and on the others the boxes of the scratch row's detector (its own labels only)
    jepa-saliency       the EMA target's most distinctive tokens are hidden first (reads no label)
    jepa-object-oracle  every train image's ground truth: more boxes than a label fraction allows (a reference)
    pixels-random       MAE-style: random masking, normalized pixels as targets
    scratch-frozen      random backbone frozen, the head alone trained: what random features are worth
    jepa-object-frozen  jepa-object's pretrained backbone frozen: what its features are worth
With --label-fraction F < 1 every pretraining reads the fair split (fair_split): the other images reach it as
images alone. --seeds N fine-tunes each row N times and prints the mean and the range.
Pretraining (--pretrain-*: crops of --pretrain-img-size from the train tiles, each at its position in the tile, many
short steps) runs once per row and is cached: OUT/<row>/pretrain holds last.pt, log.jsonl (loss, mean_baseline) and
done.json (its command and minutes); a rerun or another row that asks for the same pretraining reuses it.
Budgets (--budget):
    epochs  every row fine-tunes for --epochs (pretraining amortized, as self-supervised papers report it)
    total   a pretrained row fine-tunes for --epochs minus the fine-tuning epochs its pretraining minutes would
            have bought (the scratch row's measured minutes per epoch): row name <row>@total, OUT/<row>@total/
Beside each row: its pretraining's loss / mean_baseline (last 50 logged steps; below 1 = it predicts more than each
image's mean target) and the linear probe of probe.py on the frozen encoder it starts from (object vs background AP,
small-object AP of val patches; random weights for scratch; the whole pretrained encoder, before --transfer-args).
A second table probes every encoder: random weights, each pretraining's context and EMA target encoder, and the
backbone of the fine-tuned scratch detector (what supervised training puts there, for reference).

The transfer: the whole pretrained encoder (--transfer-args adds finetune.py flags to the unfrozen pretrained rows),
learning at 0.1x the head's lr (DETR's backbone convention): at 1x the random head's first gradients overwrite it
(RESULTS.md).
Caching is by command line, the flags it resolves to (defaults included) and CODE_VERSION: a change of a script's
defaults reruns what it changes; a change of its code only when CODE_VERSION is bumped (else use a fresh OUT, or
delete OUT/<row>/done.json).

Each step is a plain command, printed before it runs (its output to OUT/<row>/*.log): any row reruns by hand.
OUT/<row>/finetune/best.pt is a normal finetune.py checkpoint (best val mAP50) for evaluate.py --ckpt.
"""
import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts, for their parsers
from ablation import ROOT, print_table, run  # noqa: E402
from data import DOTADataset  # noqa: E402
from labels import CLASSES  # noqa: E402

# Bumped when a change of the scripts' code (not their flags) changes what a cached step would produce, so that an
# old OUT reruns it. 2: crops keep their position in the tile (data.py 'origin', 2026-12-01). 3: pretraining crops
# stay inside each tile's image part (the manifest's 'content'; 42 % of these tiles' pixels are padding).
CODE_VERSION = 3
# The probes' own version: 4 leaves a padded tile's padding out of the patches it scores (it was background)
PROBE_VERSION = 4
# row: (pretrain.py's masking flags, the boxes its pretraining may read): 'none' (it reads no label file: every train
# image reaches it unlabelled), 'labelled' (ground truth of the labelled fraction; the other images reach it without
# their labels and are masked at random), 'detector' (the same, plus the boxes that the scratch row's detector,
# fine-tuned on the labelled fraction, finds on the other images), 'oracle' (every train image's ground truth: more
# boxes than the row's label budget, a reference only)
PRETRAIN = {'jepa-random': (['--mask', 'random'], 'none'),
            'jepa-object': (['--mask', 'object'], 'labelled'),
            'jepa-object-det': (['--mask', 'object'], 'detector'),
            'jepa-saliency': (['--mask', 'saliency'], 'none'),
            'jepa-object-oracle': (['--mask', 'object'], 'oracle'),
            'pixels-random': (['--mask', 'random', '--target', 'pixels'], 'none')}
ROWS = ['scratch', 'jepa-random', 'jepa-object', 'jepa-object-det', 'jepa-saliency', 'jepa-object-oracle',
        'pixels-random', 'scratch-frozen', 'jepa-object-frozen']


def prepare(src, dst):
    """Cut the train and val images into half-resolution 512^2 tiles once (skipped when the manifests exist and
    record each tile's image part; an older cut is redone)."""
    for split in ('train', 'val'):
        manifest = dst / split / 'manifest.json'
        if not manifest.exists() or 'content' not in json.loads(manifest.read_text())['tiles'][0]:
            if not (src / split / 'labelTxt').is_dir():
                raise SystemExit(f'NWPU VHR-10 not found: expected {src}/{split}/images and labelTxt '
                                 f'(pass --src or set NWPU_VHR10)')
            run(dst / f'split_{split}.log', 'prepare.py', 'split', '--src', src / split, '--dst', dst / split,
                '--size', 512, '--gap', 128, '--rates', 0.5)


def fair_split(data, fraction):
    """What a pretraining with a label budget may read: DATA/fair@F/train (the tiles of the labelled fraction of
    train's source images, as finetune.py --label-fraction picks them, with their labels) and DATA/fair@F/unlabelled
    (every other train tile, its manifest record stripped to the image: no label reaches the pretraining). The held-
    back truth of the unlabelled tiles goes to DATA/heldback@F/unlabelled, which only scores the detector's boxes.
    F = 0: every tile unlabelled. Rewritten each run (cheap). -> the fair folder."""
    tiles = json.loads((data / 'train' / 'manifest.json').read_text())
    ds = DOTADataset(data, 'train', CLASSES['dota1.0'])
    if fraction > 0:
        ds.keep_sources(fraction)
    labelled = {f.stem for f in ds.files} if fraction > 0 else set()
    fair, held = data / f'fair@{fraction:g}', data / f'heldback@{fraction:g}'
    absolute = [{**t, 'file': str(data / 'train' / t['file'])} for t in tiles['tiles']]
    parts = {fair / 'train': [t for t in absolute if t['name'] in labelled],
             fair / 'unlabelled': [{k: t[k] for k in ('name', 'file', 'width', 'height', 'content')}
                                   for t in absolute if t['name'] not in labelled],
             held / 'unlabelled': [t for t in absolute if t['name'] not in labelled]}
    for folder, part in parts.items():
        folder.mkdir(parents=True, exist_ok=True)
        text, path = json.dumps({**tiles, 'tiles': part}), folder / 'manifest.json'
        if not path.exists() or path.read_text() != text:  # atomic, and untouched when unchanged: a run beside
            (folder / 'manifest.json.tmp').write_text(text)  # this one may be reading it
            os.replace(folder / 'manifest.json.tmp', path)
    return fair


def resolved(cmd):
    """The flags a script command (a list: script, flags...) resolves to today, defaults included, as strings."""
    parser = importlib.import_module(Path(str(cmd[0])).stem).get_parser()
    return {k: str(v) for k, v in vars(parser.parse_args([str(c) for c in cmd[1:]])).items()}


def cached(folder, cmd, log, version=CODE_VERSION, deps=()):
    """Run `cmd` (a list) unless folder/done.json records the same command resolving to the same flags under the
    same `version`, made from the same `deps` (files it reads, by modification time: a checkpoint that was trained
    again is a new input) (so a change of a script's defaults reruns it; a change of its code only when the version
    is bumped). -> its minutes (the first run's)."""
    done, key, flags = folder / 'done.json', [str(c) for c in cmd], resolved(cmd)
    made_from = {str(d): os.path.getmtime(d) for d in deps}
    record = json.loads(done.read_text()) if done.exists() else {}
    if (record.get('cmd') == key and record.get('args') == flags and record.get('version', 1) == version
            and record.get('deps', {}) == made_from):
        print(f'# reused {folder} (same command, same defaults, same code version)')
        return record['minutes']
    minutes = run(log, *cmd) / 60
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({'cmd': key, 'args': flags, 'version': version, 'minutes': minutes,
                                'deps': made_from}))
    return minutes


def loss_ratio(log_path, last=50):
    """loss / mean_baseline over the last `last` logged steps of a pretrain.py log.jsonl."""
    recs = [json.loads(line) for line in open(log_path)]
    recs = [r for r in recs if 'loss' in r][-last:]
    return float(np.mean([r['loss'] for r in recs]) / np.mean([r['mean_baseline'] for r in recs]))


def over_seeds(runs):
    """[evaluate.py --sizes --json dicts] of one row's fine-tuning seeds -> (their mean in the same form, with the
    range of mAP50 and of small-object AP50 in 'extra')."""
    mean = lambda f: float(np.mean([f(r) for r in runs]))  # noqa: E731
    span = lambda f: f'{min(f(r) for r in runs):.3f}-{max(f(r) for r in runs):.3f}'  # noqa: E731
    sizes = {b: {'map50': None if runs[0]['sizes'][b]['map50'] is None else mean(lambda r: r['sizes'][b]['map50'])}
             for b in runs[0]['sizes']}
    return {'map50': mean(lambda r: r['map50']), 'map': mean(lambda r: r['map']), 'sizes': sizes,
            'extra': {'seeds': len(runs), 'mAP50 range': span(lambda r: r['map50']),
                      'small range': span(lambda r: r['sizes']['small']['map50'] or 0.0)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a('--src', default=os.environ.get('NWPU_VHR10', str(ROOT.parent / 'shared' / 'nwpu_vhr10')),
      help='NWPU VHR-10 in the DOTA layout, {train,val}/{images,labelTxt} (default: $NWPU_VHR10 or %(default)s)')
    a('--rows', default='scratch,jepa-object', help=f"comma-separated rows, or 'all' ({', '.join(ROWS)}) "
                                                    '(default: %(default)s)')
    a('--budget', choices=['epochs', 'total', 'both'], default='epochs',
      help='pretrained rows fine-tune for --epochs, or for what is left of the total budget, or both '
           '(default: %(default)s)')
    a('--model', default='mini', help='ViT preset (default: %(default)s)')
    a('--patch-size', type=int, default=16, help='patch size (default: %(default)s)')
    a('--img-size', type=int, default=512, help='fine-tuning crop side (default: %(default)s)')
    a('--epochs', type=int, default=20, help='fine-tuning epochs (default: %(default)s)')
    a('--pretrain-img-size', type=int, default=256, help='pretraining crop side: 4x fewer tokens than 512, ~5x the '
                                                         'images per second (default: %(default)s)')
    a('--pretrain-epochs', type=int, default=120, help='pretraining epochs: 1,800 steps; 60 probed and fine-tuned '
                                                       'worse (RESULTS.md, 2026-12-01) (default: %(default)s)')
    a('--pretrain-batch-size', type=int, default=32, help='pretraining batch (default: %(default)s)')
    a('--pretrain-args', default='--lr 1e-3 --warmup-epochs 3 --target-layers 2 --target-norm instance',
      help='further pretrain.py flags of every pretrained row, one string (default: %(default)s)')
    a('--transfer-args', default='--backbone-lr 0.1',
      help="finetune.py flags of the unfrozen rows that start from a pretrained encoder, one string: the whole "
           "encoder at 0.1x the head's lr started and ended better than at 1x (RESULTS.md, 2026-12-02); '' = 1x "
           "(default: %(default)s)")
    a('--label-fraction', type=float, default=1.0,
      help='F < 1: the labels of a fraction F of train\'s images, for every row: each fine-tunes on their tiles '
           '(finetune.py --label-fraction) and each pretraining reads no other label (fair_split: the other images '
           'reach it without label files); rows are named <row>@<F>labels (default: %(default)s)')
    a('--label-conf', type=float, default=0.3, help='jepa-object-det: the score a detected box needs to be used '
                                                    '(evaluate.py --label-conf) (default: %(default)s)')
    a('--seeds', type=int, default=1, help='fine-tune every row this many times (seeds --seed, --seed + 1, ...; '
                                           'the pretrainings shared) and print the mean and the range '
                                           '(default: %(default)s)')
    a('--finetune-args', default='', help='extra finetune.py flags for every row, one string')
    a('--no-probe', action='store_true', help='skip the linear probes (about a minute each)')
    a('--seed', type=int, default=0, help='seed of the pretrainings and of the first fine-tune (default: %(default)s)')
    a('--out', default='runs/nwpu', help='output folder, data cache included (default: %(default)s)')
    args = ap.parse_args()
    rows = ROWS if args.rows == 'all' else args.rows.split(',')
    if set(rows) - set(ROWS):
        raise SystemExit(f'unknown rows {sorted(set(rows) - set(ROWS))}; known: {", ".join(ROWS)}')
    if args.label_fraction == 1 and 'jepa-object-det' in rows:
        raise SystemExit('jepa-object-det masks the images without labels with a detector\'s boxes: it needs '
                         '--label-fraction < 1')
    budgets = ['epochs', 'total'] if args.budget == 'both' else [args.budget]
    out = Path(args.out).resolve()
    tag = f'@{args.label_fraction:g}labels' if args.label_fraction != 1 else ''  # the fine-tunes' folders and rows
    data = out / 'data'
    prepare(Path(args.src).resolve(), data)
    common = ['--data', data, '--device', 'cpu', '--workers', 2]
    size = ['--model', args.model, '--patch-size', args.patch_size]
    finetune = ['--img-size', args.img_size, '--batch-size', 8, '--eval-every', 2,
                *args.finetune_args.split(), *(['--label-fraction', args.label_fraction] if tag else [])]

    def probe(name, ckpt, encoder='context', size=()):
        """The probe of one encoder, cached like a pretraining -> its numbers (None with --no-probe)."""
        if args.no_probe:
            return None
        folder = out / 'probes' / name
        folder.mkdir(parents=True, exist_ok=True)
        cached(folder, ['probe.py', '--ckpt', ckpt, '--encoder', encoder, *size, '--data', data, '--workers', 2,
                        '--json', folder / 'probe.json'], folder / 'probe.log', PROBE_VERSION,
               deps=[ckpt] if ckpt != 'none' else [])
        return json.loads((folder / 'probe.json').read_text())

    def fine_tunes(cell, ckpt, epochs, frozen):
        """Fine-tune and evaluate one row at every seed (each cached) -> ([eval dicts], mean minutes per seed)."""
        row, evals, minutes = out / (cell + tag), [], []
        for seed in range(args.seed, args.seed + args.seeds):
            end = '' if seed == args.seed else f'_s{seed}'
            ft = row / f'finetune{end}'
            minutes.append(cached(ft, ['finetune.py', '--ckpt', ckpt, *(size if ckpt == 'none' else []), *common,
                                       '--seed', seed, *frozen, '--epochs', epochs, *finetune,
                                       *(args.transfer_args.split() if ckpt != 'none' and not frozen else []),
                                       '--out', ft], row / f'finetune{end}.log'))
            cached(row / f'eval{end}', ['evaluate.py', '--ckpt', ft / 'best.pt', '--device', 'cpu', '--workers', 2,
                                        '--sizes', '--json', row / f'eval{end}.json'], row / f'evaluate{end}.log',
                   deps=[ft / 'best.pt'])
            evals.append(json.loads((row / f'eval{end}.json').read_text()))
        return evals, float(np.mean(minutes))

    def detector_boxes():
        """The scratch row's detector (the labelled fraction only) on the unlabelled train tiles: its boxes as label
        files for jepa-object-det, scored against the held-back truth -> (boxes folder, its evaluate.py JSON)."""
        fine_tunes('scratch', 'none', args.epochs, [])
        ckpt, folder = out / f'scratch{tag}' / 'finetune' / 'best.pt', out / f'boxes{tag}'
        cached(folder, ['evaluate.py', '--ckpt', ckpt, '--data', data / f'heldback@{args.label_fraction:g}',
                        '--split', 'unlabelled', '--device', 'cpu', '--workers', 2, '--sizes', '--write-labels',
                        folder / 'boxes', '--label-conf', args.label_conf, '--out', folder, '--json',
                        folder / 'eval.json'], folder / 'evaluate.log', deps=[ckpt])
        return folder / 'boxes', json.loads((folder / 'eval.json').read_text())

    pre_minutes, results, probes, ratios, epoch_minutes, boxes = {}, {}, {}, {}, None, None
    for name in rows:
        source = name.removesuffix('-frozen')
        frozen = ['--freeze-backbone'] if name.endswith('-frozen') else []
        if source not in PRETRAIN:
            cells = {name: (0.0, 'none', args.epochs)}
            probes['random weights'] = probes.get('random weights') or probe('random', 'none', size=size)
        else:
            flags, reads = PRETRAIN[source]
            if reads == 'oracle' or (reads == 'labelled' and not tag):
                pre, reading = out / source / 'pretrain', ['--data', data]
            elif reads == 'none':
                fair = fair_split(data, 0)
                pre, reading = out / source / 'pretrain', ['--data', fair, '--unlabelled', fair / 'unlabelled']
            else:
                fair = fair_split(data, args.label_fraction)
                pre, reading = out / (source + tag) / 'pretrain', ['--data', fair, '--unlabelled', fair / 'unlabelled']
                if reads == 'detector':
                    boxes = boxes or detector_boxes()
                    reading += ['--unlabelled-boxes', boxes[0]]
            pre.mkdir(parents=True, exist_ok=True)
            if source not in pre_minutes:  # the frozen row reuses the unfrozen row's pretraining (and its time)
                pre_minutes[source] = cached(pre, ['pretrain.py', *reading, *common[2:], '--seed', args.seed, *size,
                                                   '--img-size', args.pretrain_img_size, *flags,
                                                   '--epochs', args.pretrain_epochs,
                                                   '--batch-size', args.pretrain_batch_size,
                                                   *args.pretrain_args.split(), '--out', pre],
                                             pre.parent / 'pretrain.log',
                                             deps=[boxes[0] / 'detections.json'] if reads == 'detector' else [])
                ratios[source] = loss_ratio(pre / 'log.jsonl')
                probes[f'{source} (context)'] = probe(pre.parent.name + '-context', pre / 'last.pt')
                if '--target' not in flags:  # pixel targets have no EMA encoder worth probing
                    probes[f'{source} (EMA target)'] = probe(pre.parent.name + '-target', pre / 'last.pt', 'target')
            cells = {}
            if 'epochs' in budgets:
                cells[name] = (pre_minutes[source], pre / 'last.pt', args.epochs)
            if 'total' in budgets and not frozen:
                if epoch_minutes is None:
                    raise SystemExit('--budget total needs the scratch row first (its minutes per epoch)')
                left = args.epochs - round(pre_minutes[source] / epoch_minutes)
                if left < 1:  # one epoch anyway: the minutes column then shows the overrun
                    print(f'# the pretraining of {source} took the whole budget; {name}@total fine-tunes 1 epoch')
                    left = 1
                cells[f'{name}@total'] = (pre_minutes[source], pre / 'last.pt', left)
        for cell, (minutes, ckpt, epochs) in cells.items():
            evals, ft_minutes = fine_tunes(cell, ckpt, epochs, frozen)
            if cell == 'scratch':
                epoch_minutes = ft_minutes / epochs
                probes['fine-tuned scratch backbone'] = probe(f'scratch-finetuned{tag}',
                                                              out / (cell + tag) / 'finetune' / 'best.pt')
            r = over_seeds(evals)
            start = probes.get(f'{source} (context)' if source in PRETRAIN else 'random weights') or {}
            r['extra'].update({'epochs': epochs, 'loss/base': ratios.get(source), 'probe obj': start.get('obj_ap'),
                               'probe small': start.get('small_ap')})
            r['seeds'] = evals
            results[cell + tag] = (r, minutes + ft_minutes)
    n_val = len(json.loads((data / 'val' / 'manifest.json').read_text())['tiles'])
    print(f'\nNWPU VHR-10 val ({n_val} half-resolution tiles of held-out images), {args.model} ViT/{args.patch_size}, '
          f'{args.epochs} fine-tuning epochs{f" on {args.label_fraction:g} of the train images" if tag else ""}; '
          f'pretraining: {args.pretrain_epochs} epochs of {args.pretrain_img_size}² '
          f'crops ({args.pretrain_args}); @total: fine-tuned for what the pretraining left of the budget; '
          f'mean of {args.seeds} fine-tuning seed(s), minutes per seed')
    print_table(results, ('small', 'medium'), extra=('epochs', 'seeds', 'loss/base', 'probe obj', 'probe small',
                                                     'mAP50 range', 'small range'))
    if boxes:
        n = json.loads((boxes[0] / 'detections.json').read_text())
        print(f'\njepa-object-det\'s boxes: scratch{tag}\'s detector on the {n["images"]} unlabelled train tiles, '
              f'{n["boxes"]} boxes scoring >= {n["min_score"]} ({sum(c["n_gt"] for c in boxes[1]["classes"].values())} '
              f'objects there); its mAP50 / mAP50-95 there against the held-back truth: {boxes[1]["map50"]:.3f} / '
              f'{boxes[1]["map"]:.3f}, small AP50 {boxes[1]["sizes"]["small"]["map50"] or 0:.3f}')
    if probes and not args.no_probe:
        print(f'\nlinear probe of frozen patch tokens (probe.py), val: {next(iter(probes.values()))["n_val"]} patches')
        print(f'{"encoder":<34}{"probe mAP":>10}{"obj AP":>10}{"small AP":>10}')
        for k, r in probes.items():
            print(f'{k:<34}' + ''.join(f'{r[m]:>10.3f}' if r[m] is not None else f'{"-":>10}'
                                       for m in ('map', 'obj_ap', 'small_ap')))
    (out / 'results.json').write_text(json.dumps({'rows': {k: {**v[0], 'minutes': v[1]} for k, v in results.items()},
                                                  'probes': probes, 'boxes': boxes and boxes[1]}, indent=2))


if __name__ == '__main__':
    main()
