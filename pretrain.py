"""JEPA pretraining with object-aware masking, and the ablations around it under the same code.

    python pretrain.py --data dota                                         # a GPU, full DOTA tiles
    python pretrain.py --data synthetic --model mini --img-size 128 --patch-size 8 --epochs 8 --device cpu
    python pretrain.py ... --mask random --target pixels                   # MAE-style, for comparison

One step: the EMA *target* encoder embeds the whole image (no grad) and its features are layer-normed; the
*context* encoder embeds only the visible patches (hidden tokens are dropped, not zeroed); the *predictor* gets the
context tokens plus a mask token at every hidden position and predicts the target features there (--target
latent), or the hidden patches' normalized pixels through a linear head (--target pixels: MAE's loss, no EMA
needed); the loss is the mean squared error over the hidden patches. Both encoders and the predictor place a
crop's patches where it was cut from its tile (data.py's 'origin'): the sin-cos positions are absolute, and 256²
crops placed at 0 would never show the encoder the positions 16-31 that a whole 512² tile gives the detector.
--target-layers 2 --target-norm instance makes the targets data2vec's: the mean of the last blocks' layer-normed
outputs, each channel then standardized over the image (the per-image mean leaves the targets; on NWPU VHR-10 this
gave the encoder a clearly better linear probe, RESULTS.md). Only the context encoder and predictor get gradients;
the target encoder follows the context encoder by EMA, momentum rising linearly 0.996 -> 1.0. Masking strategies:
masking.py.

Images without labels (--unlabelled DIR ...: DOTA's test tiles, any folder of scenes) are pretrained on beside the
train split. Object masking needs boxes there: --unlabelled-boxes reads a detector's (evaluate.py --write-labels,
e.g. the detector fine-tuned on the labelled images, so no label is used twice); without them those images are
masked at random. --mask saliency needs no boxes anywhere: the EMA target's own tokens choose (masking.py).

Schedules (per optimizer step): lr linear warmup then cosine; weight decay cosine from 0.04 to 0.4, on weight
matrices only (not biases, norms, tokens); gradient-norm clipping (the constants below the imports).
Safety: OUT/last.pt is written atomically every --save-every steps and at each epoch end; --resume restores the
models, optimizer, scaler, schedules, RNG states and the position in the epoch (exact, whatever --workers: each
image's augmentation is seeded by (seed, epoch, index)). A non-finite loss stops the run with
the step number before anything is written over the last good checkpoint. OUT/log.jsonl gets one line per
--log-every steps: loss, lr, weight decay, momentum, the share of hidden patches on a box, and the std across
tokens of the target features and of the predictions (they fall toward 0 when the representation collapses; a
warning is printed when the targets' std is below COLLAPSE_STD), and with --probe-every N the linear probe of
probe.py (what the frozen context encoder's patch tokens know about the objects of the val split). --time MINUTES
fits the run to a wall-clock budget.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import runtime
from data import DOTADataset, crop_offsets, epoch_loader, to_input
from labels import CLASSES
from prepare import resolve_data
from masking import MODES, make_masks, saliency_patches
from probe import Probe, describe
from model import PRESETS, build_predictor, build_vit, ema_momentum, ema_update, lr_at, param_groups


# The fixed parts of the recipe (I-JEPA's; flags only where a choice was measured here: RESULTS.md)
WEIGHT_DECAY = (0.04, 0.4)  # AdamW weight decay, cosine from the first to the second, on weight matrices only
MIN_LR = 1e-6  # the lr at the end of the cosine
CLIP_GRAD = 1.0  # gradient-norm clip
EMA = (0.996, 1.0)  # the target encoder's EMA momentum, rising linearly
COLLAPSE_STD = 0.05  # warn when the target features' std across tokens falls below this


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a('--data', default='dota', help="dataset folder, or 'dota' (data/dota) or 'synthetic' (data/synthetic, "
                                     'generated on first use) (default: %(default)s)')
    a('--classes', default='dota1.0', choices=list(CLASSES), help='class list (default: %(default)s)')
    a('--model', default='small', choices=list(PRESETS), help='ViT preset (default: %(default)s)')
    a('--patch-size', type=int, default=16, help='ViT patch size in pixels (default: %(default)s)')
    a('--img-size', type=int, default=512, help='training crop side; objects keep their scale (default: %(default)s)')
    a('--unlabelled', nargs='+', default=[], metavar='DIR',
      help='folders of images without labels, pretrained on beside the train split: a `prepare.py split` of images '
           'without labels (DOTA test), or DIR/images/*, or DIR/*; any labels there are not read (default: none)')
    a('--unlabelled-boxes', default=None, metavar='DIR',
      help="a detector's boxes for the --unlabelled images, one DOTA label file per image name (evaluate.py "
           '--write-labels): --mask object hides them as it hides ground truth; without it those images are masked '
           'at random (default: none)')
    a('--strict', action='store_true', help='stop at a damaged image or a repaired label instead of skipping it '
                                            'with a counted warning')
    a('--epochs', type=int, default=100, help='passes over the train split (default: %(default)s)')
    a('--time', type=float, default=None, help='a wall-clock budget in minutes: after each epoch the number of epochs '
                                               'that fit (at the mean time per epoch so far) replaces --epochs and '
                                               'the lr, weight-decay and EMA schedules are re-spanned over it; a '
                                               'resumed run counts the time its checkpoint had spent (default: off)')
    a('--batch-size', type=int, default=64, help='images per micro-batch (default: %(default)s)')
    a('--accum', type=int, default=1, help='micro-batches per optimizer step (default: %(default)s)')
    a('--lr', type=float, default=5e-4, help='peak learning rate of AdamW (default: %(default)s)')
    a('--warmup-epochs', type=float, default=5, help='linear warmup length (default: %(default)s)')
    a('--mask', default='object', choices=MODES, help='masking strategy, see masking.py (default: %(default)s)')
    a('--saliency-share', type=float, default=0.17,
      help="saliency: the share of each image's patches whose EMA-target features lie farthest from the image's "
           'mean, taken as its object patches: as many as boxes cover (NWPU 256² crops: 16.7 %% of the patches '
           'overlap a box) (default: %(default)s)')
    a('--mask-ratio', type=float, default=0.75, help='share of patches hidden (default: %(default)s)')
    a('--object-keep', type=float, default=0.25, help='object/saliency: probability that an object (salient) patch '
                                                      'stays visible (default: %(default)s)')
    a('--target', default='latent', choices=['latent', 'pixels'],
      help='JEPA features of the EMA target, or MAE per-patch normalized pixels (default: %(default)s)')
    a('--target-layers', type=int, default=1, help='latent targets: average the layer-normed outputs of the target '
                                                   "encoder's last N blocks (data2vec) (default: %(default)s)")
    a('--target-norm', default='layer', choices=['layer', 'instance'],
      help="latent targets: per token (I-JEPA), or then also each channel over the image's tokens (data2vec) "
           '(default: %(default)s)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    a('--amp', default='bf16', choices=['bf16', 'fp16', 'off'], help='autocast on CUDA (fp16 adds loss scaling); '
                                                                     'the CPU runs float32 (default: %(default)s)')
    a('--compile', action='store_true', help='torch.compile the encoders and the predictor')
    a('--workers', type=int, default=4, help='data-loader threads (default: %(default)s)')
    a('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    a('--out', default='runs/pretrain', help='output folder for last.pt and log.jsonl (default: %(default)s)')
    a('--resume', default=None, help="a checkpoint to continue from ('auto': OUT/last.pt if it exists)")
    a('--max-steps', type=int, default=None, help='stop (with a checkpoint) after this many optimizer steps; the '
                                                  'schedules still span --epochs (default: none)')
    a('--save-every', type=int, default=1000, help='also checkpoint every N optimizer steps (default: %(default)s)')
    a('--log-every', type=int, default=10, help='write a log.jsonl line every N steps (default: %(default)s)')
    a('--probe-every', type=int, default=0, help='every N epochs (and at the end), fit the linear probe of probe.py '
                                                 'on the frozen context encoder (train split) and log its val scores: '
                                                 'when does it start to carry object information; 0 = off (default: '
                                                 '%(default)s)')
    return ap


def patch_pixels(x, p):
    """(B, 3, H, W) -> (B, N, p*p*3) per-patch pixels normalized by their own mean and variance (MAE norm_pix)."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


