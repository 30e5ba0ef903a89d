"""Models: a plain ViT (context and target encoders), the JEPA predictor, EMA, schedules (the detector: detector.py).

ViT state-dict keys follow the timm/MAE layout (patch_embed.proj, blocks.N.attn.qkv, ..., norm), so weights can be
compared with or moved to those code bases. There is no CLS token and the 2D sin-cos position embedding is built
for whatever grid the input has, so one encoder serves 128 px synthetic images and 1024 px DOTA tiles.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: encoder width, depth, heads; predictor width, depth, heads. tiny..large are the usual ViT sizes.
PRESETS = {
    'test': dict(dim=32, depth=1, heads=2, pred_dim=32, pred_depth=1, pred_heads=2),  # unit tests
    'mini': dict(dim=128, depth=4, heads=4, pred_dim=64, pred_depth=2, pred_heads=2),  # the CPU demo
    'tiny': dict(dim=192, depth=12, heads=3, pred_dim=96, pred_depth=4, pred_heads=3),
    'small': dict(dim=384, depth=12, heads=6, pred_dim=192, pred_depth=6, pred_heads=6),
    'base': dict(dim=768, depth=12, heads=12, pred_dim=384, pred_depth=6, pred_heads=12),
    'large': dict(dim=1024, depth=24, heads=16, pred_dim=384, pred_depth=12, pred_heads=12),
}


def sincos_pos_embed(dim, grid_h, grid_w, device=None, offset=None):
    """Fixed 2D sin-cos position embedding (grid_h * grid_w, dim), row-major: half the channels encode the row,
    half the column, each as sin/cos of the coordinate at dim/4 frequencies (as in MAE). The coordinates are
    absolute (0 .. grid-1); offset (B, 2) (row, column) in patches, fractions allowed, shifts each image's grid, as
    if it were the window at that position of a larger image -> (B, grid_h * grid_w, dim)."""
    assert dim % 4 == 0, f'embedding dim {dim} must be divisible by 4'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64, device=device),
                            torch.arange(grid_w, dtype=torch.float64, device=device), indexing='ij')
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # (N,)
    if offset is not None:
        off = offset.to(device=device, dtype=torch.float64)
        ys, xs = ys + off[:, :1], xs + off[:, 1:]  # (B, N)
    out = [f(c[..., None] * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]  # 4 x ([B,] N, dim/4)
    return torch.cat(out, -1).float()


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)  # with bias, as in timm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D), N = (H/p) * (W/p) row-major
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module):
    """Truncated-normal linear layers, zero biases, unit LayerNorms; the patch conv like a linear layer (MAE)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


class ViT(nn.Module):
    def __init__(self, patch_size=16, dim=192, depth=12, heads=3, mlp_ratio=4.0):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)

    def embed(self, x, offset=None):
        """x (B, 3, H, W) -> patch tokens plus their positions (B, N, D); offset: see sincos_pos_embed."""
        H, W = x.shape[-2:]
        pos = sincos_pos_embed(self.dim, H // self.patch_size, W // self.patch_size, x.device, offset)
        return self.patch_embed(x) + pos

    def forward(self, x, keep=None, offset=None):
        """x (B, 3, H, W); keep: optional (B, K) indices of the tokens to encode (context encoder: tokens are
        dropped, not zeroed); offset: optional (B, 2) grid shift of the positions. -> (B, K or N, D)."""
        x = self.embed(x, offset)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, self.dim))  # drop after adding positions
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def last_blocks(self, x, k, offset=None):
        """x (B, 3, H, W) -> the residual stream after each of the last k blocks (the last one through the final
        norm, as forward returns it), k x (B, N, D): data2vec's multi-layer targets."""
        x = self.embed(x, offset)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - k:
                outs.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return outs


def build_vit(name, patch_size):
    if name not in PRESETS:
        raise ValueError(f'unknown model {name!r}; presets: {", ".join(PRESETS)}')
    p = PRESETS[name]
    return ViT(patch_size, p['dim'], p['depth'], p['heads'])


