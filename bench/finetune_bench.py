"""Where a fine-tuning step's time goes, and how the min-cost matcher compares with the Hungarian optimum.

    python bench/finetune_bench.py [--model mini] [--img-size 512] [--batch-size 2] [--steps 3]

A DOTA-like batch: synthetic images with rows of parked vehicles and ships (several hundred objects each), the
detector as `finetune.py --ckpt none` builds it by default (the dense head at the patch's stride with the spatial
prior, the centre-cell matcher, the level at half that stride for objects under two cells). One step = forward,
loss, backward, AdamW step; the matcher calls inside the loss are timed on their own. With the finer level, the same
steps of the model without it (`--fine 0`) are timed in the same run, and their ratio printed. The share of the step
spent matching (goal <= 10 %) is printed last. Before it: on the cost matrices of the same batch, the share of GT
that the min-cost rule gives the same prediction as scipy's Hungarian solver, and the total cost of each (needs
scipy, from requirements-dev.txt).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from labels import CLASSES  # noqa: E402
from finetune import build, get_parser  # noqa: E402
from matcher import MinCostMatcher, assign_min_cost, detector_loss  # noqa: E402
from prepare import synth_image  # noqa: E402


class TimedMatcher(MinCostMatcher):
    """The default matcher, timing its calls; with `keep` set it also keeps their cost matrices (outside the
    timed steps: computing them again is not part of a step)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seconds, self.costs, self.keep = 0.0, [], False

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = super().__call__(*args)
        self.seconds += time.perf_counter() - t0
        if self.keep:
            self.costs.append(self.cost(*args[:6], *args[7:]))  # (the 7th, k, cells per GT, is not a cost input)
        return out


def make_batch(n, size):
    """n synthetic images (B, 3, size, size) normalized roughly, with their targets."""
    names = CLASSES['dota1.0']
    xs, targets = [], []
    for i in range(n):
        img, objects = synth_image(np.random.default_rng(i), size, n_rows=size // 16, n_single=size * size // 2000)
        polys = np.stack([p for p, _ in objects])  # (G, 4, 2)
        boxes = np.concatenate([polys.min(1), polys.max(1)], 1).clip(0, size)
        targets.append({'boxes': torch.tensor(boxes, dtype=torch.float32),
                        'labels': torch.tensor([names.index(c) for _, c in objects])})
        xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5)
    return torch.stack(xs) / 0.25, targets


def time_steps(ft, x, targets, steps):
    """`steps` training steps (after one untimed warm-up) of the detector finetune.py builds from the flags ft.
    -> (seconds of the steps, seconds matching within them, the matcher holding one extra step's cost matrices)"""
    torch.manual_seed(0)
    model = build(ft)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    matcher = TimedMatcher(w_ctr=ft.match_centre)
    total = matching = 0.0
    for step in range(steps + 1):  # the first step warms up and is not timed
        matcher.seconds = 0.0
        t0 = time.perf_counter()
        loss, _ = detector_loss(model(x), targets, matcher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            total += time.perf_counter() - t0
            matching += matcher.seconds
    matcher.keep = True  # one more forward and loss, untimed, for the matcher's cost matrices
    with torch.no_grad():
        detector_loss(model(x), targets, matcher)
    return total, matching, matcher


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='mini', help='ViT preset (default: %(default)s)')
    ap.add_argument('--patch-size', type=int, default=16, help='patch size (default: %(default)s)')
    ap.add_argument('--img-size', type=int, default=512, help='image side (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=2, help='images per step (default: %(default)s)')
    ap.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up (default: %(default)s)')
    args = ap.parse_args()
    torch.manual_seed(0)
    x, targets = make_batch(args.batch_size, args.img_size)
    n_gt = [len(t['boxes']) for t in targets]
    ft = get_parser().parse_args(['--ckpt', 'none', '--model', args.model, '--patch-size', str(args.patch_size)])
    total, matching, matcher = time_steps(ft, x, targets, args.steps)
    print(f'{args.model} ViT/{args.patch_size}, {args.img_size}^2, batch {args.batch_size}, the dense head'
          f'{f", stride-{ft.stride // 2} level under {ft.fine:g} px" if ft.fine else ""}, GT per image {n_gt}, '
          f'{torch.get_num_threads()} threads: step {1e3 * total / args.steps:.0f} ms, matching '
          f'{1e3 * matching / args.steps:.0f} ms ({len(matcher.costs)} matcher calls per step)')
    if ft.fine:  # the baseline of the same run: the same model without the finer level
        one, one_matching, _ = time_steps(get_parser().parse_args(['--ckpt', 'none', '--model', args.model,
                                                                   '--patch-size', str(args.patch_size), '--fine',
                                                                   '0']), x, targets, args.steps)
        print(f'without the stride-{ft.stride // 2} level (--fine 0): step {1e3 * one / args.steps:.0f} ms, matching '
              f'{1e3 * one_matching / args.steps:.0f} ms; the level costs {total / one:.2f}x per step')
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        print('scipy not installed: no comparison with the Hungarian solver')
    else:
        same = n = greedy_out = best_out = 0
        greedy_cost = best_cost = 0.0
        for cost in matcher.costs:
            r, c = assign_min_cost(cost)
            hr, hc = linear_sum_assignment(cost.numpy())
            want = dict(zip(hc.tolist(), hr.tolist()))
            same += sum(want[g] == p for p, g in zip(r.tolist(), c.tolist()))
            n += cost.shape[1]
            greedy_cost += cost[r, c].sum().item()
            best_cost += cost.numpy()[hr, hc].sum()
            greedy_out += int((cost[r, c] >= 1e4 / 2).sum())  # matched outside the GT's centre region
            best_out += int((cost.numpy()[hr, hc] >= 1e4 / 2).sum())
        print(f'min-cost rule vs Hungarian on the same {len(matcher.costs)} cost matrices: {same / n:.1%} of {n} GT '
              f'get the same prediction; summed cost {greedy_cost:.1f} vs {best_cost:.1f}; GT matched outside their centre '
              f'region (cost + 1e4): {greedy_out} vs {best_out}')
    print(f'share of the step spent matching (goal <= 10 %): {matching / total:.1%}')


if __name__ == '__main__':
    main()
