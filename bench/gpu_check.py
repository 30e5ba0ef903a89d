"""For a GPU: JEPA pretraining throughput of ViT-B/16 on 1024^2 synthetic tiles, bf16, without and with compile,
then fine-tuning throughput of the detector (ViT-B/16 and finetune.py's default head: dense at stride 8 with the
spatial prior, 256 wide) on 1024^2 tiles with 300 objects each.

    python bench/gpu_check.py                        # about 3 minutes on one H100
    python bench/gpu_check.py --model test --img-size 64 --device cpu --steps 2    # a smoke run anywhere

Prints steps/s, images/s, peak memory and MFU (model FLOPs per second / the card's peak dense bf16 rate; the FLOPs
are counted as in bench/pretrain_bench.py: matmuls and attention, backward = 2x forward).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from masking import random_masking  # noqa: E402
from finetune import build, get_parser  # noqa: E402
from matcher import MinCostMatcher, detector_loss  # noqa: E402
from model import PRESETS, Predictor, build_vit, ema_update, param_groups  # noqa: E402
from pretrain import Student, jepa_loss  # noqa: E402
from pretrain_bench import step_flops  # noqa: E402

PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12}  # dense, per card


def timed(step, args, cuda):
    """Run step() args.warmup times untimed, then args.steps times -> (seconds per step, peak GiB on CUDA)."""
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')
    return (time.perf_counter() - t0) / args.steps, mem


def measure(args, compile_):
    torch.manual_seed(0)
    device, cfg = torch.device(args.device), PRESETS[args.model]
    context = build_vit(args.model, 16).to(device)
    target = build_vit(args.model, 16).to(device).requires_grad_(False)
    student = Student(context, Predictor(cfg['dim'], cfg['pred_dim'], cfg['pred_depth'], cfg['pred_heads'])).to(device)
    opt = torch.optim.AdamW(param_groups([(student, 1.0)], 0.05), lr=1e-4, fused=device.type == 'cuda')
    fwd_student, fwd_target = (torch.compile(student), torch.compile(target)) if compile_ else (student, target)
    g = args.img_size // 16
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    ctx, tgt = (i.to(device) for i in random_masking(args.batch_size, g * g, 0.75, torch.Generator().manual_seed(0)))
    amp = device.type == 'cuda'

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = jepa_loss(fwd_student, fwd_target, x, ctx, tgt, patch_size=16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(target, context, 0.996)
    dt, mem = timed(step, args, amp)
    return dt, step_flops(cfg, g * g, g * g // 4, g * g // 4, g * g - g * g // 4, 16) * args.batch_size, mem


def measure_finetune(args, n_objects=300):
    """Seconds per fine-tuning step (forward, matching, all losses, backward, AdamW), bf16 autocast on CUDA."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    ft = get_parser().parse_args(['--ckpt', 'none', '--model', args.model, '--patch-size', '16', '--head-dim',
                                  '256'])  # the rest: finetune.py's defaults
    model = build(ft).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    xy = torch.rand(args.batch_size, n_objects, 2, device=device) * (args.img_size - 40)
    targets = [{'boxes': torch.cat([p, p + 8 + 24 * torch.rand_like(p)], 1),
                'labels': torch.randint(0, 15, (n_objects,), device=device)} for p in xy]
    matcher, amp = MinCostMatcher(w_ctr=ft.match_centre), device.type == 'cuda'

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = detector_loss(model(x), targets, matcher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, args, amp)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='base', choices=list(PRESETS), help='ViT preset (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=1024, help='tile side (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=8, help='tiles per step (default: %(default)s)')
    ap.add_argument('--steps', type=int, default=10, help='timed steps (default: %(default)s)')
    ap.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation) (default: %(default)s)')
    ap.add_argument('--device', default='cuda', help='(default: %(default)s)')
    ap.add_argument('--peak-tflops', type=float, default=None, help='the card peak dense bf16 TFLOP/s for MFU '
                                                                    '(default: looked up from the card name)')
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f'{name}; {args.model} ViT/16, {args.img_size}^2 tiles, batch {args.batch_size}, bf16, mask ratio 0.75')
    for compile_ in (False, True):
        dt, flops, mem = measure(args, compile_)
        mfu = f'{flops / dt / peak:.1%}' if peak else 'n/a (give --peak-tflops)'
        print(f'compile={compile_}: {1 / dt:.2f} steps/s, {args.batch_size / dt:.1f} images/s, peak memory '
              f'{mem:.1f} GiB, {flops / dt / 1e12:.1f} TFLOP/s, MFU {mfu}')
    dt, mem = measure_finetune(args)
    print(f'fine-tuning (the default detector of finetune.py, 300 objects per tile): {1 / dt:.2f} steps/s, '
          f'{args.batch_size / dt:.1f} images/s, peak memory {mem:.1f} GiB')


if __name__ == '__main__':
    main()
