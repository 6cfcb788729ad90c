"""
l3d: UP-LVSM in one file.

UP-LVSM renders novel views of a scene from two unposed photos with a plain transformer and no 3D
machinery: no poses in, no depth, no epipolar geometry. Paper: "The Less You Depend, The More You
Learn: Synthesizing Novel Views from Sparse, Unposed Images" (Wang, Ye, Qin, Li, Chen, Chen;
ICLR 2026; arXiv 2506.09885). This file holds the model, the loader for the authors' released
checkpoints, the loss, the data pipeline and the training loop.

Train (the paper's 224 pre-training, then the 518 fine-tuning):
    torchrun --nproc_per_node 8 l3d.py --res 224 --data data/re10k/train/full_list.txt
    torchrun --nproc_per_node 8 l3d.py --res 518 --init runs/x224/ckpt_0100000.pt
One GPU, for debugging (the blocks compile one at a time, in about a minute):
    python l3d.py --res 224 --batch 4 --out runs/debug
The paper's posed-target baseline, PT-LVSM, with the same recipe (--model lvsm: given every camera):
    torchrun --nproc_per_node 8 l3d.py --res 224 --model ptlvsm
A laptop CPU, for a class (generated scenes):
    python prepare.py synthetic && python l3d.py --tiny
Render with the released weights:
    model = l3d.load_model("x224")
    render, pose = model(ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy)
bench.py times the training step; prepare.py makes datasets; eval.py scores checkpoints.

Where to start reading: the docstring of UPLVSM walks one batch through the model, shape by shape;
every piece it names is defined above it, and training follows below it.
"""

import argparse
import csv
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: the architecture, saved inside every checkpoint


@dataclass
class Config:
    model: str = "uplvsm"  # or "ptlvsm", the release's posed-target baseline, or "lvsm", which poses all views
    image_size: int = 224  # R: square images of R x R pixels
    patch_size: int = 14  # p: every tokenizer works on p x p patches
    dim: int = 768  # d: token width of every transformer
    head_dim: int = 64
    n_encoder: int = 6  # blocks that read the context views into the latents
    n_estimator: int = 4  # blocks that read a target image and the latents into a pose
    n_decoder: int = 14  # blocks that turn target rays and the latents into pixels
    n_latents: int = 1024  # learned tokens that carry the scene from encoder to decoder
    tok_depth: int = 12  # the DINOv2 ViT-B/14 image tokenizer
    tok_heads: int = 12
    tok_registers: int = 4
    tok_pos_grid: int = 37  # DINOv2's position embeddings were made for 518 / 14 = 37 patches a side
    n_blocks: int = 24  # PT-LVSM only: its one stack over context and target tokens (6 + 4 + 14 above)

    @staticmethod
    def paper(res=224, model="uplvsm"):
        return Config(model=model, image_size=res)

    @staticmethod
    def tiny(model="uplvsm"):
        # a laptop CPU trains it in minutes: 32 x 32 crops, 16 tokens a view, 16 latents; PT-LVSM's one
        # stack as deep as UP-LVSM's three, as in the paper (24 = 6 + 4 + 14)
        return Config(model=model, image_size=32, patch_size=8, dim=128, head_dim=32, n_encoder=2,
                      n_estimator=1, n_decoder=3, n_latents=16, tok_depth=2, tok_heads=4, tok_registers=2,
                      tok_pos_grid=4, n_blocks=6)


# -----------------------------------------------------------------------------
# Cameras and rays. OpenCV cameras: x right, y down, z forward; c2w maps camera to world.


def quat_to_rotation(q):
    """Unit or not, scalar-last quaternions [..., 4] (x, y, z, w) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)  # 2 / |q|^2 makes the formula exact for quaternions of any length
    rot = torch.stack([
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ], -1)
    return rot.reshape(q.shape[:-1] + (3, 3))  # [..., 9] -> [..., 3, 3]


def pose_to_c2w(pose):
    """Pose encodings [..., 7] (translation, then quaternion xyzw) -> c2w [..., 4, 4]."""
    c2w = torch.zeros(pose.shape[:-1] + (4, 4), dtype=pose.dtype, device=pose.device)
    c2w[..., :3, :3] = quat_to_rotation(pose[..., 3:7])
    c2w[..., :3, 3] = pose[..., :3]
    c2w[..., 3, 3] = 1.0
    return c2w


def plucker_rays(c2w, fxfycxcy, h, w):
    """Plucker ray map of every pixel: c2w [b, v, 4, 4], fxfycxcy [b, v, 4] -> [b, v, 6, h, w].

    Channels are cross(origin, direction) then the unit direction. Always float32: the
    normalisation is the one place where bf16 would visibly bend the rays.
    """
    with torch.autocast(c2w.device.type, enabled=False):
        c2w, fxfycxcy = c2w.float(), fxfycxcy.float()
        fx, fy, cx, cy = (t[:, :, None, None] for t in fxfycxcy.unbind(-1))  # each [b, v, 1, 1]
        ys, xs = torch.meshgrid(torch.arange(h, device=c2w.device, dtype=torch.float32),
                                torch.arange(w, device=c2w.device, dtype=torch.float32), indexing="ij")
        # pixel centres sit at +0.5
        d_cam = torch.stack([(xs + 0.5 - cx) / fx, (ys + 0.5 - cy) / fy, torch.ones_like(fx * xs)], -1)
        d = torch.einsum("bvij,bvhwj->bvhwi", c2w[:, :, :3, :3], d_cam)  # [b, v, h, w, 3]
        d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-3)
        o = c2w[:, :, None, None, :3, 3].expand_as(d)  # [b, v, h, w, 3]
        rays = torch.cat([torch.cross(o, d, dim=-1), d], -1)  # [b, v, h, w, 6]
        return rays.permute(0, 1, 4, 2, 3)  # [b, v, 6, h, w]


def patchify(x, p):
    """[b, v, c, h, w] -> [b, v, n, p*p*c]: patches in raster order, each flattened (row, column, channel)."""
    b, v, c, h, w = x.shape
    x = x.reshape(b, v, c, h // p, p, w // p, p)  # [b, v, c, h/p, p, w/p, p]
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # [b, v, h/p, w/p, p, p, c]
    return x.reshape(b, v, (h // p) * (w // p), p * p * c)  # [b, v, n, p*p*c]


def unpatchify(x, p, h, w):
    """[b, v, n, p*p*c] -> [b, v, c, h, w], the inverse of patchify."""
    b, v, n, ppc = x.shape
    c = ppc // (p * p)
    x = x.reshape(b, v, h // p, w // p, p, p, c)  # [b, v, h/p, w/p, p, p, c]
    x = x.permute(0, 1, 6, 2, 4, 3, 5)  # [b, v, c, h/p, p, w/p, p]
    return x.reshape(b, v, c, h, w)  # [b, v, c, h, w]


# -----------------------------------------------------------------------------
# Transformer pieces. One block serves both the DINOv2 tokenizer (biases, LayerScale, LayerNorm
# eps 1e-6) and the LVSM stacks (no biases anywhere, eps 1e-5); both add QK-norm.


def attention(q, k, v):
    """Softmax attention, q, k, v [b, heads, n, head_dim] -> [b, heads, n, head_dim]. PyTorch picks a
    fused kernel from the device, dtype and shapes (README, "Benchmark", names them)."""
    return F.scaled_dot_product_attention(q, k, v)


class RMSNorm(nn.Module):
    """Per-head RMS normalisation of queries and keys, computed in float32 and cast back."""

    def __init__(self, dim, eps=1e-3):
        super().__init__()
        self.eps = eps  # large on purpose: keeps near-zero heads from blowing up under bf16
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight.type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim, head_dim, bias):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, keep=None):
        """x [b, n, d] -> [b, n, d]; or [b, m, d], the m tokens of the slice keep, the only queries."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)  # [b, n, 3, heads, head_dim]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, head_dim]
        q = q if keep is None else q[:, :, keep]  # [b, heads, m, head_dim]
        x = attention(self.q_norm(q), self.k_norm(k), v)  # [b, heads, m, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, q.shape[2], d))  # [b, heads, m, head_dim] -> [b, m, d]


