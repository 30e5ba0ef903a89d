"""Masking: equal counts across a batch, disjoint sets, object patches hidden at 1 - object_keep, the rest random."""
import pytest
import torch

from masking import make_masks, object_masking, object_patches, random_masking, saliency_patches


def check_partition(ctx, tgt, N, M):
    B = ctx.shape[0]
    assert ctx.shape == (B, N - M) and tgt.shape == (B, M)
    both = torch.cat([ctx, tgt], 1).sort(1).values
    assert torch.equal(both, torch.arange(N).expand(B, -1))  # disjoint, and together every patch once


def test_object_patches_match_a_brute_force_check():
    boxes = [torch.tensor([[3.0, 3, 9, 5], [16, 0, 17, 31.9]]), torch.zeros(0, 4), torch.tensor([[0.0, 0, 8, 8]])]
    hit = object_patches(boxes, 4, 4, 8).view(3, 4, 4)
    for b, bx in enumerate(boxes):
        for i in range(4):
            for j in range(4):
                want = any(x1 < (j + 1) * 8 and x2 > j * 8 and y1 < (i + 1) * 8 and y2 > i * 8
                           for x1, y1, x2, y2 in bx.tolist())
                assert hit[b, i, j].item() == want, (b, i, j)


@pytest.mark.parametrize('mode', ['object', 'random'])
def test_counts_equal_and_sets_disjoint(mode):
    boxes = [torch.tensor([[0.0, 0, 40, 40]]), torch.zeros(0, 4), torch.tensor([[10.0, 10, 12, 12]] * 3)]
    ctx, tgt, tgt_obj = make_masks(mode, boxes, 8, 8, 8, 0.75)
    check_partition(ctx, tgt, 64, 48)
    want = object_patches(boxes, 8, 8, 8).gather(1, tgt)
    assert torch.equal(tgt_obj, want)


def test_object_patches_hidden_at_one_minus_keep_and_background_uniform():
    N, M, keep, trials = 100, 75, 0.25, 4000
    is_obj = torch.zeros(trials, N, dtype=torch.bool)
    is_obj[:, :40] = True  # 40 object patches: about 30 hidden, the other ~45 hidden patches are background
    g = torch.Generator().manual_seed(0)
    ctx, tgt = object_masking(is_obj, 0.75, keep, g)
    check_partition(ctx, tgt, N, M)
    hidden = torch.zeros(trials, N, dtype=torch.bool).scatter_(1, tgt, True)
    assert hidden[:, :40].float().mean().item() == pytest.approx(1 - keep, abs=0.01)
    bg = hidden[:, 40:].float().mean(0)  # per background patch: all hidden at the same rate
    expected = (M - 40 * (1 - keep)) / 60
    assert bg.mean().item() == pytest.approx(expected, abs=0.01)
    assert (bg - expected).abs().max().item() < 0.04  # ~5 sigma for 4000 trials


def test_many_object_patches_are_subsampled():
    is_obj = torch.ones(500, 64, dtype=torch.bool)
    is_obj[:, :4] = False
    g = torch.Generator().manual_seed(1)
    _, tgt = object_masking(is_obj, 0.5, object_keep=0.0, generator=g)
    hidden = torch.zeros(500, 64, dtype=torch.bool).scatter_(1, tgt, True)
    assert not hidden[:, :4].any()  # background never needed
    assert hidden[:, 4:].float().mean(0).sub(32 / 60).abs().max() < 0.1  # a uniform subsample of object patches


def test_no_objects_falls_back_to_random():
    g = torch.Generator().manual_seed(2)
    _, tgt = object_masking(torch.zeros(3000, 16, dtype=torch.bool), 0.5, generator=g)
    rate = torch.zeros(3000, 16).scatter_(1, tgt, 1.0).mean(0)
    assert (rate - 0.5).abs().max() < 0.04


def test_random_masking_and_bad_ratio():
    ctx, tgt = random_masking(4, 196, 0.75)
    check_partition(ctx, tgt, 196, 147)
    with pytest.raises(ValueError, match='mask_ratio'):
        random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match='unknown mask mode'):
        make_masks('blocks', [torch.zeros(0, 4)], 2, 2, 8, 0.5)


@pytest.mark.parametrize('mode', ['object', 'random'])
def test_every_row_and_column_is_sometimes_hidden(mode):
    g = torch.Generator().manual_seed(0)
    hit = torch.zeros(10 * 12)
    for _ in range(30):
        xy = torch.rand(8, 2) * 80
        boxes = [torch.cat([xy[i:i + 1], xy[i:i + 1] + 12], 1) for i in range(8)]
        _, tgt, _ = make_masks(mode, boxes, 10, 12, 8, 0.75, generator=g)
        hit += torch.zeros(8, 120).scatter_(1, tgt, 1.0).sum(0)
    hit = hit.view(10, 12)
    assert (hit.sum(1) > 0).all() and (hit.sum(0) > 0).all()


def test_saliency_picks_the_tokens_unlike_their_image_and_hides_them_first():
    B, N, D = 3, 64, 8
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, 1, D).expand(B, N, D) + 0.01 * torch.randn(B, N, D, generator=g)  # a plain field...
    odd = torch.tensor([[3, 10, 20, 30, 40, 50, 60, 63], [0, 1, 2, 3, 4, 5, 6, 7], [9, 18, 27, 36, 45, 54, 62, 7]])
    feats = feats.clone()
    feats[torch.arange(B)[:, None], odd] += 5 * torch.randn(B, 8, D, generator=g)  # ...with 8 objects in it
    salient = saliency_patches(feats, 8 / 64)
    assert salient.sum(1).tolist() == [8, 8, 8]
    assert all(set(salient[b].nonzero().squeeze(1).tolist()) == set(odd[b].tolist()) for b in range(B))
    ctx, tgt, _ = make_masks('saliency', [torch.zeros(0, 4)] * B, 8, 8, 8, 0.75, object_keep=0.0, generator=g,
                             salient=salient)
    assert tgt.shape == (B, 48) and ctx.shape == (B, 16)  # the ratio asked
    assert salient.gather(1, tgt).sum().item() == 3 * 8  # every salient patch hidden (none kept visible)
    assert not salient.gather(1, ctx).any()
    # with object_keep 0.25 about a quarter of them stay visible, as object patches do
    kept = [salient.gather(1, make_masks('saliency', [torch.zeros(0, 4)] * B, 8, 8, 8, 0.75, generator=g,
                                         salient=salient)[0]).sum().item() for _ in range(200)]
    assert 0.2 < sum(kept) / (200 * 3 * 8) < 0.3
    with pytest.raises(ValueError, match='salient'):
        make_masks('saliency', [torch.zeros(0, 4)] * B, 8, 8, 8, 0.75)