class Student(nn.Module):
    """What gradients train: the context encoder and the predictor, one module so that DDP syncs both."""

    def __init__(self, context, predictor):
        super().__init__()
        self.context, self.predictor = context, predictor

    def forward(self, x, ctx_idx, tgt_idx, offset=None):
        """x (B, 3, H, W), ctx_idx (B, Nc), tgt_idx (B, Nt), offset (B, 2) or None -> predictions (B, Nt, D) at
        the targets."""
        p = self.context.patch_size
        z = self.context(x, ctx_idx, offset)  # (B, Nc, D): visible tokens only
        return self.predictor(z, ctx_idx, tgt_idx, x.shape[-2] // p, x.shape[-1] // p, offset)


def latent_targets(target, x, layers=1, norm='layer', offset=None):
    """The JEPA targets of x (B, 3, H, W) -> (B, N, D) float: the mean of the layer-normed outputs of the target
    encoder's last `layers` blocks (1: its output, I-JEPA; more: data2vec), then with norm='instance' each channel
    standardized over the image's tokens (data2vec): the per-image mean, which a predictor gets for free, leaves the
    targets, and no channel dominates the loss by its spread alone. offset: (B, 2) crop origins in patches."""
    hs = [target(x, offset=offset)] if layers == 1 else target.last_blocks(x, layers, offset)
    h = torch.stack([F.layer_norm(t.float(), t.shape[-1:]) for t in hs]).mean(0)  # (B, N, D)
    if norm == 'instance':
        h = (h - h.mean(1, keepdim=True)) / (h.var(1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    return h


def jepa_loss(student, target, x, ctx_idx, tgt_idx, target_kind='latent', patch_size=16, target_layers=1,
              target_norm='layer', offset=None, full=None):
    """x (B, 3, H, W); ctx_idx (B, Nc), tgt_idx (B, Nt) the visible and the hidden patches;
    offset (B, 2) or None: where each crop starts in its tile, in patches (both encoders' positions); full (B, N, D):
    the targets of every patch when the caller already has them (saliency masking), else computed here.
    -> (loss, stats dict of detached tensors: target and prediction std across tokens, and mean_baseline: the loss
    that predicting each image's mean target at every hidden position would get; a loss not below it has learned
    nothing about *where* what is)."""
    with torch.no_grad():
        if full is not None:
            h = full
        elif target_kind == 'latent':
            h = latent_targets(target, x, target_layers, target_norm, offset)  # (B, N, D): the full image,
            # normalized: a scale the predictor cannot shrink
        else:
            h = patch_pixels(x.float(), patch_size)  # (B, N, p*p*3)
        h = h.gather(1, tgt_idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, Nt, D)
    pred = student(x, ctx_idx, tgt_idx, offset).float()  # (B, Nt, D)
    stats = {'target_std': h.std(1).mean().detach(), 'pred_std': pred.std(1).mean().detach(),
             'mean_baseline': (h - h.mean(1, keepdim=True)).pow(2).mean().detach()}
    per = F.mse_loss(pred, h, reduction='none').mean(-1)  # (B, Nt)
    return per.sum() / per.numel(), stats


def main(argv=None):
    args = get_parser().parse_args(argv)
    ddp, rank, world, device = runtime.start(args.device)  # under torchrun: one process per GPU
    cuda = device.type == 'cuda'
    main0 = rank == 0  # prints, logs and checkpoints
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None}[args.amp] if cuda else None
    ds = DOTADataset(resolve_data(args.data), 'train', CLASSES[args.classes], args.img_size, train=True,
                     strict=args.strict)
    n_labelled = len(ds)
    for folder in args.unlabelled:  # after the labelled images: the masks of those do not move
        ds.add_unlabelled(folder, args.unlabelled_boxes)
    if args.unlabelled_boxes and not args.unlabelled:
        raise SystemExit('--unlabelled-boxes names boxes for --unlabelled images; give the folders with --unlabelled')
    if args.mask == 'saliency' and args.target != 'latent':
        raise SystemExit('--mask saliency ranks patches by the EMA target\'s features: it needs --target latent')
    steps_per_epoch = len(ds) // (args.batch_size * world * args.accum)
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(ds)} training images are fewer than one step: --batch-size x --accum x GPUs = '
                         f'{args.batch_size * args.accum * world}')

    context = build_vit(args.model, args.patch_size).to(device)
    target = copy.deepcopy(context).requires_grad_(False)  # EMA copy, never trained by gradients
    out_dim = args.patch_size ** 2 * 3 if args.target == 'pixels' else None
    predictor = build_predictor(args.model, out_dim=out_dim).to(device)
    student = Student(context, predictor)
    opt = torch.optim.AdamW(param_groups([(student, 1.0)], WEIGHT_DECAY[0]), lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)  # bf16 needs no loss scaling
    gen = torch.Generator().manual_seed(args.seed)  # masks: drawn on the CPU for the global batch (masking._rand)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    step, start_epoch, start_batch, spent = 0, 0, 0, 0.0
    last, args.resume, ck = runtime.resume_point(args.out, args.resume)
    if ck is not None:
        context.load_state_dict(ck['context'])
        target.load_state_dict(ck['target'])
        predictor.load_state_dict(ck['predictor'])
        opt.load_state_dict(ck['optimizer'])
        scaler.load_state_dict(ck['scaler'])
        step, start_epoch, start_batch = ck['step'], ck['epoch'], ck['batch']
        spent = ck.get('seconds', 0.0)  # the run's time so far: --time counts from its start
        runtime.set_rng_state(ck['rng'], mask=gen)
        if main0:
            print(f'resumed from {args.resume}: epoch {start_epoch + 1}, batch {start_batch}, step {step}')
    model = DDP(student, device_ids=[device] if cuda else None) if ddp else student
    fwd_model, fwd_target = (torch.compile(model), torch.compile(target)) if args.compile else (model, target)
    if main0:
        n_params = sum(p.numel() for p in context.parameters()) / 1e6
        print(f'{args.model} ViT/{args.patch_size}: {n_params:.1f}M params, {n_labelled} train images + '
              f'{len(ds) - n_labelled} unlabelled ({", ".join(args.unlabelled) or "none"}), {world} '
              f'process(es), mask={args.mask}, target={args.target}, device={device}')

    def checkpoint(epoch, batch):
        if not main0:
            return
        runtime.save(last, {'context': context.state_dict(), 'target': target.state_dict(),
                    'predictor': predictor.state_dict(), 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
                    'step': step, 'epoch': epoch, 'batch': batch, 'rng': runtime.rng_state(mask=gen),
                    'seconds': time.time() - t_start, 'args': vars(args)})

    log = None
    if main0:
        path = os.path.join(args.out, 'log.jsonl')
        runtime.keep_log_lines(path, lambda s: json.loads(s)['step'] <= step)
        log = open(path, 'a')
    probe = None  # probe.Probe, built at its first use (it loads the train and val images once)
    t_start, epoch = time.time() - spent, start_epoch
    while epoch < args.epochs:  # a while: --time changes args.epochs as it goes
        student.train()
        first = start_batch if epoch == start_epoch else 0
        loader = epoch_loader(ds, args.batch_size, args.patch_size, args.workers, args.seed, epoch, first, rank,
                              world, args.accum)
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', dynamic_ncols=True, disable=not main0)
        t0, seen, loss_sum, batch = time.time(), 0, 0.0, first
        for images, targets in bar:
            x = to_input(images, targets, device)
            gh, gw = x.shape[-2] // args.patch_size, x.shape[-1] // args.patch_size
            B = len(images)
            offset = crop_offsets(targets, args.patch_size, device)  # (B, 2) where each crop sits in its tile
            full = salient = None
            if args.mask == 'saliency':  # the targets first: their features choose the hidden patches
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    full = latent_targets(fwd_target, x, args.target_layers, args.target_norm, offset)  # (B, N, D)
                salient = saliency_patches(full, args.saliency_share)  # (B, N) bool
            ctx_idx, tgt_idx, tgt_obj = make_masks(args.mask, [t['boxes'] for t in targets], gh, gw, args.patch_size,
                                                   args.mask_ratio, args.object_keep, gen,
                                                   rows=(rank * B, (rank + 1) * B, world * B), salient=salient)
            batch, seen = batch + 1, seen + B
            sync = batch % args.accum == 0  # DDP all-reduces gradients only on the last micro-batch of a step
            with model.no_sync() if ddp and not sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss, stats = jepa_loss(fwd_model, fwd_target, x, ctx_idx.to(device), tgt_idx.to(device),
                                            args.target, args.patch_size, args.target_layers, args.target_norm,
                                            offset=offset, full=full)
                loss_value = loss.item()  # the one host sync of a micro-batch: check, sum and progress bar
                if not math.isfinite(loss_value):  # stop before anything is written over the last good checkpoint
                    raise FloatingPointError(f'loss is {loss_value} at step {step} (epoch {epoch + 1}, batch '
                                             f'{batch}); {last} holds the last good state. Lower --lr, or use '
                                             f'--amp bf16 instead of fp16.')
                scaler.scale(loss / args.accum).backward()
            loss_sum += loss_value
            if not sync:
                continue
            lr = lr_at(step, total, warmup, args.lr, MIN_LR)
            wd = WEIGHT_DECAY[1] + (WEIGHT_DECAY[0] - WEIGHT_DECAY[1]) * 0.5 * (
                1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
            for g in opt.param_groups:  # (opt.param_groups, not a list kept from before: a resume replaces them)
                g['lr'], g['weight_decay'] = lr, wd * g['wd_scale']
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_GRAD)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            momentum = ema_momentum(step, total, *EMA)
            if args.target == 'latent':
                ema_update(target, context, momentum)
            step += 1
            if step % args.log_every == 0:
                logged = loss.detach().clone()
                if ddp:  # the mean over GPUs: the loss of the global batch (equal target counts per image)
                    dist.all_reduce(logged, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
                    logged = logged if cuda else logged / world
                rec = {'step': step, 'epoch': epoch + 1, 'loss': logged.item(), 'lr': lr, 'weight_decay': wd,
                       'momentum': momentum, 'hidden_on_boxes': tgt_obj.float().mean().item(),
                       **{k: v.item() for k, v in stats.items()}}
                if main0:
                    log.write(json.dumps(rec) + '\n')
                    log.flush()
                    if rec['target_std'] < COLLAPSE_STD:  # (predictions start near-constant: not a signal)
                        tqdm.write(f'warning: step {step}: the target features vary by {rec["target_std"]:.4f} '
                                   f'(std across tokens): the representation may be collapsing')
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', img_s=f'{seen / (time.time() - t0):.1f}')
            if step % args.save_every == 0 or step == args.max_steps:
                checkpoint(epoch, batch)
            if step == args.max_steps:
                break
        if step == args.max_steps:
            if main0:
                print(f'stopped at --max-steps {step}; continue with --resume {last}')
            break
        if seen and main0:
            print(f'epoch {epoch + 1}: loss {loss_sum * args.batch_size / seen:.4f}, target std across tokens '
                  f'{stats["target_std"].item():.3f}, predicting the mean target would give '
                  f'{stats["mean_baseline"].item():.4f} (last batch), {seen * world / (time.time() - t0):.1f} img/s')
        if args.time:  # the epochs that fit the budget, and the schedules spanned over them
            args.epochs = runtime.epochs_in_budget(args.time, t_start, epoch, ddp)
            total = args.epochs * steps_per_epoch
        checkpoint(epoch + 1, 0)
        epoch += 1
        if main0 and args.probe_every and (epoch % args.probe_every == 0 or epoch == args.epochs):
            probe = probe or Probe(args.data, CLASSES[args.classes], args.patch_size, workers=args.workers,
                                   device=device)
            r = probe(context)
            log.write(json.dumps({'step': step, 'epoch': epoch, **{f'probe_{k}': r[k] for k in
                                                                   ('map', 'obj_ap', 'small_ap')}}) + '\n')
            log.flush()
            print(f'epoch {epoch}: probe of the context encoder on val: {describe(r)}')
    if main0:
        log.close()
        print(f'saved {last}')
    runtime.stop(ddp)


if __name__ == '__main__':
    main()