class MLP(nn.Module):
    def __init__(self, dim, hidden, out, bias):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with QK-norm. dino=True: the DINOv2 flavour."""

    def __init__(self, dim, head_dim, dino=False):
        super().__init__()
        eps = 1e-6 if dino else 1e-5
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=dino)
        self.attn = SelfAttention(dim, head_dim, bias=dino)
        self.ls1 = LayerScale(dim) if dino else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=dino)
        self.mlp = MLP(dim, 4 * dim, dim, bias=dino)
        self.ls2 = LayerScale(dim) if dino else nn.Identity()

    def forward(self, x, keep=None):
        """keep: a slice of the tokens whose outputs are used. The last block of a stack needs only
        those: the other tokens still give keys and values, but no query, projection or MLP."""
        h = self.attn(self.norm1(x), keep)
        x = (x if keep is None else x[:, keep]) + self.ls1(h)
        return x + self.ls2(self.mlp(self.norm2(x)))


# -----------------------------------------------------------------------------
# Image tokenizer: DINOv2 ViT-B/14 with 4 registers, plus QK-norm


def resize_pos_embed(pos, gh, gw):
    """Patch position embeddings [1, g*g, d] made for a g x g grid -> [1, gh*gw, d].

    Bicubic with antialias to the exact size, in float32, as DINOv2 does for registers models.
    """
    g = math.isqrt(pos.shape[1])
    if (gh, gw) == (g, g):
        return pos
    grid = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, d, g, g]
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)  # [1, d, gh, gw]
    return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)  # [1, gh*gw, d]


class ImageTokenizer(nn.Module):
    """Images [b, v, 3, R, R] in [0, 1] (no mean/std normalisation) -> patch tokens [b, v, n, d]."""

    def __init__(self, cfg):
        super().__init__()
        d, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.tok_pos_grid ** 2, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.tok_registers, d))
        self.blocks = nn.ModuleList(Block(d, d // cfg.tok_heads, dino=True) for _ in range(cfg.tok_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, images):
        b, v, c, h, w = images.shape
        x = self.patch_embed(images.reshape(b * v, c, h, w))  # [b*v, d, h/p, w/p]
        gh, gw = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # [b*v, n, d]
        pos = torch.cat([self.pos_embed[:, :1], resize_pos_embed(self.pos_embed[:, 1:], gh, gw)], 1)
        x = torch.cat([self.cls_token.expand(b * v, -1, -1), x], 1) + pos  # [b*v, 1+n, d]
        r = self.register_tokens.shape[1]
        # registers go in after cls and after the position embeddings: they have none
        x = torch.cat([x[:, :1], self.register_tokens.expand(b * v, -1, -1), x[:, 1:]], 1)  # [b*v, 1+r+n, d]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1 + r:]  # keep the patch tokens only
        return x.reshape(b, v, gh * gw, -1)  # [b*v, n, d] -> [b, v, n, d]


# -----------------------------------------------------------------------------
# UP-LVSM, and PT-LVSM, the release's posed-target baseline


class LVSM(nn.Module):
    """What UP-LVSM and PT-LVSM share: the image tokenizer, the first context view's marker, the ray
    tokens of target cameras, the pixel head, the release's initialisation and per-block gradient
    checkpointing. Each model builds its own transformer in build_stacks(), between the shared
    layers in and out: the order of creation is the order of the random initialisation."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        p, d = cfg.patch_size, cfg.dim
        self.tokenizer = ImageTokenizer(cfg)
        self.canonical_rays = nn.Linear(6 * p * p, d, bias=False)
        self.target_rays = nn.Linear(6 * p * p, d, bias=False)
        stacks = self.build_stacks(cfg)
        self.decoder_norm_out = nn.LayerNorm(d, bias=False)
        self.to_pixels = nn.Linear(d, p * p * 3, bias=False)
        self.grad_checkpoint = False
        self.init_weights(stacks)

    def init_weights(self, stacks):
        """From-scratch initialisation, as the release does it; the tokenizer gets DINOv2's own scheme."""
        tok = self.tokenizer
        for m in tok.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(tok.pos_embed, std=0.02)
        nn.init.normal_(tok.cls_token, std=1e-6)
        nn.init.normal_(tok.register_tokens, std=1e-6)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("tokenizer."):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # deeper blocks start smaller so the residual stream grows slowly
        for stack in stacks:
            for i, block in enumerate(stack):
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * (i + 1)))

    def run(self, blocks, x, keep):
        """x [b, n, d] through a stack of blocks -> the tokens of the slice keep, [b, m, d]."""
        for i, block in enumerate(blocks):
            last = keep if i == len(blocks) - 1 else None
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, last, use_reentrant=False)
            else:
                x = block(x, last)
        return x

    def check_images(self, **images):
        R = self.config.image_size
        for name, x in images.items():
            if x.ndim != 5 or tuple(x.shape[2:]) != (3, R, R):
                raise ValueError(f"{name} must be [b, v, 3, {R}, {R}] for this model, got {list(x.shape)}")

    def mark_views(self, tokens, c2w, fxfycxcy):
        """Context tokens [b, v, n, d] -> the same, the first k views' plus the ray tokens of their
        cameras c2w [b, k, 4, 4] (intrinsics fxfycxcy [b, v, 4]). UP-LVSM and PT-LVSM mark view 0
        only, the view whose frame every camera is placed in; LVSM marks every view."""
        R, p, k = self.config.image_size, self.config.patch_size, c2w.shape[1]
        rays = plucker_rays(c2w, fxfycxcy[:, :k], R, R)  # [b, k, 6, R, R]
        return torch.cat([tokens[:, :k] + self.canonical_rays(patchify(rays, p)), tokens[:, k:]], 1)

    def ray_tokens(self, c2w, fxfycxcy):
        """Target cameras c2w [b, v, 4, 4] and intrinsics [b, v, 4] -> ray tokens [b*v, n, d]."""
        R, p = self.config.image_size, self.config.patch_size
        x = self.target_rays(patchify(plucker_rays(c2w, fxfycxcy, R, R), p))  # [b, v, n, d]
        return x.flatten(0, 1)  # [b, v, n, d] -> [b*v, n, d]

    def pixels(self, x, b, v):
        """Output tokens [b*v, n, d] -> images [b, v, 3, R, R]: LayerNorm, linear, sigmoid, unpatchify."""
        R, p = self.config.image_size, self.config.patch_size
        rgb = torch.sigmoid(self.to_pixels(self.decoder_norm_out(x)))  # [b*v, n, p*p*3]
        return unpatchify(rgb.reshape(b, v, x.shape[1], -1), p, R, R)  # [b*v, n, p*p*3] -> [b, v, 3, R, R]


class UPLVSM(LVSM):
    """Two unposed context views + target images -> target renders and target poses.

    No pose is ever given: the first context view is the world frame, marked by the rays of an
    identity camera, and the target image is only read by the pose estimator, which squeezes it
    into 7 numbers. The render comes from the scene latents and the rays of that estimated camera.
    Shapes at the paper's 224 (R = 224, p = 14, n = 256 patches a view, d = 768, L = 1024 latents),
    for b scenes of 2 context views and v target views:

        context images [b, 2, 3, R, R] --tokenizer--> [b, 2, n, d], + identity-camera rays on view 0
        [latents L, context tokens 2n] --encoder (6 blocks)--> scene latents [b, L, d]
        target images [b, v, 3, R, R] --tokenizer--> [b*v, n, d]
        [target tokens n, latents L] --estimator (4 blocks), mean over n--> [b*v, d]
            --two heads--> pose [b, v, 7]: translation, unit quaternion (x, y, z, w)
        pose --> c2w [b, v, 4, 4] --with intrinsics--> Plucker rays [b, v, 6, R, R]
            --patchify, linear--> ray tokens [b*v, n, d]
        [ray tokens n, latents L] --decoder (14 blocks), first n--> [b*v, n, d]
            --linear, sigmoid--> [b*v, n, p*p*3] --unpatchify--> render [b, v, 3, R, R]
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        nn.init.trunc_normal_(self.latents, std=0.02)

    def build_stacks(self, cfg):
        d, hd = cfg.dim, cfg.head_dim
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, d))
        self.encoder = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_encoder))
        self.estimator = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_estimator))
        self.translation_head = MLP(d, d // 2, 3, bias=True)
        self.rotation_head = MLP(d, d // 2, 4, bias=True)
        self.decoder_norm_in = nn.LayerNorm(d, bias=False)
        self.decoder = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_decoder))
        return self.encoder, self.decoder

    def encode(self, ctx_images, ctx_fxfycxcy):
        """Context views [b, v, 3, R, R] and their intrinsics [b, v, 4] -> scene latents [b, L, d]."""
        b, v = ctx_images.shape[:2]
        identity = torch.eye(4, device=ctx_images.device).expand(b, 1, 4, 4)  # view 0 is the world frame
        tokens = self.mark_views(self.tokenizer(ctx_images), identity, ctx_fxfycxcy)  # [b, v, n, d]
        n, d = tokens.shape[2:]
        x = torch.cat([self.latents.expand(b, -1, -1), tokens.reshape(b, v * n, d)], 1)  # [b, L + v*n, d]
        return self.run(self.encoder, x, keep=slice(0, self.config.n_latents))

    def estimate_pose(self, latents, tgt_images):
        """Latents [b, L, d] and target images [b, v, 3, R, R] -> pose encodings [b, v, 7]."""
        b, v = tgt_images.shape[:2]
        tokens = self.tokenizer(tgt_images).flatten(0, 1)  # [b*v, n, d]
        n = tokens.shape[1]
        x = torch.cat([tokens, latents.repeat_interleave(v, 0)], 1)  # [b*v, n + L, d]
        x = self.run(self.estimator, x, keep=slice(0, n)).mean(1)  # [b*v, n, d] -> [b*v, d]
        t, q = self.translation_head(x), self.rotation_head(x)
        q32 = q.float()
        q = (q32 / q32.norm(dim=-1, keepdim=True).clamp(min=1e-3)).to(q.dtype)
        return torch.cat([t, q], -1).reshape(b, v, 7)  # [b*v, 7] -> [b, v, 7]

    def decode(self, latents, c2w, fxfycxcy):
        """Latents [b, L, d], cameras c2w [b, v, 4, 4], intrinsics [b, v, 4] -> images [b, v, 3, R, R]."""
        b, v = c2w.shape[:2]
        x = self.ray_tokens(c2w, fxfycxcy)  # [b*v, n, d]
        n = x.shape[1]
        x = self.decoder_norm_in(torch.cat([x, latents.repeat_interleave(v, 0)], 1))  # [b*v, n + L, d]
        return self.pixels(self.run(self.decoder, x, keep=slice(0, n)), b, v)

    def forward(self, ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy, ctx_c2w=None, tgt_c2w=None):
        """-> (renders [b, v, 3, R, R], poses [b, v, 7]). The cameras are taken, as PT-LVSM takes them,
        and never read: UP-LVSM's only poses are the ones it estimates."""
        self.check_images(ctx_images=ctx_images, tgt_images=tgt_images)
        latents = self.encode(ctx_images, ctx_fxfycxcy)
        pose = self.estimate_pose(latents, tgt_images)
        render = self.decode(latents, pose_to_c2w(pose.float()), tgt_fxfycxcy)
        return render, pose


