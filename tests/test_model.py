"""ViT (attention, token dropping, key layout), predictor, EMA, schedules, a few JEPA steps."""
import copy

import torch

from masking import make_masks
from model import Attention, Predictor, build_vit, ema_momentum, ema_update, lr_at, sincos_pos_embed
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


def test_pos_offset_gives_each_image_its_window_of_a_larger_grid():
    big = sincos_pos_embed(32, 6, 8).view(6, 8, 32)
    pe = sincos_pos_embed(32, 3, 4, offset=torch.tensor([[0, 0], [2, 3], [3, 4]]))  # (B, N, D)
    assert pe.shape == (3, 12, 32)
    for b, (oy, ox) in enumerate([(0, 0), (2, 3), (3, 4)]):
        torch.testing.assert_close(pe[b], big[oy:oy + 3, ox:ox + 4].reshape(12, 32))
    vit = build_vit('test', 8).eval()
    x = torch.randn(2, 3, 24, 32)
    torch.testing.assert_close(vit(x, offset=torch.zeros(2, 2, dtype=torch.long)), vit(x))
    shifted = vit(x, offset=torch.tensor([[0, 0], [1, 2]]))
    torch.testing.assert_close(shifted[0], vit(x)[0])
    assert not torch.allclose(shifted[1], vit(x)[1])  # positions, not pixels, moved
    torch.testing.assert_close(vit.last_blocks(x, 1, torch.tensor([[0, 0], [1, 2]]))[0], shifted)  # the targets


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
    big = lambda i: (i // 4 + 1) * 7 + i % 4 + 2  # noqa: E731  index in a 6 x 7 grid of the 4 x 4 grid at (1, 2)
    tgt_idx = torch.tensor([[5, 6, 7], [8, 9, 15]])
    shifted = pred(ctx, ctx_idx, tgt_idx, 4, 4, offset=torch.tensor([[1, 2]] * 2))  # mask tokens where the encoders
    torch.testing.assert_close(shifted, pred(ctx, big(ctx_idx), big(tgt_idx), 6, 7))  # put their targets


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
