"""A plain-PyTorch SHViT with the authors' module tree and class names (ysj9909/SHViT), written from the spec.

Used as the "authors' model" that shvit.accelerate must take; test_authors_tree_matches_the_reference_logits
checks it against the logits the authors' own code produced (spec section 4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shvit.model import make_divisible

S1 = dict(embed_dim=(128, 224, 320), partial_dim=(32, 48, 68), depth=(2, 4, 5), types=("i", "s", "s"))


class GroupNorm(nn.GroupNorm):
    def __init__(self, channels: int):
        super().__init__(1, channels)


class Conv2d_BN(nn.Sequential):
    def __init__(self, a, b, ks=1, stride=1, pad=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class BN_Linear(nn.Sequential):
    def __init__(self, a, b):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b))


class Residual(nn.Module):
    def __init__(self, m, drop=0.0):
        super().__init__()
        self.m, self.drop = m, drop

    def forward(self, x):
        return x + self.m(x)


class FFN(nn.Module):
    def __init__(self, ed, h):
        super().__init__()
        self.pw1, self.act, self.pw2 = Conv2d_BN(ed, h), nn.ReLU(), Conv2d_BN(h, ed, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        rd = make_divisible(channels * 0.25, 8)
        self.fc1, self.act, self.fc2 = nn.Conv2d(channels, rd, 1), nn.ReLU(), nn.Conv2d(rd, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class PatchMerging(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        hid = dim * 4
        self.conv1, self.act = Conv2d_BN(dim, hid), nn.ReLU()
        self.conv2 = Conv2d_BN(hid, hid, 3, 2, 1, groups=hid)
        self.se, self.conv3 = SqueezeExcite(hid), Conv2d_BN(hid, out_dim)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class SHSA(nn.Module):
    def __init__(self, dim, qk_dim, pdim):
        super().__init__()
        self.dim, self.qk_dim, self.pdim, self.scale = dim, qk_dim, pdim, qk_dim ** -0.5
        self.pre_norm = GroupNorm(pdim)
        self.qkv = Conv2d_BN(pdim, 2 * qk_dim + pdim)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(dim, dim, bn_weight_init=0.0))

    def forward(self, x):
        b, _, h, w = x.shape
        xa, xr = x[:, : self.pdim], x[:, self.pdim:]
        q, k, v = self.qkv(self.pre_norm(xa)).flatten(2).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        attn = F.softmax((q.transpose(1, 2) @ k) * self.scale, dim=-1)
        ya = (v @ attn.transpose(1, 2)).reshape(b, self.pdim, h, w)
        return self.proj(torch.cat([ya, xr], dim=1))


class BasicBlock(nn.Module):
    def __init__(self, dim, qk_dim, pdim, type):
        super().__init__()
        self.conv = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.mixer = Residual(SHSA(dim, qk_dim, pdim)) if type == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, dim * 2))

    def forward(self, x):
        return self.ffn(self.mixer(self.conv(x)))


def _conv_ffn(dim):
    return nn.Sequential(Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, dim * 2)))


class SHViT(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, embed_dim=S1["embed_dim"], partial_dim=S1["partial_dim"],
                 qk_dim=(16, 16, 16), depth=S1["depth"], types=S1["types"], distillation=False):
        super().__init__()
        e = embed_dim
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e[0] // 8, 3, 2, 1), nn.ReLU(), Conv2d_BN(e[0] // 8, e[0] // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e[0] // 4, e[0] // 2, 3, 2, 1), nn.ReLU(), Conv2d_BN(e[0] // 2, e[0], 3, 2, 1),
        )
        for i in range(3):
            blocks = [] if i == 0 else [_conv_ffn(e[i - 1]), PatchMerging(e[i - 1], e[i]), _conv_ffn(e[i])]
            blocks += [BasicBlock(e[i], qk_dim[i], partial_dim[i], types[i]) for _ in range(depth[i])]
            setattr(self, f"blocks{i + 1}", nn.Sequential(*blocks))
        self.head = BN_Linear(e[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        if distillation:
            self.head_dist = BN_Linear(e[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.blocks3(self.blocks2(self.blocks1(self.patch_embed(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if not self.distillation:
            return self.head(x)
        out = self.head(x), self.head_dist(x)
        return out if self.training else (out[0] + out[1]) / 2


AuthorsSHViT = SHViT