class PTLVSM(LVSM):
    """The release's posed-target baseline: the same tokenizer and pixel head as UP-LVSM, but each
    target is given by its known camera instead of its image, and one stack of blocks reads the
    context and target tokens together. Cameras are in the frame of the sampled views' mean camera
    (normalize_poses); the first context view is marked by the rays of its own camera.

    model="lvsm" is the top rung of the paper's ladder of 3D knowledge: every context view is marked by
    its camera, as LVSM gives every pose. It is LVSM's idea in this PT-LVSM body, not LVSM's released
    architecture, and the release has no such checkpoint.
    Shapes at 224 (n = 256 patches a view, d = 768), for b scenes of 2 context and v target views:

        context images [b, 2, 3, R, R] --tokenizer--> [b, 2, n, d], + view 0's rays --> [b, 2n, d]
        target c2w [b, v, 4, 4] --with intrinsics--> Plucker rays --patchify, linear--> [b*v, n, d]
        [context tokens 2n, target tokens n] --LayerNorm, 24 blocks, last n--> [b*v, n, d]
            --LayerNorm, linear, sigmoid--> [b*v, n, p*p*3] --unpatchify--> render [b, v, 3, R, R]
    """

    def build_stacks(self, cfg):
        self.norm_in = nn.LayerNorm(cfg.dim, bias=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.head_dim) for _ in range(cfg.n_blocks))
        return (self.blocks,)

    def forward(self, ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy, ctx_c2w, tgt_c2w):
        """-> (renders [b, v, 3, R, R], None: no pose is estimated). The target images are taken, as
        UP-LVSM takes them, and never read: the target camera stands in for them."""
        self.check_images(ctx_images=ctx_images, tgt_images=tgt_images)
        v = tgt_c2w.shape[1]
        posed = ctx_c2w.shape[1] if self.config.model == "lvsm" else 1
        tokens = self.mark_views(self.tokenizer(ctx_images), ctx_c2w[:, :posed], ctx_fxfycxcy)  # [b, 2, n, d]
        b, _, n, d = tokens.shape
        x = self.ray_tokens(tgt_c2w, tgt_fxfycxcy)  # [b*v, n, d]
        tokens = tokens.flatten(1, 2).repeat_interleave(v, 0)  # [b, 2, n, d] -> [b*v, 2n, d]
        x = self.norm_in(torch.cat([tokens, x], 1))  # [b*v, 2n + n, d]
        return self.pixels(self.run(self.blocks, x, keep=slice(-n, None)), b, v), None


@torch.no_grad()
def next_camera_renders(model, ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy, ctx_c2w, tgt_c2w, pose):
    """Each target rendered from the camera of the next target of its scene, cyclically: the one
    UP-LVSM estimated for it (pose [b, v, 7], the forward's) or the one PT-LVSM is given (pose None)
    -> [b, v, 3, R, R]. Scored against the targets, it prices the camera: a model that ignores its
    camera renders the same image and loses nothing."""
    if pose is None:
        return model(ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy.roll(-1, 1), ctx_c2w,
                     tgt_c2w.roll(-1, 1))[0]
    latents = model.encode(ctx_images, ctx_fxfycxcy)
    return model.decode(latents, pose_to_c2w(pose.roll(-1, 1).float()), tgt_fxfycxcy.roll(-1, 1))


def make_model(cfg):
    if cfg.model not in ("uplvsm", "ptlvsm", "lvsm"):
        raise ValueError(f"unknown model {cfg.model!r}: l3d has uplvsm, ptlvsm and lvsm")
    return UPLVSM(cfg) if cfg.model == "uplvsm" else PTLVSM(cfg)


# -----------------------------------------------------------------------------
# Loading weights: the authors' released checkpoints, l3d's own, and DINOv2's

CACHE_DIR = Path(os.environ.get("L3D_CACHE", Path.home() / ".cache" / "l3d"))
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14_reg4_pretrain.pth"
RELEASE_URL = "https://huggingface.co/littlekoyo/Less3Depend/resolve/main"  # L3D_WEIGHTS_URL replaces it
RELEASED = {"x224": ("uplvsm_x224.pt", 224), "x518": ("uplvsm_x518.pt", 518)}  # name: file, image size

# The release's parameter names -> ours. The first prefix that matches is replaced, then every
# layer rename applies (only the release's LVSM blocks use those names). That is the whole map.
RELEASE_PREFIXES = [
    ("image_tokenizer.1.dino_vit.patch_embed.proj.", "tokenizer.patch_embed."),
    ("image_tokenizer.1.dino_vit.", "tokenizer."),
    ("n_light_field_latent", "latents"),
    ("canonical_pose_tokenizer.1.", "canonical_rays."),
    ("target_pose_tokenizer.1.", "target_rays."),
    ("transformer_encoder.", "encoder."),
    ("estimator.transformer_estimator.", "estimator."),
    ("estimator.absT_head.", "translation_head."),
    ("estimator.quaR_head.", "rotation_head."),
    ("transformer_input_layernorm_decoder.", "decoder_norm_in."),
    ("transformer_decoder.", "decoder."),
    ("image_token_decoder.0.", "decoder_norm_out."),
    ("image_token_decoder.1.", "to_pixels."),
    ("transformer_input_layernorm.", "norm_in."),  # PT-LVSM's
    ("transformer_blocks.", "blocks."),  # PT-LVSM's
]
RELEASE_LAYERS = [(".attn.to_qkv.", ".attn.qkv."), (".attn.fc.", ".attn.proj."),
                  (".mlp.mlp.0.", ".mlp.fc1."), (".mlp.mlp.2.", ".mlp.fc2.")]
DINOV2_PREFIXES = [("patch_embed.proj.", "patch_embed.")]  # DINOv2's own file -> our ImageTokenizer


def rename(sd, prefixes, layers=()):
    """A state dict under new names: the first matching (old, new) prefix, then every layer rename."""
    out = {}
    for name, tensor in sd.items():
        for old, new in prefixes:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        for old, new in layers:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def load_weights(module, sd, source, new=()):
    """Copy sd into module, every name and shape checked; only parameters whose names end in one of
    `new` (weights the file's model did not have) may be absent, and keep their initial values."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)  # still raises on a shape mismatch
    except RuntimeError as e:
        raise ValueError(f"{source}: does not fit {type(module).__name__}: {e}") from None
    missing = [k for k in missing if not k.endswith(tuple(new))]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit {type(module).__name__} {getattr(module, 'config', '')}: "
                         f"missing {len(missing)} tensor(s) {missing[:6]}, unexpected {len(unexpected)} "
                         f"{unexpected[:6]}")


def read_checkpoint(path):
    """A checkpoint file -> its dict. weights_only: a file from the internet must not run code as it loads."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file, nor the name of released weights "
                                f"({', '.join(RELEASED)})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); a download cut short? Fetch it again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: holds no 'model' state dict, so it is neither a released UP-LVSM "
                         f"checkpoint nor an l3d one")
    return ckpt


def load_model(ckpt, res=None, config=None):
    """A checkpoint -> UPLVSM (or PTLVSM) on the CPU, in eval mode. ckpt: "x224" or "x518", the
    authors' released weights (downloaded once into the cache), or a path, or a loaded checkpoint dict.

    l3d checkpoints record their Config; res, if given, overrides the image size (the tokenizer
    resizes its position embeddings). The released files are Config.paper(res) and do not record
    res: by name it is known, by path pass 224 or 518. config replaces Config.paper(res) for
    release-named files of other sizes.
    """
    if isinstance(ckpt, str) and ckpt in RELEASED:
        name, res = RELEASED[ckpt][0], res or RELEASED[ckpt][1]
        ckpt = download(os.environ.get("L3D_WEIGHTS_URL", RELEASE_URL).rstrip("/") + "/" + name)
    source = str(ckpt) if isinstance(ckpt, (str, Path)) else "checkpoint dict"
    ckpt = read_checkpoint(ckpt) if isinstance(ckpt, (str, Path)) else ckpt
    if "config" in ckpt:
        cfg = Config(**ckpt["config"])
        cfg = replace(cfg, image_size=res) if res else cfg
        sd = ckpt["model"]
    else:
        if res is None and config is None:
            raise ValueError(f"{source}: released checkpoints do not record their image size; "
                             f"pass res=224 or res=518 (eval.py: --res 224 or --res 518)")
        model = "ptlvsm" if "transformer_blocks.0.norm1.weight" in ckpt["model"] else "uplvsm"
        cfg = replace(config, image_size=res or config.image_size) if config else Config.paper(res, model)
        sd = {k: v for k, v in ckpt["model"].items() if not k.startswith("loss_computer.")}
        if len(sd) < len(ckpt["model"]):
            print(f"{source}: ignored {len(ckpt['model']) - len(sd)} tensor(s) under loss_computer.* "
                  f"(the training loss's frozen VGG-19)")
        sd = rename(sd, RELEASE_PREFIXES, RELEASE_LAYERS)
    model = make_model(cfg)
    load_weights(model, sd, source)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a run that diverged: every render would be NaN, and every mean of them meaningless
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite weights, the first {bad[0]}")
    return model.eval()


def cached(url):
    """Where the file at url lives once downloaded: CACHE_DIR/<its file name>."""
    return CACHE_DIR / url.rsplit("/", 1)[-1]


def download(url):
    """The file at url, downloaded once into CACHE_DIR (torch.hub writes through a temporary file and
    shows a progress bar) -> its path."""
    dest = cached(url)
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dest), progress=True)
        except OSError as e:
            raise OSError(f"could not download {url} to {dest} ({e}); download it by hand and put it "
                          f"there (or point L3D_CACHE at a folder that holds it)") from e
    return dest


