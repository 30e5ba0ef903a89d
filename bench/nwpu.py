"""Real aerial images the detector never trains on: NWPU VHR-10 at half resolution, rows at equal budgets.

    python bench/nwpu.py                                   # scratch vs jepa-object, 35 min on 2 CPU cores
    python bench/nwpu.py --rows scratch-frozen,jepa-object-frozen
    python bench/nwpu.py --rows all --out runs/nwpu

The data: ../shared/nwpu_vhr10 (or --src, or $NWPU_VHR10), real Google Earth / Vaihingen images in the DOTA layout,
cut once by `prepare.py split --size 512 --gap 128 --rates 0.5` into OUT/data/{train,val} (496 / 83 tiles; at half
resolution the median object is ~32 px, DOTA-small). Val holds whole images that no row trains on.

Rows (each fine-tunes the same detector with the same recipe and is scored on val):
    scratch             fine-tuning only, from random weights
    jepa-object         JEPA pretraining, object-aware masking (hidden patches drawn from GT boxes first)
    jepa-random         JEPA pretraining, random masking
    pixels-random       MAE-style: random masking, normalized pixels as targets
    scratch-frozen      random backbone frozen, the head alone trained: what random features are worth
    jepa-object-frozen  jepa-object's pretrained backbone frozen: what its features are worth
Equal budgets: a pretrained row spends --pretrain-epochs on pretraining the train tiles and then fine-tunes for
--epochs minus the fine-tuning epochs its pretraining cost (--pretrain-cost: the time of one pretraining epoch in
fine-tuning epochs, measured on 2 CPU cores); the minutes column shows what each row really took. A frozen row
shares its pretraining with the unfrozen one (run once, under OUT/<row>/pretrain) and counts its minutes.

Each step is a plain command, printed before it runs (its output to OUT/<row>/*.log): any row reruns by hand.
OUT/<row>/finetune/best.pt is a normal finetune.py checkpoint (best val mAP50) for evaluate.py --ckpt.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import RECIPE, ROOT, print_table, run  # noqa: E402

PRETRAIN = {'jepa-object': ['--mask', 'object'], 'jepa-random': ['--mask', 'random'],
            'pixels-random': ['--mask', 'random', '--target', 'pixels']}
ROWS = ['scratch', 'jepa-object', 'jepa-random', 'pixels-random', 'scratch-frozen', 'jepa-object-frozen']


def prepare(src, dst):
    """Cut the train and val images into half-resolution 512^2 tiles once (skipped when the manifests exist)."""
    for split in ('train', 'val'):
        if not (dst / split / 'manifest.json').exists():
            if not (src / split / 'labelTxt').is_dir():
                raise SystemExit(f'NWPU VHR-10 not found: expected {src}/{split}/images and labelTxt '
                                 f'(pass --src or set NWPU_VHR10)')
            run(dst / f'split_{split}.log', 'prepare.py', 'split', '--src', src / split, '--dst', dst / split,
                '--size', 512, '--gap', 128, '--rates', 0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--src', default=os.environ.get('NWPU_VHR10', str(ROOT.parent / 'shared' / 'nwpu_vhr10')),
                    help='NWPU VHR-10 in the DOTA layout, {train,val}/{images,labelTxt} (default: $NWPU_VHR10 or '
                         '%(default)s)')
    ap.add_argument('--rows', default='scratch,jepa-object', help=f"comma-separated rows, or 'all' ({', '.join(ROWS)})"
                                                                  ' (default: %(default)s)')
    ap.add_argument('--model', default='mini', help='ViT preset (default: %(default)s)')
    ap.add_argument('--patch-size', type=int, default=16, help='patch size (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=512, help='training crop side (default: %(default)s)')
    ap.add_argument('--epochs', type=int, default=20, help='the budget, in fine-tuning epochs (default: %(default)s)')
    ap.add_argument('--pretrain-epochs', type=int, default=12, help='pretraining epochs of the pretrained rows '
                                                                    '(default: %(default)s)')
    ap.add_argument('--pretrain-batch-size', type=int, default=32, help='pretraining batch (default: %(default)s)')
    ap.add_argument('--pretrain-cost', type=float, default=0.5, help='minutes of one pretraining epoch / minutes of '
                                                                     'one fine-tuning epoch (default: %(default)s)')
    ap.add_argument('--finetune-args', default='', help='extra finetune.py flags for every row, one string')
    ap.add_argument('--seed', type=int, default=0, help='seed of every run (default: %(default)s)')
    ap.add_argument('--out', default='runs/nwpu', help='output folder, data cache included (default: %(default)s)')
    args = ap.parse_args()
    rows = ROWS if args.rows == 'all' else args.rows.split(',')
    if set(rows) - set(ROWS):
        raise SystemExit(f'unknown rows {sorted(set(rows) - set(ROWS))}; known: {", ".join(ROWS)}')
    out = Path(args.out).resolve()
    data = out / 'data'
    prepare(Path(args.src).resolve(), data)
    common = ['--data', data, '--device', 'cpu', '--workers', 2, '--seed', args.seed]
    ft_epochs = args.epochs - round(args.pretrain_epochs * args.pretrain_cost)
    if ft_epochs < 1:
        raise SystemExit(f'--pretrain-epochs {args.pretrain_epochs} cost the whole budget of {args.epochs} epochs')
    pre_minutes, results = {}, {}
    for name in rows:
        source = name.removesuffix('-frozen')
        frozen = ['--freeze-backbone'] if name.endswith('-frozen') else []
        row, minutes, ckpt, epochs = out / name, 0.0, 'none', args.epochs
        if source in PRETRAIN:
            pre = out / source / 'pretrain'
            if source not in pre_minutes:  # the frozen row reuses the unfrozen row's pretraining (and its time)
                pre_minutes[source] = run(out / source / 'pretrain.log', 'pretrain.py', *common, '--model',
                                          args.model, '--patch-size', args.patch_size, '--img-size', args.img_size,
                                          *PRETRAIN[source], '--epochs', args.pretrain_epochs, '--batch-size',
                                          args.pretrain_batch_size, '--lr', 1e-3, '--warmup-epochs', 1,
                                          '--out', pre) / 60
            minutes, ckpt, epochs = pre_minutes[source], pre / 'last.pt', ft_epochs
        size = ['--model', args.model, '--patch-size', args.patch_size] if ckpt == 'none' else []
        minutes += run(row / 'finetune.log', 'finetune.py', '--ckpt', ckpt, *size, *common, *frozen, '--img-size',
                       args.img_size, '--epochs', epochs, '--batch-size', 8, *RECIPE, '--num-queries', 300,
                       '--eval-every', 2, *args.finetune_args.split(), '--out', row / 'finetune') / 60
        run(row / 'evaluate.log', 'evaluate.py', '--ckpt', row / 'finetune' / 'best.pt', '--device', 'cpu',
            '--workers', 2, '--sizes', '--json', row / 'eval.json')
        results[name] = (json.loads((row / 'eval.json').read_text()), minutes)
    n_val = len(json.loads((data / 'val' / 'manifest.json').read_text())['tiles'])
    print(f'\nNWPU VHR-10 val ({n_val} half-resolution tiles of held-out images), {args.model} ViT/{args.patch_size}, '
          f'budget {args.epochs} fine-tuning epochs (pretrained rows: {args.pretrain_epochs} pretraining + '
          f'{ft_epochs} fine-tuning)')
    print_table(results, ('small', 'medium'))
    (out / 'results.json').write_text(json.dumps({k: {**v[0], 'minutes': v[1]} for k, v in results.items()},
                                                 indent=2))


if __name__ == '__main__':
    main()