class Predictor(nn.Module):
    """Narrow ViT: context tokens plus a learned mask token at each target position -> predicted target features
    (or, with out_dim = patch_size**2 * 3, the target patches' pixels: MAE's linear head, for the ablation).

    It sees where each token sits through its own sin-cos position embedding (width pred_dim)."""

    def __init__(self, enc_dim, dim, depth, heads, out_dim=None):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, out_dim or enc_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, tgt_idx, grid_h, grid_w, offset=None):
        """ctx (B, Nc, enc_dim) context-encoder output; ctx_idx (B, Nc), tgt_idx (B, Nt) token indices; offset
        (B, 2) or None: the encoders' position shift, so that a mask token sits where its target was encoded.
        -> (B, Nt, out_dim) predictions at the target positions."""
        pos = sincos_pos_embed(self.dim, grid_h, grid_w, ctx.device, offset).expand(len(ctx), -1, -1)  # (B, N, dim)
        x = self.embed(ctx) + pos.gather(1, ctx_idx[..., None].expand(-1, -1, self.dim))  # (B, Nc, dim)
        m = self.mask_token + pos.gather(1, tgt_idx[..., None].expand(-1, -1, self.dim))  # (B, Nt, dim)
        x = torch.cat([x, m], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, ctx.shape[1]:]))


def build_predictor(name, dim=None, depth=None, out_dim=None):
    """The predictor of preset `name`, its width and depth overridden when given (its heads stay the preset's)."""
    p = PRESETS[name]
    dim, depth = dim or p['pred_dim'], depth or p['pred_depth']
    if dim % p['pred_heads']:
        raise ValueError(f"a predictor width of {dim} does not split into the preset's {p['pred_heads']} heads")
    return Predictor(p['dim'], dim, depth, p['pred_heads'], out_dim)


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for every parameter; buffers are copied."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


def ema_momentum(step, total_steps, start=0.996, end=1.0):
    """Linear rise from `start` to `end` over training (I-JEPA's schedule)."""
    return start + (end - start) * min(step / max(total_steps, 1), 1.0)


def param_groups(parts, weight_decay):
    """parts: list of (module, lr_scale) -> AdamW groups with 'lr_scale' and 'wd_scale' keys (kept in the
    optimizer's state dict, so a schedule can set lr and weight decay after a resume). Weight decay applies to
    weight matrices and conv kernels only, not to biases, norms or learned tokens."""
    groups = []
    for module, scale in parts:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and n.endswith('weight')]
        other = [p for n, p in named if not (p.ndim >= 2 and n.endswith('weight'))]
        groups += [{'params': decay, 'weight_decay': weight_decay, 'lr_scale': scale, 'wd_scale': 1.0},
                   {'params': other, 'weight_decay': 0.0, 'lr_scale': scale, 'wd_scale': 0.0}]
    return groups


def lr_at(step, total, warmup, peak, floor=0.0):
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def export(ckpt_path, which, out):
    """Write one encoder of a pretrain.py checkpoint as a plain state dict (timm/MAE key layout)."""
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    if which not in ckpt:
        raise SystemExit(f'{ckpt_path} has no {which!r} encoder (keys: {", ".join(ckpt)})')
    torch.save(ckpt[which], out)
    a = ckpt['args']
    print(f'wrote {out}: the {which} encoder, {a["model"]} ViT/{a["patch_size"]}, {len(ckpt[which])} tensors')


if __name__ == '__main__':
    import argparse
    ap = argparse.ArgumentParser(description='Model utilities.')
    sub = ap.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('export', help='write a pretrained encoder as a plain state dict (timm/MAE key names)')
    sp.add_argument('--ckpt', required=True, help='pretrain.py checkpoint (e.g. runs/pretrain/last.pt)')
    sp.add_argument('--which', choices=['context', 'target'], default='context', help='which encoder '
                                                                                      '(default: %(default)s)')
    sp.add_argument('--out', required=True, help='output file, e.g. encoder.pth')
    args = ap.parse_args()
    export(args.ckpt, args.which, args.out)