def load_dinov2(model, path=None, url=DINOV2_URL):
    """Initialise the image tokenizer from DINOv2 ViT-B/14 reg4: a local file, or one download into CACHE_DIR.

    The QK-norm weights are new to DINOv2's blocks and stay at 1; DINOv2's mask token is unused.
    """
    path = Path(path) if path else download(url)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DINOv2 checkpoint")
    sd = rename(torch.load(path, map_location="cpu", weights_only=True), DINOV2_PREFIXES)
    sd.pop("mask_token", None)
    load_weights(model.tokenizer, sd, str(path), new=("q_norm.weight", "k_norm.weight"))


# -----------------------------------------------------------------------------
# Loss: MSE + the LVSM perceptual loss (VGG-19 with average pooling, MatConvNet weights)

VGG19_URL = "https://www.vlfeat.org/matconvnet/models/imagenet-vgg-verydeep-19.mat"
# conv layers of VGG-19 up to relu5_2, grouped into the five slices whose outputs the loss compares
VGG19_SLICES = [["conv1_1", "conv1_2"], ["pool", "conv2_1", "conv2_2"], ["pool", "conv3_1", "conv3_2"],
                ["conv3_3", "conv3_4", "pool", "conv4_1", "conv4_2"],
                ["conv4_3", "conv4_4", "pool", "conv5_1", "conv5_2"]]
VGG19_WEIGHTS = [1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5]  # LVSM's per-slice balance


def read_matconvnet_vgg(path):
    """imagenet-vgg-verydeep-19.mat -> {"conv1_1": nn.Conv2d, ...} for the convs PerceptualLoss uses."""
    import scipy.io  # only here: the one place that reads MATLAB files
    try:
        layers = scipy.io.loadmat(str(path))["layers"][0]
    except Exception as e:
        raise ValueError(f"{path}: not a readable MatConvNet VGG-19 file ({e})") from e
    wanted = {n for names in VGG19_SLICES for n in names if n != "pool"}
    convs = {}
    for layer in layers:
        rec = layer[0][0]
        name = str(rec["name"][0])
        if name in wanted:
            w, b = rec["weights"][0][0], rec["weights"][0][1]
            w = torch.from_numpy(np.ascontiguousarray(w)).float()
            w = w.permute(3, 2, 0, 1)  # [h, w, in, out] -> [out, in, h, w]
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(torch.from_numpy(np.asarray(b)).float().reshape(-1))  # [out, 1] -> [out]
            convs[name] = conv
    if missing := sorted(wanted - set(convs)):
        raise ValueError(f"{path}: VGG-19 file lacks layers {missing}")
    return convs


class PerceptualLoss(nn.Module):
    """LVSM's perceptual loss. Frozen; max-pools are 2x2 average pools, which give smoother gradients."""

    def __init__(self, path=None, url=VGG19_URL, random_weights=False):
        super().__init__()
        if random_weights:  # for timing only: the same network, untrained
            convs, width = {}, 3
            for name in (n for names in VGG19_SLICES for n in names if n != "pool"):
                convs[name] = nn.Conv2d(width, 64 * 2 ** min(int(name[4]) - 1, 3), 3, padding=1)
                width = convs[name].out_channels
        else:
            convs = read_matconvnet_vgg(path or download(url))
        self.slices = nn.ModuleList()
        for names in VGG19_SLICES:
            layers = []
            for name in names:
                if name == "pool":
                    layers.append(nn.AvgPool2d(2, 2))
                else:
                    layers += [convs[name], nn.ReLU()]
            self.slices.append(nn.Sequential(*layers))
        mean = torch.tensor([123.68, 116.779, 103.939])  # ImageNet's RGB mean, in MatConvNet's 0-255 units
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1))  # [3] -> [1, 3, 1, 1]
        self.requires_grad_(False)
        self.eval()

    def forward(self, pred, target):
        """pred, target [N, 3, h, w] in [0, 1] -> scalar."""
        x, y = pred * 255.0 - self.mean, target * 255.0 - self.mean
        loss = (x - y).abs().mean()
        for block, weight in zip(self.slices, VGG19_WEIGHTS):
            x, y = block(x), block(y)
            loss = loss + weight * (x - y).abs().mean()
        return loss / 255.0


# -----------------------------------------------------------------------------
# Data: the processed RealEstate10K layout (LVSM's and the release's), the paper's view sampling,
# and evaluation indexes


def read_list(list_path):
    """full_list.txt -> metadata json paths (relative entries are relative to the list's folder)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: no such list file (a full_list.txt from prepare.py)")
    # utf-8-sig: a byte-order mark (Windows editors add one) is not part of the first path
    paths = [Path(line.strip()) for line in list_path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [str(p if p.is_absolute() else list_path.parent / p) for p in paths]


def read_scene(meta_path):
    """A scene's metadata json -> {"scene_name", "frames": [{"image_path", "fxfycxcy", "w2c"}]}.

    Image paths are resolved: relative ones against the split folder, and absolute ones that no
    longer exist (a dataset moved since conversion) against the split folder's images/<scene>/.
    """
    meta_path = Path(meta_path)
    try:
        scene = json.loads(meta_path.read_text())
        frames, name = scene["frames"], scene["scene_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: unreadable scene metadata ({e!r})") from e
    split = meta_path.resolve().parent.parent
    for f in frames:
        p = Path(f["image_path"])
        if not p.is_absolute():
            p = split / p
        elif not p.exists() and (split / "images" / str(name) / p.name).exists():
            p = split / "images" / str(name) / p.name
        f["image_path"] = str(p)
    return {"scene_name": str(name), "frames": frames}


def crop_view(img, fxfycxcy, res, patch):
    """An RGB PIL image and its intrinsics -> (image [3, R, R] in [0, 1], fxfycxcy [4]), preprocessed
    as the release does: resize so the height is R and the width keeps the aspect ratio, rounded to a
    multiple of the patch (Lanczos), then centre-crop R x R; the intrinsics move with the pixels. A
    portrait frame is resized by its width instead and centre-cropped in height.
    """
    w0, h0 = img.size
    w, h = int(round(int(res / h0 * w0) / patch) * patch), res
    if w < res:
        w, h = res, int(round(int(res / w0 * h0) / patch) * patch)
    left, top = (w - res) // 2, (h - res) // 2
    img = img.resize((w, h), Image.LANCZOS).crop((left, top, left + res, top + res))
    image = torch.from_numpy(np.asarray(img).copy()).float() / 255.0
    image = image.permute(2, 0, 1)  # [h, w, 3] -> [3, h, w]
    fx, fy, cx, cy = (float(x) for x in fxfycxcy)
    sx, sy = w / w0, h / h0
    return image, torch.tensor([fx * sx, fy * sy, cx * sx - left, cy * sy - top])


def load_view(path, fxfycxcy, res, patch):
    """One frame on disk -> (image [3, R, R] in [0, 1], fxfycxcy [4]), preprocessed by crop_view."""
    with Image.open(path) as img:
        return crop_view(img.convert("RGB"), fxfycxcy, res, patch)


def normalize_poses(c2w):
    """The release's pose normalisation for PT-LVSM: the cameras c2w [v, 4, 4] of a sample's views ->
    the same cameras in the frame of their mean camera, translations scaled so that the largest
    coordinate is 1 / 1.35. The mean camera sits at the mean centre and looks along the mean forward
    axis; its right axis is (mean down axis) x forward, its down axis forward x right."""
    centre = c2w[:, :3, 3].mean(0)
    forward = F.normalize(c2w[:, :3, 2].mean(0), dim=0)
    right = F.normalize(torch.cross(c2w[:, :3, 1].mean(0), forward, dim=0), dim=0)
    down = F.normalize(torch.cross(forward, right, dim=0), dim=0)
    mean = torch.eye(4, dtype=c2w.dtype)
    mean[:3, :3] = torch.stack([right, down, forward], 1)
    mean[:3, 3] = centre
    c2w = torch.linalg.inv(mean) @ c2w  # [v, 4, 4]
    # the release divides by the largest coordinate as it is; cameras all in one place would give 0 / 0
    c2w[:, :3, 3] /= 1.35 * c2w[:, :3, 3].abs().max().clamp(min=1e-8)
    return c2w


def check_cameras(frames, indices=None):
    """The one test of whether a scene's cameras can be used (training, held-out checks, eval.py and
    prepare.py all ask it): every chosen frame has a finite w2c whose rotation part can be inverted,
    and finite, positive fx and fy. -> None, or ValueError naming the first bad frame and what is wrong."""
    for i in range(len(frames)) if indices is None else indices:
        w2c = np.asarray(frames[i]["w2c"], dtype=np.float64)
        fx, fy = (float(x) for x in frames[i]["fxfycxcy"][:2])
        if w2c.shape != (4, 4):
            raise ValueError(f"frame {i}: w2c has shape {list(w2c.shape)}, not 4 x 4")
        if not np.isfinite(w2c).all():
            raise ValueError(f"frame {i}: w2c is not finite")
        if abs(np.linalg.det(w2c[:3, :3])) < 1e-6:  # a rotation has |det| 1; 0 cannot be inverted
            raise ValueError(f"frame {i}: the rotation part of w2c cannot be inverted (determinant "
                             f"{np.linalg.det(w2c[:3, :3]):.3g})")
        if not (math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0):
            raise ValueError(f"frame {i}: focal lengths fx, fy = {fx:g}, {fy:g}: they must be finite and positive")


def load_cameras(frames, indices):
    """Chosen frames of a scene -> their c2w [v, 4, 4], normalised together (float64 maths)."""
    check_cameras(frames, indices)
    w2c = torch.tensor([frames[i]["w2c"] for i in indices], dtype=torch.float64)  # [v, 4, 4]
    return normalize_poses(torch.linalg.inv(w2c)).float()


def load_views(frames, indices, res, patch):
    """Frames of a scene, chosen indices -> (images [v, 3, R, R], fxfycxcy [v, 4])."""
    views = [load_view(frames[i]["image_path"], frames[i]["fxfycxcy"], res, patch) for i in indices]
    return torch.stack([im for im, _ in views]), torch.stack([k for _, k in views])


def sample_views(n_frames, rng, n_views=8, min_gap=25, max_gap=192):
    """The paper's view choice: frames s and s+g are the context (in that order), then n_views-2
    distinct frames strictly between them; g is uniform in [min_gap, min(max_gap, n_frames-1)].
    Returns None for scenes too short, which the release takes as n_frames - 1 <= min_gap."""
    hi = min(max_gap, n_frames - 1)
    if hi <= min_gap:
        return None
    gap = rng.randint(min_gap, hi)
    start = rng.randint(0, n_frames - gap - 1)
    return [start, start + gap] + rng.sample(range(start + 1, start + gap), n_views - 2)


class SceneDataset(torch.utils.data.Dataset):
    """Training samples: 2 context views and n_targets targets drawn among the 8 chosen views, as
    (ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy, ctx_c2w, tgt_c2w), the cameras normalised
    over the 8 views (PT-LVSM reads them, UP-LVSM does not).

    Items are (scene index, sample seed) pairs from epoch_samples, so a sample depends on nothing
    but its seed: a resumed run sees exactly the batches the uninterrupted run would have.
    A scene that is too short or unreadable is skipped with a warning naming it, and another scene
    is drawn in its place: one bad scene never stops a run. keep_frames keeps every scene's metadata
    and every frame, once decoded and cropped, in memory (8-bit): for datasets that fit, read in the
    main process (--workers 0), where decoding would otherwise take a third of a tiny step.
    """

    def __init__(self, list_path, res, patch, n_targets=6, keep_frames=False):
        self.scenes = read_list(list_path)
        if not self.scenes:
            raise ValueError(f"{list_path}: lists no scenes")
        self.res, self.patch, self.n_targets = res, patch, n_targets
        self.kept = {} if keep_frames else None  # scene index -> frames; (scene, frame) -> (image, fxfycxcy)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, item):
        i, seed = item
        rng = random.Random(seed)
        for _ in range(100):
            try:
                frames = self.frames(i)
                views = sample_views(len(frames), rng)
                if views is None:
                    raise ValueError(f"only {len(frames)} frames, fewer than the 27 the view sampling needs")
                images, fxfycxcy = (torch.stack(x) for x in zip(*(self.view(i, frames, k) for k in views)))
                c2w = load_cameras(frames, views)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                warnings.warn(f"skipping scene {self.scenes[i]}: {e}")
                i = rng.randrange(len(self.scenes))
                continue
            tgt = rng.sample(range(len(views)), self.n_targets)  # targets may include the context views
            return images[:2], fxfycxcy[:2], images[tgt], fxfycxcy[tgt], c2w[:2], c2w[tgt], i
        raise RuntimeError(f"100 scenes in a row were unusable; check the dataset (last: {self.scenes[i]})")

    def check_usable(self, list_path):
        """Before the first step: ValueError, in one line, when no scene of the list could give a sample
        (too short, unreadable metadata, unusable cameras), naming the first and why. Reads metadata
        only, up to the first usable scene."""
        first = None
        for path in self.scenes:
            try:
                frames = read_scene(path)["frames"]
                if sample_views(len(frames), random.Random(0)) is None:
                    raise ValueError(f"only {len(frames)} frames, fewer than the 27 the view sampling needs")
                check_cameras(frames)
                return
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                first = first or f"{path}: {e}"
        raise ValueError(f"{list_path}: none of its {len(self.scenes)} scenes can be trained on; the first: {first}")

    def frames(self, i):
        if self.kept is None:
            return read_scene(self.scenes[i])["frames"]
        if i not in self.kept:
            self.kept[i] = read_scene(self.scenes[i])["frames"]
        return self.kept[i]

    def view(self, i, frames, k):
        """Frame k of scene i -> (image [3, R, R] in [0, 1], fxfycxcy [4]), as load_view makes it."""
        if self.kept is None:
            return load_view(frames[k]["image_path"], frames[k]["fxfycxcy"], self.res, self.patch)
        if (i, k) not in self.kept:
            image, fxfycxcy = load_view(frames[k]["image_path"], frames[k]["fxfycxcy"], self.res, self.patch)
            self.kept[i, k] = image.mul(255).round().byte(), fxfycxcy  # exact: the pixels were 8-bit
        image, fxfycxcy = self.kept[i, k]
        return image.float() / 255.0, fxfycxcy


def epoch_samples(n_scenes, epoch, rank, world, seed):
    """One rank's (scene index, sample seed) pairs for an epoch: a fresh shuffle every epoch, cut
    into equal disjoint shares so that every rank trains on different scenes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_scenes, generator=g)
    seeds = torch.randint(2 ** 62, (n_scenes,), generator=g)
    share = n_scenes // world
    mine = slice(rank * share, (rank + 1) * share)
    return list(zip(order[mine].tolist(), seeds[mine].tolist()))


