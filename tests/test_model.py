"""ViT (attention, token dropping, key layout), predictor, EMA, a few JEPA steps, matcher and detector overfit."""
import copy
import itertools

import numpy as np
import pytest
import torch

from data import CLASSES, DOTADataset, collate, to_input
from metrics import evaluate_coco
from masking import make_masks
from model import (Attention, Detector, MinCostMatcher, Predictor, assign_min_cost, build_vit, detection_loss, giou,
                   ema_momentum, ema_update, lr_at, postprocess, sincos_pos_embed)
from prepare import make_synthetic
from pretrain import Student, jepa_loss


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    want = attn.proj((w @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_token_dropping_equals_blocks_on_kept_tokens():
    torch.manual_seed(0)
    vit = build_vit('test', 8).eval()
    x = torch.randn(2, 3, 32, 48)
    keep = torch.stack([torch.randperm(24)[:10] for _ in range(2)])  # (B, 10)
    tokens = vit.patch_embed(x) + sincos_pos_embed(32, 4, 6)  # (B, 24, D)
    kept = torch.stack([tokens[b, keep[b]] for b in range(2)])
    for blk in vit.blocks:
        kept = blk(kept)
    torch.testing.assert_close(vit(x, keep), vit.norm(kept))
    torch.testing.assert_close(vit(x, torch.arange(24).expand(2, -1)), vit(x))  # keeping all = no dropping


def test_state_dict_uses_timm_mae_keys():
    keys = set(build_vit('test', 16).state_dict())
    for k in ['patch_embed.proj.weight', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.bias',
              'blocks.0.attn.proj.weight', 'blocks.0.norm2.bias', 'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.bias',
              'norm.weight']:
        assert k in keys
    assert not any('pos_embed' in k or 'cls_token' in k for k in keys)  # fixed sin-cos, no CLS token


def test_pos_embed_any_grid_distinct_rows():
    pe = sincos_pos_embed(32, 5, 7)
    assert pe.shape == (35, 32) and torch.cdist(pe, pe).add(torch.eye(35)).min() > 0.1


def test_ema_moves_target_toward_online():
    online = build_vit('test', 8)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    dist = lambda: sum((a - b).abs().sum() for a, b in zip(target.parameters(), online.parameters()))  # noqa: E731
    before = dist()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(dist(), before * 0.9)
    assert ema_momentum(0, 100) == 0.996 and ema_momentum(100, 100) == 1.0 and ema_momentum(50, 100) == 0.998


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert abs(lr_at(55, 100, 10, 1.0) - 0.5) < 1e-9 and lr_at(100, 100, 10, 1.0, 0.01) == 0.01


def test_predictor_shape_and_position_dependence():
    torch.manual_seed(0)
    pred = Predictor(32, 16, 1, 2)
    ctx = torch.randn(2, 5, 32)
    ctx_idx = torch.tensor([[0, 1, 2, 3, 4]] * 2)
    out = pred(ctx, ctx_idx, torch.tensor([[5, 6, 7], [8, 9, 10]]), 4, 4)
    assert out.shape == (2, 3, 32)
    assert not torch.allclose(out[0], out[1])  # same context, different target positions


def test_a_few_pretrain_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    context = build_vit('test', 8)
    target = copy.deepcopy(context).requires_grad_(False)
    predictor = Predictor(32, 32, 1, 2)
    x = torch.randn(4, 3, 32, 32)
    boxes = [torch.tensor([[4.0, 4, 20, 12]])] * 4
    ctx, tgt, _ = make_masks('object', boxes, 4, 4, 8, 0.75, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(list(context.parameters()) + list(predictor.parameters()), lr=1e-3)
    losses = []
    for _ in range(60):
        loss, _ = jepa_loss(Student(context, predictor), target, x, ctx, tgt, patch_size=8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(target, context, 0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_assignment_is_one_to_one_and_takes_mutual_minima():
    torch.manual_seed(0)
    cost = torch.rand(40, 25)
    rows, cols = assign_min_cost(cost)
    assert sorted(cols.tolist()) == list(range(25)) and len(set(rows.tolist())) == 25
    flat = cost.argmin()
    r, c = divmod(flat.item(), 25)
    assert rows[cols == c].item() == r  # the globally cheapest pair is always matched
    # fewer predictions than GT: every prediction used once, the surplus GT unmatched
    rows, cols = assign_min_cost(torch.rand(3, 5))
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and len(set(cols.tolist())) == 3


def test_assignment_is_optimal_on_small_cases_where_greedy_is():
    # when every GT has a distinct cheapest prediction, the rule returns exactly those (the optimum)
    cost = torch.tensor([[0.1, 5, 5], [5, 0.2, 5], [5, 5, 0.3], [1, 1, 1]])
    rows, cols = assign_min_cost(cost)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 0, 1: 1, 2: 2}
    brute = min(itertools.permutations(range(4), 3), key=lambda p: sum(cost[p[g], g] for g in range(3)))
    assert list(brute) == [0, 1, 2]


def test_matcher_gives_neighbouring_cells_to_objects_sharing_a_cell():
    det = Detector(build_vit('test', 8), 2)
    out = det(torch.zeros(1, 3, 32, 32))
    gt = torch.tensor([[9.0, 9, 12, 12], [12.5, 9, 15.5, 12]])  # two 3 px objects in cell (1, 1)
    pi, gi = MinCostMatcher()(out['logits'][0], out['boxes'][0], out['centres'], gt, torch.tensor([0, 1]), 8)
    assert len(set(pi.tolist())) == 2 and sorted(gi.tolist()) == [0, 1]


@pytest.mark.parametrize('cls_loss', ['focal', 'varifocal'])
def test_detector_overfits_one_synthetic_image(tmp_path, cls_loss):
    torch.manual_seed(0)
    make_synthetic(tmp_path, n_train=1, n_val=0, size=64, seed=5)
    images, (t,) = collate([DOTADataset(tmp_path, 'train', CLASSES['dota1.0'])[0]], multiple=8)
    assert len(t['boxes']) >= 3
    det = Detector(build_vit('test', 8), 15, head_dim=32)
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3, weight_decay=0.0)
    x = to_input(images, [t], torch.device('cpu'))
    matcher = MinCostMatcher()
    for _ in range(300):
        loss, _ = detection_loss(det(x), [t], matcher, cls_loss=cls_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        preds = postprocess(det(x), max_det=100, sizes=[(64, 64)])
    res = evaluate_coco(preds, [t], 15)
    assert np.nanmean(res['ap'][:, 0]) >= 0.9, res['ap'][:, 0]


def test_prediction_map_stride():
    x = torch.zeros(2, 3, 64, 96)
    assert Detector(build_vit('test', 16), 3, 32, stride=16)(x)['logits'].shape == (2, 4 * 6, 3)
    assert Detector(build_vit('test', 16), 3, 32, stride=8)(x)['logits'].shape == (2, 8 * 12, 3)
    out = Detector(build_vit('test', 8), 3, 32, stride=4)(x)
    assert out['logits'].shape == (2, 16 * 24, 3) and out['stride'] == 4
    torch.testing.assert_close(out['centres'][:2], torch.tensor([[2.0, 2.0], [6.0, 2.0]]))
    for bad in (32, 12):
        with pytest.raises(ValueError, match='power of 2'):
            Detector(build_vit('test', 16), 3, 32, stride=bad)


def test_varifocal_loss_matches_its_formula():
    torch.manual_seed(0)
    det = Detector(build_vit('test', 8), 2, 32)
    out = det(torch.randn(1, 3, 16, 16))  # 4 cells
    gt = {'boxes': torch.tensor([[2.0, 2, 7, 7]]), 'labels': torch.tensor([1])}
    pi, gi = MinCostMatcher()(out['logits'][0], out['boxes'][0], out['centres'], gt['boxes'], gt['labels'], 8)
    q = giou(out['boxes'][0, pi].detach(), gt['boxes'][gi])[1].item()
    p = out['logits'][0].detach().sigmoid()
    want = -0.75 * p ** 2 * torch.log(1 - p)  # every (cell, class) a negative ...
    pp = p[pi.item(), 1]
    want[pi.item(), 1] = -q * (q * torch.log(pp) + (1 - q) * torch.log(1 - pp))  # ... but the positive
    _, parts = detection_loss(out, [gt], MinCostMatcher(), cls_loss='varifocal')
    assert parts['cls'] == pytest.approx(want.sum().item(), rel=1e-5)
