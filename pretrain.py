"""JEPA pretraining with object-aware masking.

    python pretrain.py --data dota                                     # a GPU, full DOTA tiles
    python pretrain.py --data synthetic --model mini --img-size 128 --patch-size 8 --epochs 8 --device cpu

One step: the EMA *target* encoder embeds the whole image (no grad) and its features are layer-normed; the
*context* encoder embeds only the visible patches (hidden tokens are dropped, not zeroed); the *predictor* gets the
context tokens plus a mask token at every hidden position and predicts the target features there; the loss is the
mean squared error at the hidden positions. Only the context encoder and predictor get gradients; the target
encoder follows the context encoder by EMA. Masking: see masking.py (--mask object hides patches on GT boxes).
Writes OUT/last.pt (context and target encoders, predictor, optimizer, step, args) after every epoch.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import CLASSES, make_loader, resolve_data, to_input
from masking import make_masks
from model import PRESETS, Predictor, build_vit, ema_momentum, ema_update, lr_at, param_groups


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default='dota', help="dataset folder, or 'dota' (data/dota) or 'synthetic' "
                                                   '(data/synthetic, generated on first use) (default: %(default)s)')
    ap.add_argument('--classes', default='dota1.0', choices=list(CLASSES), help='class list (default: %(default)s)')
    ap.add_argument('--model', default='small', choices=list(PRESETS), help='ViT preset (default: %(default)s)')
    ap.add_argument('--patch-size', type=int, default=16, help='ViT patch size in pixels (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=512, help='training crop side; objects keep their scale '
                                                              '(default: %(default)s)')
    ap.add_argument('--epochs', type=int, default=100, help='passes over the train split (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=64, help='images per step (default: %(default)s)')
    ap.add_argument('--lr', type=float, default=5e-4, help='peak learning rate of AdamW (default: %(default)s)')
    ap.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end of the cosine '
                                                               '(default: %(default)s)')
    ap.add_argument('--warmup-epochs', type=float, default=5, help='linear warmup length (default: %(default)s)')
    ap.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay on weight matrices '
                                                                     '(default: %(default)s)')
    ap.add_argument('--clip-grad', type=float, default=1.0, help='gradient-norm clip, 0 = off (default: %(default)s)')
    ap.add_argument('--mask', default='object', choices=['object', 'random'],
                    help='object: hide patches on GT boxes first; random: MAE masking (default: %(default)s)')
    ap.add_argument('--mask-ratio', type=float, default=0.75, help='share of patches hidden (default: %(default)s)')
    ap.add_argument('--object-keep', type=float, default=0.25,
                    help='probability that an object patch stays visible, object mode (default: %(default)s)')
    ap.add_argument('--ema', type=float, nargs=2, default=[0.996, 1.0], metavar=('START', 'END'),
                    help='EMA momentum of the target encoder, rising linearly (default: %(default)s)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: %(default)s)')
    ap.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'],
                    help='autocast dtype on CUDA; the CPU always runs float32 (default: %(default)s)')
    ap.add_argument('--workers', type=int, default=4, help='data-loader processes (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    ap.add_argument('--out', default='runs/pretrain', help='output folder for last.pt (default: %(default)s)')
    return ap


def jepa_loss(context, target, predictor, x, ctx_idx, tgt_idx):
    """x (B, 3, H, W); ctx_idx (B, Nc), tgt_idx (B, Nt) -> (MSE at the targets, std of the target features)."""
    p = context.patch_size
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    with torch.no_grad():
        h = target(x)  # (B, N, D): the full image
        h = F.layer_norm(h.float(), h.shape[-1:])  # normalized targets: a scale the predictor cannot shrink
        h = h.gather(1, tgt_idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, Nt, D)
    z = context(x, ctx_idx)  # (B, Nc, D): visible tokens only
    pred = predictor(z, ctx_idx, tgt_idx, gh, gw)  # (B, Nt, D)
    return F.mse_loss(pred.float(), h), h.std(0).mean()


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}[args.dtype]
    root = resolve_data(args.data)
    loader = make_loader(root, 'train', CLASSES[args.classes], args.img_size, args.batch_size, True, args.workers,
                         args.patch_size)

    context = build_vit(args.model, args.patch_size).to(device)
    target = copy.deepcopy(context).requires_grad_(False)  # EMA copy, never trained by gradients
    pc = PRESETS[args.model]
    predictor = Predictor(context.dim, pc['pred_dim'], pc['pred_depth'], pc['pred_heads']).to(device)
    opt = torch.optim.AdamW(param_groups([(context, 1.0), (predictor, 1.0)], args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(enabled=cuda and amp_dtype == torch.float16)  # bf16 needs no loss scaling
    n_params = sum(p.numel() for p in context.parameters()) / 1e6
    print(f'{args.model} ViT/{args.patch_size}: {n_params:.1f}M params, {len(loader.dataset)} train images, '
          f'mask={args.mask} ratio={args.mask_ratio}, device={device}')

    total, warmup = args.epochs * len(loader), int(args.warmup_epochs * len(loader))
    gen = torch.Generator().manual_seed(args.seed)  # masks are drawn on the CPU, reproducibly
    os.makedirs(args.out, exist_ok=True)
    step = 0
    for epoch in range(args.epochs):
        context.train(), predictor.train()
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', dynamic_ncols=True)
        t0, seen, loss_sum, std_sum = time.time(), 0, 0.0, 0.0
        for images, targets in bar:
            lr = lr_at(step, total, warmup, args.lr, args.min_lr)
            for g in opt.param_groups:
                g['lr'] = lr
            x = to_input(images, device)
            gh, gw = x.shape[-2] // args.patch_size, x.shape[-1] // args.patch_size
            ctx_idx, tgt_idx = make_masks(args.mask, [t['boxes'] for t in targets], gh, gw, args.patch_size,
                                          args.mask_ratio, args.object_keep, gen)
            ctx_idx, tgt_idx = ctx_idx.to(device), tgt_idx.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cuda and amp_dtype != torch.float32):
                loss, feat_std = jepa_loss(context, target, predictor, x, ctx_idx, tgt_idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} at step {step}; lower --lr or use --dtype bfloat16')
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g['params']], args.clip_grad)
            scaler.step(opt)
            scaler.update()
            ema_update(target, context, ema_momentum(step, total, *args.ema))
            step += 1
            seen += len(images)
            loss_sum, std_sum = loss_sum + loss.item(), std_sum + feat_std.item()
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{lr:.2e}', img_s=f'{seen / (time.time() - t0):.1f}')
        n = max(len(loader), 1)
        # the std of the (layer-normed) target features across the batch falls towards 0 if the encoders collapse
        print(f'epoch {epoch + 1}: loss {loss_sum / n:.4f}, target feature std {std_sum / n:.3f}, '
              f'{seen / (time.time() - t0):.1f} img/s')
        ckpt = {'context': context.state_dict(), 'target': target.state_dict(), 'predictor': predictor.state_dict(),
                'optimizer': opt.state_dict(), 'step': step, 'epoch': epoch + 1, 'args': vars(args)}
        torch.save(ckpt, os.path.join(args.out, 'last.pt.tmp'))
        os.replace(os.path.join(args.out, 'last.pt.tmp'), os.path.join(args.out, 'last.pt'))  # never half-written
    print(f'saved {os.path.join(args.out, "last.pt")}')


if __name__ == '__main__':
    main()