MODEL_INPUTS = ("ctx_images", "ctx_fxfycxcy", "tgt_images", "tgt_fxfycxcy", "ctx_c2w", "tgt_c2w")


def load_indexed_scene(meta, context, target, res, patch):
    """A scene of an evaluation index -> {MODEL_INPUTS: the context and target views [v, 3, R, R], their
    intrinsics [v, 4] and PT-LVSM's cameras [v, 4, 4] (normalised over the indexed views), "c2w": the
    dataset's cameras of context then targets, [2 + v, 4, 4] float64}. IndexError: frames past the end."""
    frames = read_scene(meta)["frames"]
    if not all(0 <= f < len(frames) for f in context + target):
        raise IndexError(f"the index asks for frames {context + target}, the scene has {len(frames)}")
    scene = dict(zip(MODEL_INPUTS[:2], load_views(frames, context, res, patch)))
    scene |= dict(zip(MODEL_INPUTS[2:4], load_views(frames, target, res, patch)))
    c2w = load_cameras(frames, context + target)
    w2c = torch.tensor([frames[i]["w2c"] for i in context + target], dtype=torch.float64)
    scene |= {"ctx_c2w": c2w[:len(context)], "tgt_c2w": c2w[len(context):]}
    return scene | {"c2w": torch.linalg.inv(w2c)}


def index_entry_problem(views):
    """Why an evaluation index entry cannot be scored as written, or None. Frame numbers are plain
    integers (json's true and 1.0 are not frames), targets are distinct, and a target repeats a context
    view only in an entry that says so with "context_targets": true (prepare.py's range and sweep
    indexes render the context views back on purpose; elsewhere it would score a copy)."""
    if not (isinstance(views, dict) and isinstance(views.get("context"), list) and isinstance(views.get("target"), list)
            and views["context"] and views["target"]):
        return "expected {'context': [frames], 'target': [frames]}, both non-empty"
    frames = views["context"] + views["target"]
    odd = [f for f in frames if type(f) is not int]  # bool is an int to isinstance
    if odd:
        return f"frame numbers must be plain integers, not {odd[0]!r}"
    if len(set(views["target"])) < len(views["target"]):
        return f"repeated targets {views['target']}"
    if len(set(views["context"])) < len(views["context"]):
        return f"repeated context views {views['context']}"
    shared = sorted(set(views["context"]) & set(views["target"]))
    if shared and views.get("context_targets") is not True:
        return (f"targets {shared} are context views too (scored, they would reward a copy; an entry "
                f"meant to render its context views back says \"context_targets\": true)")
    return None


