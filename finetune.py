"""Fine-tune a DETR-style detector whose backbone is a pretrained JEPA encoder.

    python finetune.py --ckpt runs/pretrain/last.pt --data dota
    python finetune.py --ckpt none --model mini --patch-size 8 ...      # from scratch, the baseline

The detector (detector.Detector) predicts a box and class scores at every cell of a map at the patch's stride and,
for the objects under two of its cells (--fine), of a map at half that stride. Training matches each ground-truth
box to exactly one prediction (matcher.MinCostMatcher); no NMS at inference.
The defaults (the two levels, the spatial prior, a matcher that prefers the cell nearest each object's
centre, lr 5e-4, varifocal loss) are the recipe measured best on NWPU VHR-10 val and, for tiny objects, on the
synthetic set (RESULTS.md; what lost there is in its "tried and removed" table).
OUT/results.csv gets one line per epoch (losses, lr, val mAP50 and mAP50-95, seconds) and, with matplotlib
installed, results.png draws it;
--time MINUTES fits the run to a wall-clock budget. The model is
evaluated on the val split every --eval-every epochs (evaluate.run_eval). OUT/best.pt keeps the best mAP50;
OUT/last.pt, written atomically every --save-every steps and at each epoch end, holds everything --resume needs
(model, optimizer, scaler, step,
position in the epoch, RNG state, best score): a resumed run repeats an uninterrupted one exactly on a CPU. Both
hold the model, the args and the class names that evaluate.py needs.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import runtime
from data import DOTADataset, crop_offsets, epoch_loader, make_loader, to_input
from labels import CLASSES
from evaluate import plot_results, run_eval
from detector import Detector
from matcher import MinCostMatcher, detector_loss
from model import PRESETS, build_vit, lr_at, param_groups
from prepare import resolve_data


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help="pretrain.py checkpoint, or 'none' to train from scratch")
    ap.add_argument('--data', default=None, help="dataset folder or 'dota'/'synthetic'; default: the pretraining "
                                                 "data (or 'dota' with --ckpt none)")
    ap.add_argument('--classes', default=None, choices=list(CLASSES), help='class list; default: the pretraining '
                                                                           "one (or 'dota1.0')")
    ap.add_argument('--model', default=None, choices=list(PRESETS), help='ViT preset; read from --ckpt, '
                                                                         "required with --ckpt none")
    ap.add_argument('--patch-size', type=int, default=None, help='patch size; read from --ckpt (16 with none)')
    ap.add_argument('--img-size', type=int, default=512, help='training crop side (default: %(default)s)')
    ap.add_argument('--boxes', choices=['hbb', 'obb'], default='hbb',
                    help='hbb: axis-aligned boxes (DOTA task 2); obb: oriented boxes (cx, cy, w, h, theta) from the '
                         'label polygons (task 1), trained with ProbIoU, evaluated by polygon IoU (default: '
                         '%(default)s)')
    ap.add_argument('--no-flips', action='store_true', help='train without the random flips and 90-degree turns '
                                                            '(random crops stay): for overfitting checks')
    ap.add_argument('--label-fraction', type=float, default=1.0, help='F < 1: train on the tiles of a fraction F of '
                    "train's source images, evenly spaced in name order (0.25: every 4th): fine-tuning on fewer labels "
                    'than the pretraining saw images; val is unchanged (default: %(default)s)')
    ap.add_argument('--strict', action='store_true', help='stop at a damaged image or a repaired label instead of '
                                                          'skipping it with a counted warning')
    ap.add_argument('--epochs', type=int, default=50, help='passes over the train split (default: %(default)s)')
    ap.add_argument('--time', type=float, default=None, help='a wall-clock budget in minutes: after each epoch the '
                    'number of epochs that fit (at the mean time per epoch so far, evaluations included) replaces '
                    '--epochs and the lr schedule is re-spanned over it, as Ultralytics time= does; a resumed run '
                    'counts the time its checkpoint had spent (default: off)')
    ap.add_argument('--batch-size', type=int, default=16, help='images per step (default: %(default)s)')
    ap.add_argument('--lr', type=float, default=5e-4, help='peak AdamW learning rate (default: %(default)s)')
    ap.add_argument('--backbone-lr', type=float, default=1.0,
                    help='the whole backbone learns at this times the lr: DETR trains its '
                         'pretrained backbone at 0.1x, so that the random head\'s first gradients do not overwrite it '
                         '(default: %(default)s)')
    ap.add_argument('--freeze-backbone', action='store_true', help='train the head only (a linear-probe-like check '
                                                                  'of the pretrained features)')
    ap.add_argument('--match-centre', type=float, default=1.0,
                    help="w > 0: the matcher's cost also counts w x the cell's distance to the object's centre (L1, "
                         'in cells), so that of two neighbouring cells predicting the same box the nearer one is '
                         'the positive: a rule the head can learn, where a choice by their nearly equal scores is '
                         'not (NWPU VHR-10 val, 20 epochs: mAP50 0.328 vs 0.277 with 0, fewer duplicates; '
                         'RESULTS.md) (default: %(default)s)')
    ap.add_argument('--warmup-epochs', type=float, default=2, help='linear warmup length (default: %(default)s)')
    ap.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay (default: %(default)s)')
    ap.add_argument('--clip-grad', type=float, default=1.0, help='gradient-norm clip, 0 = off (default: %(default)s)')
    ap.add_argument('--head-dim', type=int, default=128, help='width of the detection head (default: %(default)s)')
    ap.add_argument('--stride', type=int, default=None, help='stride of the prediction map: the patch size divided '
                    'by a power of 2 (patch 16: 16 or 8; patch 8: 8 or 4) (default: the patch size)')
    ap.add_argument('--fine', type=float, default=None, help='T > 0: a second prediction map at --stride / 2 (half '
                    "the head's width, its own pixel detail) for the objects under T px (longer side); the --stride "
                    'map keeps the rest; 0 = one map. NWPU VHR-10 val at a quarter of the labels, patch 16: mAP50 '
                    '0.265 vs 0.189 for one stride-8 map; synthetic tiny objects, patch 8: 0.911 vs 0.814 without '
                    '(RESULTS.md). Needs --stride 8 or coarser (default: 2 x --stride; 0 at --stride 4)')
    ap.add_argument('--ring-boxes', type=float, default=1.0, help='W > 0: the other cells of each object\'s centre '
                    'region also regress its box, W x the box loss averaged over them, so that they point at the '
                    'object\'s centre outside them (for --centre-gate; matcher.detection_loss w_ring; with --fine, on '
                    'the coarser level only). NWPU val, 20 epochs, with the gate: mAP50 0.346 vs 0.328 with neither '
                    '(RESULTS.md) (default: %(default)s)')
    ap.add_argument('--centre-gate', type=float, default=0.1, help='m: a cell reports only a box whose centre '
                    'lies within 0.5 + m cells of its own centre (at evaluation, and in training: the others are not '
                    'negatives); a per-cell rule against duplicates, no NMS; saved in the checkpoint for evaluate.py; '
                    'a negative value: off (default: %(default)s)')
    ap.add_argument('--spatial-prior', action=argparse.BooleanOptionalAction, default=True,
                    help='add a small CNN\'s map of the pixels (3x3 stride-2 convolutions down to --stride) to the '
                    'neck\'s output: local detail for objects smaller than a patch (detector.SpatialPrior; NWPU val, '
                    '20 epochs: mAP50 0.277 vs 0.233 without, at 1.2x the time per epoch) (default: on)')
    ap.add_argument('--eval-every', type=int, default=5, help='evaluate on val every N epochs and at the end '
                                                              '(default: %(default)s)')
    ap.add_argument('--conf', type=float, default=0.001, help='score floor at evaluation (default: %(default)s)')
    ap.add_argument('--max-det', type=int, default=1000, help='top-K detections per image (default: %(default)s)')
    ap.add_argument('--resume', default=None, help="a last.pt to continue from ('auto': OUT/last.pt if it exists); "
                                                   'pass the same flags as the interrupted run')
    ap.add_argument('--max-steps', type=int, default=None, help='stop (with a checkpoint) after this many optimizer '
                                                                'steps; the schedule still spans --epochs')
    ap.add_argument('--save-every', type=int, default=500, help='also write OUT/last.pt every N steps (default: '
                                                                '%(default)s)')
    ap.add_argument('--compile', action='store_true', help='torch.compile the detector (GPU runs)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    ap.add_argument('--amp', default='bf16', choices=['bf16', 'fp16', 'off'],
                    help='autocast on CUDA (fp16 adds loss scaling); the CPU runs float32 (default: %(default)s)')
    ap.add_argument('--workers', type=int, default=4, help='data-loader threads (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    ap.add_argument('--out', default='runs/finetune', help='output folder (default: %(default)s)')
    return ap


def build(args):
    """The detector, with the pretrained encoder loaded when --ckpt is a file. Fills args from the checkpoint."""
    state = None
    if args.ckpt != 'none':
        ckpt = torch.load(args.ckpt, map_location='cpu', weights_only=True)
        pa = ckpt['args']
        for flag in ('model', 'patch_size'):
            if getattr(args, flag) not in (None, pa[flag]):
                raise SystemExit(f'--{flag.replace("_", "-")} {getattr(args, flag)} differs from the checkpoint '
                                 f'({pa[flag]}); leave it unset')
            setattr(args, flag, pa[flag])
        args.data = args.data or pa['data']
        args.classes = args.classes or pa['classes']
        state = ckpt['context']  # the encoder that saw only the visible patches
    elif args.model is None:
        raise SystemExit('--ckpt none needs --model (a preset: ' + ', '.join(PRESETS) + ')')
    args.patch_size, args.data, args.classes = args.patch_size or 16, args.data or 'dota', args.classes or 'dota1.0'
    backbone = build_vit(args.model, args.patch_size)
    if state is not None:
        backbone.load_state_dict(state)  # strict: every key of the encoder must match
    try:  # Detector's defaults: a coarse cell per token, and a map at half its stride for what is under two cells
        model = Detector(backbone, len(CLASSES[args.classes]), args.head_dim, args.stride, obb=args.boxes == 'obb',
                         spatial_prior=args.spatial_prior, fine=args.fine)
    except ValueError as e:  # name the flags that were given (an unset one took Detector's default)
        given = [f'--{k} {v}' for k, v in (('stride', args.stride), ('fine', args.fine)) if v is not None]
        raise SystemExit(f'{" ".join(given) or "the detector"}: {e}')
    args.stride, args.fine = model.stride, model.fine  # the checkpoint records what was built
    return model


def lr_parts(model, backbone=1.0):
    """(module, lr scale) pairs for param_groups: the backbone at `backbone` (DETR's lower backbone lr: 0.1 there),
    the head at 1."""
    return [(model.backbone, backbone)] + [(m, 1.0) for name, m in model.named_children() if name != 'backbone']


def shared_centre_share(ds, stride):
    """Share of GT boxes whose centre falls in a stride x stride cell that holds another GT centre (whole images,
    as labelled; computed once)."""
    shared = total = 0
    for t in ds.targets:
        if len(t['boxes']) == 0:
            continue
        b = t['boxes']  # (n, 4) xyxy or (n, 5) oriented, whose first two numbers are the centre
        c = ((b[:, :2] if b.shape[1] == 5 else (b[:, :2] + b[:, 2:]) / 2) // stride).astype(np.int64)  # (n, 2)
        _, inverse, counts = np.unique(c, axis=0, return_inverse=True, return_counts=True)
        shared += int((counts[inverse.ravel()] > 1).sum())
        total += len(c)
    return shared / max(total, 1)


def write_results(path, row):
    """Append one epoch's numbers to results.csv (the header first; a resumed run keeps appending)."""
    fmt = lambda v: f'{v:.6g}' if isinstance(v, float) else str(v)  # noqa: E731
    new = not os.path.exists(path)
    with open(path, 'a') as f:
        f.write((','.join(row) + '\n' if new else '') + ','.join(fmt(v) for v in row.values()) + '\n')


def main(argv=None):
    args = get_parser().parse_args(argv)
    ddp, rank, world, device = runtime.start(args.device)  # under torchrun: one process per GPU
    cuda = device.type == 'cuda'
    main0 = rank == 0  # prints, evaluates and checkpoints
    gate = args.centre_gate if args.centre_gate >= 0 else None  # the checkpoint keeps the flag as given
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[args.amp] if cuda else None
    model.to(device)
    class_names = CLASSES[args.classes]
    root = resolve_data(args.data)
    ds = DOTADataset(root, 'train', class_names, args.img_size, train=True, strict=args.strict,
                     flips=not args.no_flips, boxes=args.boxes)
    if args.label_fraction != 1:  # a value outside (0, 1] gets keep_sources' error, not silence
        kept, of = ds.keep_sources(args.label_fraction)
        if main0:
            print(f'--label-fraction {args.label_fraction:g}: {len(ds)} train tiles of {kept} of {of} source '
                  'images')
    val_loader = make_loader(root, 'val', class_names, None, args.batch_size, False, args.workers, args.patch_size,
                             strict=args.strict, boxes=args.boxes)
    steps_per_epoch = len(ds) // (args.batch_size * world)
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(ds)} training images are fewer than one step: --batch-size x GPUs = '
                         f'{args.batch_size * world}')
    most = max((len(t['boxes']) for t in ds.targets), default=0)

    if args.freeze_backbone:
        model.backbone.requires_grad_(False)  # param_groups skips frozen parameters
    opt = torch.optim.AdamW(param_groups(lr_parts(model, args.backbone_lr), args.weight_decay), lr=args.lr)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    matcher = MinCostMatcher(w_ctr=args.match_centre)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    best, step, start_epoch, start_batch, spent = -1.0, 0, 0, 0, 0.0
    last, args.resume, ck = runtime.resume_point(args.out, args.resume)
    if ck is not None:
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        scaler.load_state_dict(ck['scaler'])
        step, start_epoch, start_batch, best = ck['step'], ck['epoch'], ck['batch'], ck['best']
        spent = ck.get('seconds', 0.0)  # the run's time so far: results.csv and --time count from its start
        if args.time:  # the epochs the budget allowed when the checkpoint was written, not --epochs: same lr schedule
            args.epochs = ck['args']['epochs']
            total = args.epochs * steps_per_epoch
        runtime.set_rng_state(ck['rng'])
    fwd = DDP(model, device_ids=[device] if cuda else None) if ddp else model
    fwd = torch.compile(fwd) if args.compile else fwd
    say = print if main0 else (lambda *a, **k: None)
    say(f'detector ({args.boxes}): {args.model} ViT/{args.patch_size} backbone ({args.ckpt}), '
        f'stride {model.stride}{f" (+ {model.stride // 2} for objects under {args.fine:g} px)" if args.fine else ""}, '
        f'most objects in a training image: {most}, {len(ds)} train / {len(val_loader.dataset)} val images, '
        f'{world} process(es)')
    for s in sorted({16, model.stride}, reverse=True):  # how often the one-cell-one-object assumption breaks
        say(f'GT whose centre cell at stride {s} holds another GT centre: {shared_centre_share(ds, s):.1%}')
    if args.resume:
        say(f'resumed from {args.resume}: epoch {start_epoch + 1}, batch {start_batch}, step {step}')

    def checkpoint(epoch, batch):
        """OUT/last.pt: everything a resume needs."""
        runtime.save(last, {'model': model.state_dict(), 'optimizer': opt.state_dict(),
                            'scaler': scaler.state_dict(), 'step': step, 'epoch': epoch, 'batch': batch, 'best': best,
                            'seconds': time.time() - t_start, 'rng': runtime.rng_state(), 'args': vars(args),
                            'class_names': class_names})

    t_start, epoch = time.time() - spent, start_epoch
    csv_path = os.path.join(args.out, 'results.csv')
    if main0:  # the epochs the checkpoint completed (none for a fresh run)
        runtime.keep_log_lines(csv_path, lambda r: int(r.split(',', 1)[0]) <= start_epoch, header=1)
    while epoch < args.epochs:  # a while: --time changes args.epochs as it goes
        model.train()
        first = start_batch if epoch == start_epoch else 0
        loader = epoch_loader(ds, args.batch_size, args.patch_size, args.workers, args.seed, epoch, first, rank, world)
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', dynamic_ncols=True, disable=not main0)
        diag, sums, batch = {'iou': [], 'above_0.3_per_gt': []}, {}, first
        for images, targets in bar:
            lr = lr_at(step, total, warmup, args.lr)
            for g in opt.param_groups:
                g['lr'] = lr * g['lr_scale']
            n_gt = torch.tensor(float(sum(len(t['boxes']) for t in targets)), device=device)
            if ddp:  # DDP averages gradients over ranks: divide by the mean GT count, so the sum is over all GT
                dist.all_reduce(n_gt)
                n_gt /= world
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = fwd(to_input(images, targets, device), crop_offsets(targets, args.patch_size, device))
                loss, parts = detector_loss(out, targets, matcher, num_gt=n_gt, w_ring=args.ring_boxes, gate=gate)
            loss_value = loss.item()  # one host sync per step: check and progress bar
            if not math.isfinite(loss_value):  # stop before anything is written over the last good checkpoint
                raise FloatingPointError(f'loss is {loss_value} at step {step}; {last} holds the last good state. '
                                         f'Lower --lr, or use --amp bf16 instead of fp16.')
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(opt)
            scaler.update()
            step, batch = step + 1, batch + 1
            for k in diag:
                diag[k].append(parts.pop(k))
            for k, v in {'loss': loss_value, **parts}.items():  # epoch means for results.csv
                sums[k] = sums.get(k, 0.0) + v / len(loader)
            bar.set_postfix(loss=f'{loss_value:.3f}', **{k: f'{v:.3f}' for k, v in parts.items()})
            if main0 and (step % args.save_every == 0 or step == args.max_steps):
                checkpoint(epoch, batch)
            if step == args.max_steps:
                break
        if step == args.max_steps:
            say(f'stopped at --max-steps {step}; continue with --resume {last}')
            break
        if diag['iou']:
            say(f'epoch {epoch + 1}: mean IoU of matched pairs {np.mean(diag["iou"]):.3f}, predictions above 0.3 per '
                f'GT {np.mean(diag["above_0.3_per_gt"]):.2f}' + (' (rank 0)' if ddp else ''))
        if args.time:  # the epochs that fit the budget, and the lr schedule spanned over them
            args.epochs = runtime.epochs_in_budget(args.time, t_start, epoch, ddp)
            total = args.epochs * steps_per_epoch
        epoch += 1
        if not main0:
            continue
        row = {'epoch': epoch, 'seconds': round(time.time() - t_start, 1), 'lr': lr, **sums, 'mAP50': '',
               'mAP50-95': ''}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            res, table = run_eval(model, val_loader, class_names, device, args.conf, args.max_det, args.out,
                                  centre_gate=gate)
            has = res['n_gt'] > 0
            map50 = float(res['ap'][has, 0].mean()) if has.any() else 0.0
            row.update({'mAP50': map50, 'mAP50-95': float(res['ap'][has].mean()) if has.any() else 0.0})
            print(f'epoch {epoch} ({time.time() - t_start:.0f} s)\n{table}')
            if map50 > best:
                best = map50
                runtime.save(os.path.join(args.out, 'best.pt'), {'model': model.state_dict(), 'args': vars(args),
                                                                 'class_names': class_names, 'epoch': epoch,
                                                                 'map50': map50})
        write_results(csv_path, row)
        checkpoint(epoch, 0)
    else:
        png = main0 and plot_results(csv_path, os.path.join(args.out, 'results.png'))  # if matplotlib is there
        say(f'best val mAP50 {best:.3f}; saved {args.out}/best.pt and {last}; per epoch: {csv_path}' +
            (' and results.png' if png else ' (results.png: pip install matplotlib)'))
    runtime.stop(ddp)


if __name__ == '__main__':
    main()