def read_index(index_path):
    """An evaluation index json -> {scene: {"context": [i, j], "target": [a, b, c]} or None}.
    Other keys of an entry (the release's extra indexes have "overlap") are kept and ignored. An entry
    that cannot be scored as written is refused, with every such scene named and why."""
    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{index_path}: unreadable evaluation index ({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: expected a json object {{scene: views}}, not {type(index).__name__}")
    bad = {k: index_entry_problem(v) for k, v in index.items() if v is not None}
    bad = [f"{k!r}: {why}" for k, why in bad.items() if why]
    if bad:
        raise ValueError(f"{index_path}: {len(bad)} entries cannot be scored: " + "; ".join(bad[:5])
                         + ("; ..." if len(bad) > 5 else ""))
    return index


def index_views(list_path, index):
    """The scenes of an evaluation index (read_index's dict) that a split has -> ([(scene, metadata
    path, context, target)] sorted by scene, counts of the index entries left out: null ones and
    scenes not in the list). No metadata is read: the processed layout names each metadata file
    after its scene."""
    on_disk = {Path(p).stem: p for p in read_list(list_path)}
    views, counts = [], {"index_null": 0, "missing": 0}
    for scene in sorted(index):
        if index[scene] is None:
            counts["index_null"] += 1
        elif scene not in on_disk:
            counts["missing"] += 1
        else:
            views.append((scene, on_disk[scene], index[scene]["context"], index[scene]["target"]))
    return views, counts


# -----------------------------------------------------------------------------
# Training: one process per GPU (or one on the CPU), AdamW with warm-up then cosine, the release's
# skip rules, the memory plan, resumable checkpoints, stop signals, the log and held-out checks


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


LOG_FILE_INTERVAL_S = 120


def progress(iterable=None, **kwargs):
    """tqdm, redrawn as it likes on a terminal. Into a file (SLURM's --output, `> run.log`) every redraw
    is another line kept for good, so there it is redrawn every LOG_FILE_INTERVAL_S seconds at most,
    with the same counts, rates and postfix, and once more at the end. -> (bar, refresh): pass refresh
    to set_postfix, so that a new postfix waits for the next redraw in a file."""
    terminal = sys.stderr.isatty()
    if not terminal:
        kwargs = {"mininterval": LOG_FILE_INTERVAL_S, "maxinterval": LOG_FILE_INTERVAL_S, **kwargs}
    return tqdm(iterable, **kwargs), terminal


def autocast_dtype(device, requested=None):
    """The dtype the model runs in under autocast: bf16 on a GPU, as the paper trains, float32 on a CPU.
    A GPU without bf16 of its own (before Ampere: V100, T4) would emulate it slowly, or fail: there
    l3d falls back to float32 and says so. requested: "bf16" or "fp32" to choose."""
    want = requested or ("bf16" if device.type == "cuda" else "fp32")
    if want == "fp32":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        print0(f"{torch.cuda.get_device_name(device)} has no bfloat16: running in float32 instead, "
               f"slower and with more memory than bf16")
        return torch.float32
    return torch.bfloat16


def setup(device=None):
    """-> (rank, world size, device). torchrun sets RANK and starts one process per GPU, joined by
    NCCL (gloo on CPUs); a plain `python` run is rank 0 of 1. device: "cuda" or "cpu", or None for
    the GPU when there is one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def lr_at(step, peak, warmup, total):
    """Learning rate of optimizer step `step` (0-based): linear warm-up from 0, then cosine to 0."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay=0.05):
    """AdamW; matrices and conv kernels decay, vectors (norms, biases, LayerScale) do not. Fused: one
    kernel for all parameters, on the GPU and on the CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def clip_or_skip(params, clip=1.0, skip_factor=4.0):
    """Zero non-finite gradients and clip the total norm at `clip` -> (too large, pre-clip norm), both
    0-d tensors on the gradients' device: nothing waits for the GPU. Too large, above skip_factor *
    clip, means the update should be skipped: the release's guard against loss spikes."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return norm > skip_factor * clip, norm


def psnr(pred, target):
    """PSNR in dB of images [N, 3, h, w] in [0, 1], one per image -> [N] float64 (inf where equal).
    The render is clamped to [0, 1] first, as the paper's evaluation does."""
    pred, target = pred.double().clamp(0, 1), target.double().clamp(0, 1)
    mse = (pred - target).pow(2).flatten(1).mean(1)  # [N, 3, h, w] -> [N, 3*h*w] -> [N]
    return -10 * torch.log10(mse)


def sample_stacks(cfg, v_ctx=2, v_tgt=6):
    """The transformer stacks one training sample goes through -> [(blocks, tokens a sequence, tokens
    the last block keeps, sequences)]: the tokenizer first, once per image it reads."""
    n, L = (cfg.image_size // cfg.patch_size) ** 2, cfg.n_latents
    t = 1 + cfg.tok_registers + n
    if cfg.model != "uplvsm":  # the context images only, then per target one stack over its n and the 2n
        return [(cfg.tok_depth, t, t, v_ctx), (cfg.n_blocks, (v_ctx + 1) * n, n, v_tgt)]
    return [(cfg.tok_depth, t, t, v_ctx + v_tgt), (cfg.n_encoder, L + v_ctx * n, L, 1),
            (cfg.n_estimator, n + L, n, v_tgt), (cfg.n_decoder, n + L, n, v_tgt)]


def model_flops(cfg, v_ctx=2, v_tgt=6):
    """Forward FLOPs of one training sample (matmuls only, 2 per multiply-add)."""
    d, p2, n = cfg.dim, cfg.patch_size ** 2, (cfg.image_size // cfg.patch_size) ** 2

    def blocks(depth, tokens, kept, seqs):
        # per token qkv 6 d^2, proj and MLP 18 d^2, attention 4 d per key; the last block asks queries
        # of the kept tokens only
        full = 24 * d * d * tokens + 4 * tokens * tokens * d
        last = 6 * d * d * tokens + 18 * d * d * kept + 4 * kept * tokens * d
        return seqs * ((depth - 1) * full + last)

    stacks = sample_stacks(cfg, v_ctx, v_tgt)
    images = stacks[0][3]
    patch_embed = images * 2 * 3 * p2 * d * n
    marked = v_ctx if cfg.model == "lvsm" else 1
    rays_and_pixels = 2 * 6 * p2 * d * n * (marked + v_tgt) + 2 * d * 3 * p2 * n * v_tgt
    return patch_embed + sum(blocks(*stack) for stack in stacks) + rays_and_pixels


# Activation memory of the compiled blocks under each budget, in bytes per token, block and channel,
# and of the perceptual loss per target pixel: fitted to measured peaks (README, "Benchmark").
ACTIVATION_BYTES = {1.0: 40, 0.75: 24, 0.5: 21}
VGG_BYTES_PER_PIXEL = 1000


def token_blocks(cfg, v_ctx=2, v_tgt=6):
    """Tokens times the blocks they pass through, summed over one training sample."""
    return sum(depth * tokens * seqs for depth, tokens, _, seqs in sample_stacks(cfg, v_ctx, v_tgt))


def step_memory(model, batch, budget, perceptual):
    """Estimated peak bytes of a compiled training step: weights, gradients and AdamW's two moments
    in float32, then the activations, which grow with the batch."""
    cfg = model.config
    per_sample = ACTIVATION_BYTES[budget] * cfg.dim * token_blocks(cfg)
    if perceptual:
        per_sample += VGG_BYTES_PER_PIXEL * 6 * cfg.image_size ** 2
    return 16 * sum(p.numel() for p in model.parameters()) + batch * per_sample


def memory_budget(model, args, device):
    """--memory-budget -> (the share of activations the compiled blocks keep, a line saying why).
    auto: keep them all (the fastest) where the step fits in the GPU's free memory, else the largest
    measured budget that fits."""
    if args.memory_budget != "auto":
        return float(args.memory_budget), f"budget {args.memory_budget}"
    free = torch.cuda.mem_get_info(device)[0]
    for budget in ACTIVATION_BYTES:
        need = step_memory(model, args.batch, budget, args.perceptual > 0)
        if need < 0.92 * free:  # the allocator's fragmentation and cuDNN's workspace want the rest
            break
    line = f"budget {budget} (auto: about {need / 2 ** 30:.0f} GiB of {free / 2 ** 30:.0f} GiB free)"
    if need >= 0.92 * free:
        line += "; may not fit: try --grad-checkpoint or a smaller --batch"
    return budget, line


def compile_blocks(model):
    """torch.compile every transformer block in place, and nothing else: regional compilation, where
    one block's graph is compiled once and reused by all the blocks like it (compiling the whole
    model takes minutes). The names in the state dict stay as they are.

    All blocks share one forward, and dynamo allows a function 8 graphs by default, then runs the
    calls that need another one eagerly, without a word. Tokenizer and LVSM blocks, the last block
    of each stack, and training beside evaluation need about a dozen, so the limit is raised.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    return model


def make_train_step(model, opt, args, device, world, perceptual=None):
    """-> train_step(batch, lr) -> (loss, PSNR, gradient norm, updated): the paper's training step,
    the one train() and bench() both take. The four are 0-d tensors on the device, read only when
    printed, so that the host never waits for the GPU between steps. The loss is averaged over
    ranks, so that every rank makes the same decision to update or to skip."""
    if args.compile and device.type == "cuda":
        # Under a budget below 1, each compiled block keeps that share of its activations for
        # backward and recomputes the rest, the ops cheapest to redo first (norms, GELU).
        from torch._functorch import config as functorch_config
        functorch_config.activation_memory_budget, plan = memory_budget(model, args, device)
        print0(f"memory plan: compiled blocks, activation {plan}")
        compile_blocks(model)
    run = model
    if world > 1:
        run = torch.nn.parallel.DistributedDataParallel(model)  # on the model's one device, GPU or CPU
    params = [p for p in model.parameters() if p.requires_grad]

    dtype = autocast_dtype(device)

    def train_step(batch, lr):
        ctx, ctx_k, tgt, tgt_k, ctx_c2w, tgt_c2w = (x.to(device, non_blocking=True) for x in batch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            render, _ = run(ctx, ctx_k, tgt, tgt_k, ctx_c2w, tgt_c2w)
            render, tgt = render.float().flatten(0, 1), tgt.flatten(0, 1)  # [b, v, 3, h, w] -> [b*v, 3, h, w]
            loss = F.mse_loss(render, tgt)
            if perceptual:
                loss = loss + args.perceptual * perceptual(render, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        loss = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        too_large, gnorm = clip_or_skip(params, args.clip)
        updated = ~too_large & torch.isfinite(loss)
        # fused AdamW leaves parameters and moments untouched where found_inf is 1 (the hook
        # GradScaler uses), so skipping needs no host-side branch
        opt.found_inf = (~updated).float()
        opt.step()
        return loss, psnr(render.detach(), tgt).mean(), gnorm, updated

    return train_step


def batches(data, step, per_epoch, args, rank, world, pin_memory):
    """Training batches from step `step` on, epoch after epoch: a resumed run gets exactly the batches
    the uninterrupted run would have had."""
    epoch, done = divmod(step, per_epoch)
    while True:
        samples = epoch_samples(len(data), epoch, rank, world, args.seed)[done * args.batch:]
        yield from torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=samples, drop_last=True,
                                               num_workers=args.workers, pin_memory=pin_memory)
        epoch, done = epoch + 1, 0


def write_atomic(path, write):
    """Write a file through a temporary one and a rename, so that readers see the old file or the new
    one, never half of one. write: the text, or a function that writes the file at the path it is
    given. Text the file already holds is not written again (reruns change nothing); a failed write
    leaves no temporary file."""
    path = Path(path)
    if isinstance(write, str):
        if path.is_file() and path.read_text() == write:
            return
        write = functools.partial(Path.write_text, data=write)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def tensor_bytes(obj):
    """Bytes of all the tensors in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(tensor_bytes(x) for x in obj) if isinstance(obj, (list, tuple)) else 0


def save_checkpoint(out, ckpt, keep):
    """Write out/ckpt_<step>.pt through a temporary file and a rename; keep the newest `keep`. A failed
    write (a full disk, say) leaves no temporary file behind and says how much room it wanted."""
    path = Path(out) / f"ckpt_{ckpt['step']:07d}.pt"
    try:
        write_atomic(path, functools.partial(torch.save, ckpt))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        free = shutil.disk_usage(out).free
        raise OSError(f"{out}: could not write {path.name} (about {tensor_bytes(ckpt) / 2 ** 30:.2f} GiB, "
                      f"{free / 2 ** 30:.2f} GiB free): {str(e).splitlines()[0]}") from None
    for old in sorted(Path(out).glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(out):
    """The newest readable checkpoint in out -> (path, checkpoint dict), or None."""
    for path in sorted(Path(out).glob("ckpt_*.pt"), reverse=True):
        try:
            return path, read_checkpoint(path)
        except ValueError as e:  # a file cut short by a full disk; the rename makes this rare
            # renamed aside, kept for a look but out of the ckpt_*.pt that --keep counts and prunes
            aside = path.with_name(path.name + ".unreadable")
            path.rename(aside)
            print0(f"{e}; renamed it {aside.name} and trying an older one")
    return None


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM's warning before it preempts, with sbatch --signal) and SIGINT (Ctrl-C)
    ask the run to stop after the step in flight, save and exit; a second Ctrl-C stops at once.
    Under torchrun the ranks agree after every step, so that all stop after the same one."""

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __enter__(self):
        self.caught = 0
        self.before = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.before.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if signum == signal.SIGINT == self.caught:
            raise KeyboardInterrupt
        self.caught = self.caught or signum

    def agreed(self, group):
        """-> the signal that any rank caught (0: none), the same on every rank."""
        if group is None:
            return self.caught
        flag = torch.tensor([self.caught])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return int(flag)


def same_start(step, out, world, group):
    """Stop every rank, with one message, unless all found the same checkpoint step: ranks that
    resume from different steps would train apart and overwrite each other's checkpoints."""
    if group is None:
        return
    starts = [None] * world
    here = (step, str(Path(out).resolve()), os.uname().nodename)
    torch.distributed.all_gather_object(starts, here, group=group)
    if len({s for s, _, _ in starts}) > 1:
        found = "; ".join(f"rank {r} on {host}: step {s} in {path}"
                          for r, (s, path, host) in enumerate(starts))
        raise ValueError(f"the ranks found different checkpoints ({found}); --out must be one folder that "
                         f"every node sees")


LOG_COLUMNS = ["step", "elapsed_s", "lr", "loss", "train_psnr", "grad_norm", "skipped", "samples_s",
               "peak_gib", "heldout_psnr", "heldout_mean_of_context", "heldout_best_context_copy",
               "heldout_camera_worth_db"]


def open_log(out, step):
    """out/log.csv, opened for appending, with the rows past `step` dropped first: a run resumed
    from its checkpoint at `step` logs again what the stopped run logged after it, so every step
    appears once, in order. Training rows are means since the row before."""
    path = Path(out) / "log.csv"
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
    rows = [r for r in rows if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= step]
    write_atomic(path, "".join(",".join(r) + "\n" for r in [LOG_COLUMNS] + rows))
    return open(path, "a")


def heldout_line(scores):
    return (f"held-out PSNR {scores['psnr']:.2f} dB (baselines: mean of the two context views "
            f"{scores['mean_of_context']:.2f}, better context view copied {scores['best_context_copy']:.2f}); "
            f"camera worth {scores['camera_worth_db']:.2f} dB")


def peak_memory(device):
    """The GPU's peak allocated GiB since the last call, as text ("" off CUDA)."""
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return f"{peak:.2f}"


def memory_note(peak):
    return f", peak memory {peak} GiB" if peak else ""


def to_pil(image):
    """An image [3, h, w] in [0, 1] -> an 8-bit RGB PIL image."""
    image = image.clamp(0, 1).mul(255).round().byte().cpu()
    return Image.fromarray(image.permute(1, 2, 0).numpy())  # [3, h, w] -> [h, w, 3]


def load_heldout(list_path, index_path, n_scenes, cfg):
    """The first n_scenes scenes of an evaluation index that load, loaded once -> [load_indexed_scene
    dicts]. One bad scene is named and left out: it must not stop training."""
    scenes = []
    for name, meta, context, target in index_views(list_path, read_index(index_path))[0][:n_scenes]:
        try:
            scenes.append(load_indexed_scene(meta, context, target, cfg.image_size, cfg.patch_size))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            print0(f"held-out scene {name} skipped: {e}")
    return scenes


@torch.no_grad()
def heldout(model, scenes, device, out_png=None):
    """Mean PSNR of the model on held-out scenes, beside two baselines a model must beat: the pixel
    mean of the two context views, and the better of the two context views copied (per target);
    and what the camera is worth: the dB lost when each target is rendered from the next one's."""
    model.eval()
    scores = {"psnr": [], "mean_of_context": [], "best_context_copy": [], "camera_worth_db": []}
    rows = []
    for scene in scenes:
        ci, ti = scene["ctx_images"], scene["tgt_images"]
        inputs = [scene[k][None].to(device) for k in MODEL_INPUTS]
        render, pose = model(*inputs)
        render = render[0].float().cpu()  # [v, 3, R, R]
        other = next_camera_renders(model, *inputs, pose)[0].float().cpu()  # [v, 3, R, R]
        scores["camera_worth_db"] += (psnr(render, ti) - psnr(other, ti)).tolist()
        scores["psnr"] += psnr(render, ti).tolist()
        scores["mean_of_context"] += psnr(ci.mean(0, keepdim=True).expand_as(ti), ti).tolist()
        copies = torch.stack([psnr(ci[k:k + 1].expand_as(ti), ti) for k in range(len(ci))])  # [v_ctx, v]
        scores["best_context_copy"] += copies.amax(0).tolist()
        if len(rows) < 4:  # first | last context view | target | render
            rows.append(torch.cat([ci[0], ci[-1], ti[0], render[0]], 2))
    if out_png and rows:
        to_pil(torch.cat(rows, 1)).save(out_png)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def build(args):
    """The processes, the model of the preset and its optimizer -> (rank, world, device, model, opt)."""
    rank, world, device = setup(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the paper trains
    torch.manual_seed(args.seed)
    cfg = Config.tiny(args.model) if args.tiny else Config.paper(args.res, args.model)
    model = make_model(cfg).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    return rank, world, device, model, make_optimizer(model, args.lr)


def train(args):
    started = time.time()
    rank, world, device, model, opt = build(args)
    cfg = model.config
    # step counts the batches trained on, and sets the schedule; updates counts those the optimizer
    # applied, the rest having been skipped for a non-finite loss or a gradient spike
    step, updates, elapsed = 0, 0, 0.0
    out = Path(args.out)
    if last := latest_checkpoint(out):
        path, ckpt = last
        if Config(**ckpt["config"]) != cfg:
            raise ValueError(f"{path}: holds a run of {Config(**ckpt['config'])}, not of {cfg}; "
                             f"pass another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, updates, elapsed = ckpt["step"], ckpt["updates"], ckpt.get("elapsed", 0.0)
        print0(f"resuming from {path} at step {step}")
    # a CPU group beside NCCL's: the ranks agree on small things without waiting for the GPU
    group = torch.distributed.new_group(backend="gloo") if world > 1 else None
    same_start(step, out, world, group)
    if step == 0 and args.init:
        init = load_model(args.init, res=cfg.image_size, config=cfg)
        if init.config != cfg:
            raise ValueError(f"{args.init}: its architecture {init.config} differs from this run's {cfg}")
        model.load_state_dict(init.state_dict())
        print0(f"initialised from {args.init} (weights only: optimizer and schedule start fresh)")
    elif step == 0 and args.dinov2 != "none":
        load_dinov2(model, None if args.dinov2 == "download" else args.dinov2)
        print0("image tokenizer initialised from DINOv2 ViT-B/14 reg4")
    perceptual = PerceptualLoss(args.vgg).to(device) if args.perceptual > 0 else None
    train_step = make_train_step(model, opt, args, device, world, perceptual)

    data = SceneDataset(args.data, cfg.image_size, cfg.patch_size, keep_frames=args.keep_frames)
    data.check_usable(args.data)
    per_epoch = len(data) // world // args.batch
    if per_epoch == 0:
        raise ValueError(f"{args.data}: {len(data)} scenes over {world} rank(s) make no batch of "
                         f"{args.batch}; a smaller --batch?")
    scenes = []
    if rank == 0 and Path(args.eval_index).is_file():
        scenes = load_heldout(args.eval_data, args.eval_index, args.eval_scenes, cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = open_log(out, step)
        print(f"config: {cfg}\ntraining: {vars(args)}\ndevice: {device}, ranks: {world}, "
              f"parameters: {sum(p.numel() for p in model.parameters()):,}, scenes: {len(data)}, "
              f"held-out scenes: {len(scenes)}", flush=True)

    scores, stopped = None, 0
    bar, refresh = progress(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    it = batches(data, step, per_epoch, args, rank, world, pin_memory=device.type == "cuda")
    applied = torch.zeros((), dtype=torch.long, device=device)  # updates since start, counted on the device
    sums, since, tick, resumed_at = 0, step, time.time(), step
    stretch = []  # (scene indices, updated) of every step since the last log row
    with StopSignals() as stop:
        while step < args.steps and not stopped:
            lr = lr_at(step, args.lr, args.warmup, args.steps)
            *batch, drawn = next(it)
            loss, train_psnr, gnorm, updated = train_step(batch, lr)
            step += 1
            stopped = stop.agreed(group)
            applied += updated  # the same on every rank: the loss and the gradients are averaged first
            if rank != 0:
                continue
            stretch.append((drawn, updated))
            sums = sums + torch.stack([loss, train_psnr, gnorm, (~updated).float()])
            bar.update(1)
            if step == resumed_at + 1:
                bar.write(f"first step done {time.time() - started:.1f} s after start"
                          f"{memory_note(peak_memory(device))}")
            last = step == args.steps or stopped
            check = scenes and (step % args.eval_every == 0 or step == args.steps)
            if step % args.log_every == 0 or check or last:  # the host waits for the GPU only at these steps
                loss_, psnr_, gnorm_, skipped = (sums / (step - since)).tolist()
                samples_s = args.batch * world * (step - since) / (time.time() - tick)
                bar.set_postfix(loss=f"{loss_:.4f}", psnr=f"{psnr_:.2f}", lr=f"{lr:.2e}",
                                gnorm=f"{gnorm_:.2f}", skipped=f"{skipped:.0%}", samples_s=f"{samples_s:.1f}",
                                refresh=refresh)
                row = {"step": step, "elapsed_s": f"{elapsed + time.time() - started:.1f}", "lr": f"{lr:.4g}",
                       "loss": f"{loss_:.5f}", "train_psnr": f"{psnr_:.3f}", "grad_norm": f"{gnorm_:.4f}",
                       "skipped": round(skipped * (step - since)), "samples_s": f"{samples_s:.2f}",
                       "peak_gib": peak_memory(device)}
                if skipped > 0.5:  # the skip rule is the release's; a run that mostly skips must say so
                    bad = sorted({data.scenes[i] for ids, ok in stretch if not ok for i in ids.tolist()})
                    bar.write(f"warning: steps {since + 1}-{step}: {skipped:.0%} of the updates skipped (loss "
                              f"not finite, or a gradient spike); their batches drew {len(bad)} scenes: "
                              f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}")
                sums, since, stretch = 0, step, []
                if check:
                    checked = time.time()
                    scores = heldout(model, scenes, device, out / f"heldout_{step:07d}.png")
                    bar.write(f"step {step}: {heldout_line(scores)}; {time.time() - checked:.1f} s"
                              f"{memory_note(peak_memory(device))}")
                    row |= {f"heldout_{k}": f"{v:.3f}" for k, v in scores.items()}
                log.write(",".join(str(row.get(c, "")) for c in LOG_COLUMNS) + "\n")
                log.flush()
                tick = time.time()  # samples/s counts training time only
            if step % args.save_every == 0 or last:
                ckpt = {"model": model.state_dict(), "config": asdict(cfg), "optimizer": opt.state_dict(),
                        "step": step, "updates": updates + int(applied),
                        "elapsed": elapsed + time.time() - started, "args": vars(args)}
                saving = time.time()
                bar.write(f"saved {save_checkpoint(out, ckpt, args.keep)}")
                tick += time.time() - saving  # samples/s counts training time only
    bar.close()
    minutes, seconds = divmod(round(time.time() - started), 60)
    if stopped:
        print0(f"stopped by {signal.Signals(stopped).name} after step {step} of {args.steps}, saved; "
               f"the same command resumes there")
    nothing = not stopped and int(applied) == 0 and step > resumed_at
    if nothing:
        print0(f"learned nothing: all {step - resumed_at} updates of this run were skipped (the loss was "
               f"never finite, or every gradient spiked); the warnings above name the scenes")
    elif not stopped:
        print0(f"done: step {step} of {args.steps} in {minutes} min {seconds} s of wall-clock time"
               + (f"; {step - resumed_at - int(applied)} of its {step - resumed_at} updates skipped"
                  if int(applied) < step - resumed_at else ""))
        if scores:  # what a teacher needs to see: does it beat copying a photo, and does it use its camera?
            print0(f"{heldout_line(scores)}; {scores['psnr'] - scores['best_context_copy']:+.2f} dB over "
                   f"the better context view copied")
    if world > 1:
        torch.distributed.destroy_process_group()
    if stopped:
        raise SystemExit(128 + stopped)  # the shell's exit code for a process ended by that signal
    if nothing:
        raise SystemExit(1)


# -----------------------------------------------------------------------------
# Command line. Paper numbers are the defaults; --tiny swaps in the classroom preset.

# Training settings of each preset: the defaults of the command line, which any flag overrides.
# 224 and 518 are the paper's recipe (8 GPUs); 518 fine-tunes the 224 weights with a fresh schedule.
PRESETS = {224: dict(batch=16, steps=100_000, lr=4e-4, warmup=4000, perceptual=0.5, dinov2="download",
                     data="data/re10k/train/full_list.txt", out="runs/x224", save_every=4000, eval_every=4000,
                     log_every=100, workers=min(8, os.cpu_count()), keep_frames=False)}
PRESETS[518] = PRESETS[224] | dict(batch=6, steps=80_000, lr=4e-5, dinov2="none", out="runs/x518")
PRESETS["tiny"] = dict(batch=8, steps=3000, lr=1e-3, warmup=300, perceptual=0.0, dinov2="none",
                       data="data/synthetic/train/full_list.txt", out="runs/tiny", save_every=200,
                       eval_every=200, log_every=20, workers=0, keep_frames=True)


def budget_arg(text):
    if text == "auto" or 0 < float(text) <= 1:
        return text
    raise argparse.ArgumentTypeError(f"{text}: 'auto' or a share in (0, 1]")


def make_parser(description="Train UP-LVSM (see the docstring of l3d.py for commands)."):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--res", type=int, default=224, choices=[224, 518],
                    help="the paper's preset: 224 pre-training or 518 fine-tuning")
    ap.add_argument("--model", choices=["uplvsm", "ptlvsm", "lvsm"], default="uplvsm",
                    help="UP-LVSM; PT-LVSM, the release's baseline that is given the target cameras; or "
                         "LVSM's rung, PT-LVSM given every context camera too")
    ap.add_argument("--tiny", action="store_true",
                    help="the classroom preset: a tiny model on 32x32 crops of generated rooms, on a CPU")
    ap.add_argument("--data", help="full_list.txt of a processed training split")
    ap.add_argument("--out", help="run folder: checkpoints and held-out grids; rerunning resumes from it")
    ap.add_argument("--steps", type=int, help="training steps")
    ap.add_argument("--batch", type=int, help="samples per process (per GPU)")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--warmup", type=int, help="linear warm-up steps")
    ap.add_argument("--init", help="start from these weights only (an l3d or release checkpoint, or "
                    "x224 and x518 by name); optimizer and schedule start fresh. 'none': from scratch, "
                    "which --res 518 must be told")
    ap.add_argument("--dinov2", help="tokenizer init: 'download' (DINOv2 ViT-B/14 reg4, once, into the "
                    "cache), a local .pth, or 'none'")
    ap.add_argument("--perceptual", type=float, help="weight of the VGG-19 perceptual loss (0 turns it off)")
    ap.add_argument("--vgg", help="local imagenet-vgg-verydeep-19.mat (default: downloaded into the cache)")
    ap.add_argument("--save-every", type=int, help="checkpoint every this many steps")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept in --out")
    ap.add_argument("--log-every", type=int,
                    help="loss, PSNR, gradient norm and samples/s every this many steps")
    ap.add_argument("--eval-every", type=int, help="held-out PSNR and render grid every this many steps")
    ap.add_argument("--eval-data", help="full_list.txt of held-out scenes (default: test/ beside --data)")
    ap.add_argument("--eval-index", help="evaluation index of the held-out views "
                    "(default: evaluation_index.json beside --eval-data)")
    ap.add_argument("--eval-scenes", type=int, default=32, help="held-out scenes scored during training")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip; updates skipped above 4x")
    ap.add_argument("--workers", type=int, help="DataLoader worker processes per rank (0: the main process)")
    ap.add_argument("--keep-frames", action=argparse.BooleanOptionalAction,
                    help="keep decoded frames in memory (datasets that fit; with --workers 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU when there is one")
    ap.add_argument("--memory-budget", type=budget_arg, default="auto",
                    help="compiled runs: the share of each block's activations kept for backward, the rest "
                    "recomputed (1: keep all, the fastest). auto: 1 where the step fits in the GPU's free "
                    "memory, else 0.75 or 0.5, chosen at start and printed")
    ap.add_argument("--grad-checkpoint", action="store_true",
                    help="recompute every block whole in backward: the least memory, the slowest")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the blocks eagerly (they are compiled only on CUDA); without compilation "
                    "the paper's batches need --grad-checkpoint on an 80 GB GPU")
    return ap


def parse_args(argv=None, ap=None):
    """The command line, with the preset's settings where no flag gave one. ap: make_parser() or one
    built on it (bench.py's)."""
    ap = ap or make_parser()
    args = ap.parse_args(argv)
    if args.out is None and args.model != "uplvsm":
        args.out = PRESETS["tiny" if args.tiny else args.res]["out"] + "_" + args.model
    for key, value in PRESETS["tiny" if args.tiny else args.res].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; it names the run's folder (checkpoints, log.csv, held-out grids)")
    resuming = any(Path(args.out).glob("ckpt_*.pt"))
    if args.res == 518 and not (args.tiny or args.init or resuming):
        ap.error(f"--res 518 fine-tunes the 224 model, and with nothing in {args.out} to resume and no "
                 f"--init it would start from noise: pass the 224 weights (--init runs/x224/ckpt_0100000.pt, "
                 f"or --init x224 for the released ones), or --init none to mean it")
    for flag in ("batch", "steps", "save_every", "eval_every", "log_every"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be a positive number of "
                     f"{'samples' if flag == 'batch' else 'steps'}, not {getattr(args, flag)}")
    if args.init == "none":
        args.init = None
    args.eval_data = args.eval_data or str(Path(args.data).parent.parent / "test" / "full_list.txt")
    args.eval_index = args.eval_index or str(Path(args.eval_data).parent / "evaluation_index.json")
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        train(args)
    except (FileNotFoundError, ValueError, OSError) as e:  # the message names the file and the problem
        raise SystemExit(f"l3d.py: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("l3d.py: stopped by a second Ctrl-C, without saving") from None
