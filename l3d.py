"""
l3d: UP-LVSM in one file.

UP-LVSM renders novel views of a scene from two unposed photos with a plain transformer and no 3D
machinery: no poses in, no depth, no epipolar geometry. Paper: "The Less You Depend, The More You
Learn: Synthesizing Novel Views from Sparse, Unposed Images" (Wang, Ye, Qin, Li, Chen, Chen;
ICLR 2026; arXiv 2506.09885). This file holds the model, the loader for the authors' released
checkpoints, the loss, the data pipeline and the training loop; prepare.py makes datasets and
eval.py scores checkpoints.

Train (the paper's 224 pre-training, then the 518 fine-tuning):
    torchrun --nproc_per_node 8 l3d.py --res 224 --data data/re10k/train/full_list.txt
    torchrun --nproc_per_node 8 l3d.py --res 518 --init runs/x224/ckpt_0100000.pt --out runs/x518
One GPU, for debugging:
    python l3d.py --res 224 --batch 4 --data data/re10k/train/full_list.txt
A laptop CPU, for a class (generated scenes; about 3 minutes, then under 10):
    python prepare.py synthetic && python l3d.py --tiny
Render with the released weights:
    model = l3d.load_model("uplvsm_x224.pt", res=224)
    render, pose = model(ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy)
"""

import argparse
import json
import math
import os
import random
import time
import urllib.request
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

    @staticmethod
    def paper(res=224):
        return Config(image_size=res)

    @staticmethod
    def tiny():
        # Trains on a laptop CPU in minutes: 32 x 32 crops of generated rooms, 16 tokens per view.
        # Fewer latents and pixels buy steps: at 64 x 64 with 64 latents a step costs 3x more, and in
        # a 10-minute budget the extra steps are worth more than the extra resolution.
        return Config(image_size=32, patch_size=8, dim=128, head_dim=32, n_encoder=2, n_estimator=1,
                      n_decoder=3, n_latents=32, tok_depth=2, tok_heads=4, tok_registers=2, tok_pos_grid=4)


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
    """Softmax attention, q, k, v [b, heads, n, head_dim]; the one place to swap kernels."""
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

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)  # [b, n, 3, heads, head_dim]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, head_dim]
        x = attention(self.q_norm(q), self.k_norm(k), v)  # [b, heads, n, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # [b, heads, n, head_dim] -> [b, n, d]


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

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
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
# UP-LVSM


class UPLVSM(nn.Module):
    """Two unposed context views + target images -> target renders and target poses.

    The target image is only read by the pose estimator, which squeezes it into 7 numbers; the
    render comes from the scene latents and the rays of that estimated camera. No pose is ever
    given: the first context view is the world frame, marked by the rays of an identity camera.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d, p, hd = cfg.dim, cfg.patch_size, cfg.head_dim
        self.tokenizer = ImageTokenizer(cfg)
        self.canonical_rays = nn.Linear(6 * p * p, d, bias=False)
        self.target_rays = nn.Linear(6 * p * p, d, bias=False)
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, d))
        self.encoder = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_encoder))
        self.estimator = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_estimator))
        self.translation_head = MLP(d, d // 2, 3, bias=True)
        self.rotation_head = MLP(d, d // 2, 4, bias=True)
        self.decoder_norm_in = nn.LayerNorm(d, bias=False)
        self.decoder = nn.ModuleList(Block(d, hd) for _ in range(cfg.n_decoder))
        self.decoder_norm_out = nn.LayerNorm(d, bias=False)
        self.to_pixels = nn.Linear(d, p * p * 3, bias=False)
        self.grad_checkpoint = False
        self.init_weights()

    def init_weights(self):
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
        # deeper encoder and decoder blocks start smaller so the residual stream grows slowly
        for stack in (self.encoder, self.decoder):
            for i, block in enumerate(stack):
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * (i + 1)))
        nn.init.trunc_normal_(self.latents, std=0.02)

    def run(self, blocks, x):
        for block in blocks:
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def encode(self, ctx_images, ctx_fxfycxcy):
        """Context views [b, v, 3, R, R] and their intrinsics [b, v, 4] -> scene latents [b, L, d]."""
        b, v, _, h, w = ctx_images.shape
        tokens = self.tokenizer(ctx_images)  # [b, v, n, d]
        n, d = tokens.shape[2:]
        identity = torch.eye(4, device=ctx_images.device).expand(b, 1, 4, 4)
        marker = self.canonical_rays(patchify(plucker_rays(identity, ctx_fxfycxcy[:, :1], h, w),
                                              self.config.patch_size))  # [b, 1, n, d]
        tokens = torch.cat([tokens[:, :1] + marker, tokens[:, 1:]], 1)
        x = torch.cat([self.latents.expand(b, -1, -1), tokens.reshape(b, v * n, d)], 1)  # [b, L + v*n, d]
        return self.run(self.encoder, x)[:, :self.config.n_latents]

    def estimate_pose(self, latents, tgt_images):
        """Latents [b, L, d] and target images [b, v, 3, R, R] -> pose encodings [b, v, 7]."""
        b, v = tgt_images.shape[:2]
        tokens = self.tokenizer(tgt_images).flatten(0, 1)  # [b*v, n, d]
        n = tokens.shape[1]
        x = torch.cat([tokens, latents.repeat_interleave(v, 0)], 1)  # [b*v, n + L, d]
        x = self.run(self.estimator, x)[:, :n].mean(1)  # [b*v, d]
        t, q = self.translation_head(x), self.rotation_head(x)
        q32 = q.float()
        q = (q32 / q32.norm(dim=-1, keepdim=True).clamp(min=1e-3)).to(q.dtype)
        return torch.cat([t, q], -1).reshape(b, v, 7)  # [b*v, 7] -> [b, v, 7]

    def decode(self, latents, c2w, fxfycxcy):
        """Latents [b, L, d], cameras c2w [b, v, 4, 4] and intrinsics [b, v, 4] -> images [b, v, 3, R, R]."""
        b, v = c2w.shape[:2]
        R, p = self.config.image_size, self.config.patch_size
        x = self.target_rays(patchify(plucker_rays(c2w, fxfycxcy, R, R), p)).flatten(0, 1)  # [b*v, n, d]
        n = x.shape[1]
        x = self.decoder_norm_in(torch.cat([x, latents.repeat_interleave(v, 0)], 1))  # [b*v, n + L, d]
        x = self.run(self.decoder, x)[:, :n]
        rgb = torch.sigmoid(self.to_pixels(self.decoder_norm_out(x)))  # [b*v, n, p*p*3]
        return unpatchify(rgb.reshape(b, v, n, -1), p, R, R)  # [b*v, n, p*p*3] -> [b, v, 3, R, R]

    def forward(self, ctx_images, ctx_fxfycxcy, tgt_images, tgt_fxfycxcy):
        R = self.config.image_size
        for name, x in (("ctx_images", ctx_images), ("tgt_images", tgt_images)):
            if x.ndim != 5 or tuple(x.shape[2:]) != (3, R, R):
                raise ValueError(f"{name} must be [b, v, 3, {R}, {R}] for this model, got {list(x.shape)}")
        latents = self.encode(ctx_images, ctx_fxfycxcy)
        pose = self.estimate_pose(latents, tgt_images)
        render = self.decode(latents, pose_to_c2w(pose.float()), tgt_fxfycxcy)
        return render, pose


# -----------------------------------------------------------------------------
# Loading weights: the authors' released checkpoints, l3d's own, and DINOv2's

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
CACHE_DIR = Path(os.environ.get("L3D_CACHE", Path.home() / ".cache" / "l3d"))

# release name -> l3d name, per block; the release's LVSM blocks call qkv "to_qkv" and proj "fc"
DINO_BLOCK_NAMES = {n: n for n in [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight",
    "attn.k_norm.weight", "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
    "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]}
LVSM_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "attn.to_qkv.weight": "attn.qkv.weight",
    "attn.q_norm.weight": "attn.q_norm.weight",
    "attn.k_norm.weight": "attn.k_norm.weight",
    "attn.fc.weight": "attn.proj.weight",
    "norm2.weight": "norm2.weight",
    "mlp.mlp.0.weight": "mlp.fc1.weight",
    "mlp.mlp.2.weight": "mlp.fc2.weight",
}
DINO_TOP_NAMES = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "register_tokens": "register_tokens",
    "patch_embed.proj.weight": "patch_embed.weight",
    "patch_embed.proj.bias": "patch_embed.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
RELEASE_TOKENIZER = "image_tokenizer.1.dino_vit."


def dinov2_names(cfg):
    """DINOv2 checkpoint name -> name inside our ImageTokenizer."""
    names = dict(DINO_TOP_NAMES)
    for i in range(cfg.tok_depth):
        names.update({f"blocks.{i}.{a}": f"blocks.{i}.{b}" for a, b in DINO_BLOCK_NAMES.items()})
    return names


def release_names(cfg):
    """Every tensor of the released UP-LVSM checkpoints: release name -> l3d name."""
    names = {RELEASE_TOKENIZER + a: "tokenizer." + b for a, b in dinov2_names(cfg).items()}
    names.update({
        "n_light_field_latent": "latents",
        "canonical_pose_tokenizer.1.weight": "canonical_rays.weight",
        "target_pose_tokenizer.1.weight": "target_rays.weight",
        "transformer_input_layernorm_decoder.weight": "decoder_norm_in.weight",
        "image_token_decoder.0.weight": "decoder_norm_out.weight",
        "image_token_decoder.1.weight": "to_pixels.weight",
    })
    for head, ours in (("absT_head", "translation_head"), ("quaR_head", "rotation_head")):
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            names[f"estimator.{head}.{part}"] = f"{ours}.{part}"
    for stack, ours, depth in (("transformer_encoder", "encoder", cfg.n_encoder),
                               ("estimator.transformer_estimator", "estimator", cfg.n_estimator),
                               ("transformer_decoder", "decoder", cfg.n_decoder)):
        for i in range(depth):
            names.update({f"{stack}.{i}.{a}": f"{ours}.{i}.{b}" for a, b in LVSM_BLOCK_NAMES.items()})
    return names


def config_from_release(sd, res, source):
    """The architecture of a released checkpoint, read from its tensor shapes alone."""
    def shape(name):
        if name not in sd:
            raise KeyError(f"{source}: missing tensor '{name}', so this is not an UP-LVSM release checkpoint")
        return sd[name].shape

    def depth(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    n_latents, dim = shape("n_light_field_latent")
    tok_dim = shape(RELEASE_TOKENIZER + "cls_token")[-1]
    return Config(
        image_size=res,
        patch_size=shape(RELEASE_TOKENIZER + "patch_embed.proj.weight")[-1],
        dim=dim,
        head_dim=shape("transformer_encoder.0.attn.q_norm.weight")[0],
        n_encoder=depth("transformer_encoder."),
        n_estimator=depth("estimator.transformer_estimator."),
        n_decoder=depth("transformer_decoder."),
        n_latents=n_latents,
        tok_depth=depth(RELEASE_TOKENIZER + "blocks."),
        tok_heads=tok_dim // shape(RELEASE_TOKENIZER + "blocks.0.attn.q_norm.weight")[0],
        tok_registers=shape(RELEASE_TOKENIZER + "register_tokens")[1],
        tok_pos_grid=math.isqrt(shape(RELEASE_TOKENIZER + "pos_embed")[1] - 1),
    )


def copy_weights(module, sd, names, source, ignore_prefixes=()):
    """Copy sd[theirs] into module[ours] for every (theirs, ours) in names, checking every shape.

    Tensors of sd that are neither named nor under ignore_prefixes are an error: they mean the
    file holds an architecture we would silently drop. Returns the ignored names.
    """
    ours = module.state_dict()
    missing = [a for a in names if a not in sd]
    if missing:
        raise KeyError(f"{source}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    unknown = [k for k in sd if k not in names and not k.startswith(tuple(ignore_prefixes))]
    if unknown:
        raise KeyError(f"{source}: {len(unknown)} tensor(s) this model has no place for: {', '.join(unknown[:8])}")
    for theirs, mine in names.items():
        if tuple(sd[theirs].shape) != tuple(ours[mine].shape):
            raise ValueError(f"{source}: tensor '{theirs}' has shape {list(sd[theirs].shape)}, "
                             f"the model expects {list(ours[mine].shape)} for '{mine}'")
    with torch.no_grad():
        for theirs, mine in names.items():
            ours[mine].copy_(sd[theirs])
    return [k for k in sd if k not in names]


def load_model(ckpt, res=None):
    """A released UP-LVSM checkpoint or an l3d one (a path or a loaded dict) -> UPLVSM on CPU, eval mode.

    Release files record no image size: pass res (224 or 518). l3d checkpoints record their Config;
    res, if given, overrides the image size (the tokenizer resizes its position embeddings).
    """
    source = str(ckpt) if isinstance(ckpt, (str, Path)) else "checkpoint dict"
    if isinstance(ckpt, (str, Path)):
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"{ckpt}: no such checkpoint file")
        try:  # weights_only: a checkpoint from the internet must not run code when it loads
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{source}: not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
                             f"If the file is whole but holds Python objects besides tensors and you trust its source, "
                             f"pass load_model(torch.load(path, weights_only=False), res)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{source}: expected a dict with a 'model' state dict, as the release and l3d save")
    sd = ckpt["model"]
    if "config" in ckpt:
        cfg = Config(**ckpt["config"])
        cfg = replace(cfg, image_size=res) if res else cfg
        model = UPLVSM(cfg)
        copy_weights(model, sd, {k: k for k in model.state_dict()}, source)
    else:
        if res is None:
            raise ValueError(f"{source}: release checkpoints do not record their image size; "
                             f"pass res=224 or res=518 (eval.py: --res 224 or --res 518)")
        cfg = config_from_release(sd, res, source)
        model = UPLVSM(cfg)
        ignored = copy_weights(model, sd, release_names(cfg), source, ignore_prefixes=("loss_computer.",))
        if ignored:
            print(f"{source}: ignored {len(ignored)} tensor(s) under loss_computer.* (the training loss's frozen VGG-19)")
    return model.eval()


def download(url, dest):
    """Download url to dest once (through a temporary file, so a killed download leaves nothing)."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0), unit="B", unit_scale=True,
                     desc=f"downloading {dest.name}") as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} to {dest} ({e}); download it by hand and put it there "
                           f"(or point L3D_CACHE at a folder that holds it)") from e
    os.replace(tmp, dest)
    return dest


def load_dinov2(model, path=None, url=DINOV2_URL):
    """Initialise the image tokenizer from DINOv2 ViT-B/14 reg4 (a local file, or downloaded once into CACHE_DIR).

    The QK-norm weights are new to DINOv2's blocks and stay at 1; DINOv2's mask token is unused.
    """
    path = Path(path) if path else download(url, CACHE_DIR / url.rsplit("/", 1)[-1])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DINOv2 checkpoint")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    names = {a: b for a, b in dinov2_names(model.config).items() if not b.endswith(("q_norm.weight", "k_norm.weight"))}
    copy_weights(model.tokenizer, sd, names, str(path), ignore_prefixes=("mask_token",))


# -----------------------------------------------------------------------------
# Loss: MSE + the LVSM perceptual loss (VGG-19 with average pooling, MatConvNet weights)

VGG19_URL = "https://www.vlfeat.org/matconvnet/models/imagenet-vgg-verydeep-19.mat"
# conv layers of VGG-19 up to relu5_2, grouped into the five slices whose outputs the loss compares
VGG19_SLICES = [["conv1_1", "conv1_2"], ["pool", "conv2_1", "conv2_2"], ["pool", "conv3_1", "conv3_2"],
                ["conv3_3", "conv3_4", "pool", "conv4_1", "conv4_2"], ["conv4_3", "conv4_4", "pool", "conv5_1", "conv5_2"]]
VGG19_WEIGHTS = [1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5]  # LVSM's per-slice balance


class PerceptualLoss(nn.Module):
    """LVSM's perceptual loss. Frozen; max-pools are 2x2 average pools, which give smoother gradients."""

    def __init__(self, path=None, url=VGG19_URL):
        super().__init__()
        path = Path(path) if path else download(url, CACHE_DIR / url.rsplit("/", 1)[-1])
        convs = read_matconvnet_vgg(path)
        self.slices = nn.ModuleList()
        for names in VGG19_SLICES:
            layers = []
            for name in names:
                if name == "pool":
                    layers.append(nn.AvgPool2d(2, 2))
                else:
                    layers += [convs[name], nn.ReLU()]
            self.slices.append(nn.Sequential(*layers))
        self.register_buffer("mean", torch.tensor([123.68, 116.779, 103.939]).reshape(1, 3, 1, 1))  # [3] -> [1, 3, 1, 1]
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
            w = torch.from_numpy(np.ascontiguousarray(w)).float().permute(3, 2, 0, 1)  # [h, w, in, out] -> [out, in, h, w]
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(torch.from_numpy(np.asarray(b)).float().reshape(-1))  # [out, 1] -> [out]
            convs[name] = conv
    if missing := sorted(wanted - set(convs)):
        raise ValueError(f"{path}: VGG-19 file lacks layers {missing}")
    return convs


# -----------------------------------------------------------------------------
# Data: the processed RealEstate10K layout (LVSM's and the release's) and the view sampling of the paper


def read_list(list_path):
    """full_list.txt -> metadata json paths (relative entries are relative to the list's folder)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: no such list file (a full_list.txt from prepare.py)")
    paths = [Path(line.strip()) for line in list_path.read_text().splitlines() if line.strip()]
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


def load_view(path, fxfycxcy, res, patch):
    """One frame -> (image [3, R, R] in [0, 1], fxfycxcy [4]) preprocessed as the release does.

    Resize so the height is R and the width keeps the aspect ratio rounded to a multiple of the
    patch (Lanczos), centre-crop R x R, and move the intrinsics with the pixels.
    """
    with Image.open(path) as img:
        img = img.convert("RGB")
    w0, h0 = img.size
    w = int(round(int(res / h0 * w0) / patch) * patch)
    if w < res:
        raise ValueError(f"{path}: {w0}x{h0} is taller than wide; l3d crops landscape frames to squares")
    left = (w - res) // 2
    img = img.resize((w, res), Image.LANCZOS).crop((left, 0, left + res, res))
    image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0  # [h, w, 3] -> [3, h, w]
    fx, fy, cx, cy = (float(x) for x in fxfycxcy)
    sx, sy = w / w0, res / h0
    return image, torch.tensor([fx * sx, fy * sy, cx * sx - left, cy * sy])


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
    """Training samples: 2 context views and n_targets targets drawn among the 8 chosen views.

    Items are (scene index, sample seed) pairs from epoch_samples, so a sample depends on nothing
    but its seed: a resumed run sees exactly the batches the uninterrupted run would have.
    A scene that is too short or unreadable is skipped with a warning naming it, and another scene
    is drawn in its place: one bad scene never stops a run.
    """

    def __init__(self, list_path, res, patch, n_targets=6):
        self.scenes = read_list(list_path)
        if not self.scenes:
            raise ValueError(f"{list_path}: lists no scenes")
        self.res, self.patch, self.n_targets = res, patch, n_targets

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, item):
        i, seed = item
        rng = random.Random(seed)
        for _ in range(100):
            try:
                frames = read_scene(self.scenes[i])["frames"]
                views = sample_views(len(frames), rng)
                if views is None:
                    raise ValueError(f"only {len(frames)} frames, fewer than the 27 the view sampling needs")
                images, fxfycxcy = load_views(frames, views, self.res, self.patch)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                warnings.warn(f"skipping scene {self.scenes[i]}: {e}")
                i = rng.randrange(len(self.scenes))
                continue
            tgt = rng.sample(range(len(views)), self.n_targets)  # targets may include the context views
            return images[:2], fxfycxcy[:2], images[tgt], fxfycxcy[tgt]
        raise RuntimeError(f"100 scenes in a row were unusable; check the dataset (last: {self.scenes[i]})")


def epoch_samples(n_scenes, epoch, rank, world, seed):
    """One rank's (scene index, sample seed) pairs for an epoch: a fresh shuffle every epoch, cut
    into equal disjoint shares so that every rank trains on different scenes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_scenes, generator=g)
    seeds = torch.randint(2 ** 62, (n_scenes,), generator=g)
    share = n_scenes // world
    mine = slice(rank * share, (rank + 1) * share)
    return list(zip(order[mine].tolist(), seeds[mine].tolist()))


def read_index(index_path):
    """An evaluation index json -> {scene: {"context": [i, j], "target": [a, b, c]} or None}."""
    try:
        index = json.loads(Path(index_path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{index_path}: unreadable evaluation index ({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: expected a json object {{scene: views}}, got a {type(index).__name__}")
    bad = [k for k, v in index.items() if v is not None and not (isinstance(v, dict) and v.get("context") and v.get("target"))]
    if bad:
        raise ValueError(f"{index_path}: expected {{scene: {{'context': [...], 'target': [...]}} or null}}; bad entries: {bad[:5]}")
    return index


def load_index_views(list_path, index_path):
    """The held-out views of an evaluation index: [(scene name, frames, context, target)] for scenes on disk."""
    index = read_index(index_path)
    out = []
    for meta in read_list(list_path):
        scene = read_scene(meta)
        views = index.get(scene["scene_name"])
        if views and max(views["context"] + views["target"]) < len(scene["frames"]):
            out.append((scene["scene_name"], scene["frames"], views["context"], views["target"]))
    return out


# -----------------------------------------------------------------------------
# Training: AdamW, warm-up then cosine, the release's skip rules, DDP, resumable checkpoints


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def lr_at(step, peak, warmup, total):
    """Learning rate of optimizer step `step` (0-based): linear warm-up from 0, then cosine to 0."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay=0.05, fused=False):
    """AdamW; matrices and conv kernels decay, vectors (norms, biases, LayerScale) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def clip_or_skip(params, clip=1.0, skip_factor=4.0):
    """Zero non-finite gradients, clip the total norm at `clip`; True when the update should be
    skipped because the pre-clip norm exceeded skip_factor * clip (the release's guard against spikes)."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return norm.item() > skip_factor * clip, norm.item()


def write_atomic(path, text):
    """Write text through a temporary file and a rename, so that readers see the old file or the new
    one, never half of one. A file that already holds this text is left untouched: reruns change nothing."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(out, state, keep):
    """Write out/ckpt_<step>.pt through a temporary file and a rename; keep the newest `keep`."""
    path = Path(out) / f"ckpt_{state['step']:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(Path(out).glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(out):
    """The newest readable checkpoint in out, or None."""
    for path in sorted(Path(out).glob("ckpt_*.pt"), reverse=True):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut short by a full disk; the rename makes this rare
            warnings.warn(f"{path}: unreadable checkpoint ({e}); trying an older one")
    return None


def psnr(pred, target):
    """Mean PSNR in dB of images in [0, 1], one MSE per image."""
    mse = (pred.float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)  # [n, 3, h, w] -> [n, 3*h*w] -> [n]
    return (-10 * torch.log10(mse.clamp(min=1e-10))).mean().item()


def to_pil(image):
    """An image [3, h, w] in [0, 1] -> an 8-bit RGB PIL image."""
    return Image.fromarray(image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())  # [3, h, w] -> [h, w, 3]


@torch.no_grad()
def heldout(model, views, cfg, device, out_png=None):
    """PSNR of the model on held-out indexed views, beside two baselines a model must beat: the pixel
    mean of the two context views, and the better of the two context views copied (per target)."""
    model.eval()
    scores = {"psnr": [], "mean_of_context": [], "best_context_copy": []}
    rows = []
    for name, frames, ctx, tgt in views:
        ci, ck = load_views(frames, ctx, cfg.image_size, cfg.patch_size)
        ti, tk = load_views(frames, tgt, cfg.image_size, cfg.patch_size)
        render, _ = model(ci[None].to(device), ck[None].to(device), ti[None].to(device), tk[None].to(device))
        render = render[0].float().cpu()
        for j in range(len(tgt)):
            scores["psnr"].append(psnr(render[j:j + 1], ti[j:j + 1]))
            scores["mean_of_context"].append(psnr(ci.mean(0, keepdim=True), ti[j:j + 1]))
            scores["best_context_copy"].append(max(psnr(ci[k:k + 1], ti[j:j + 1]) for k in range(2)))
        if len(rows) < 4:
            rows.append(torch.cat([ci[0], ci[1], ti[0], render[0]], 2))  # context | context | target | render
    if out_png and rows:
        to_pil(torch.cat(rows, 1)).save(out_png)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def model_flops(cfg, v_ctx=2, v_tgt=6):
    """Forward FLOPs of one training sample (matmuls only, 2 per multiply-add)."""
    d, n, L = cfg.dim, (cfg.image_size // cfg.patch_size) ** 2, cfg.n_latents

    def blocks(depth, tokens, seqs=1):  # qkv + proj + MLP = 24 d^2 per token, attention 4 n d per token
        return seqs * depth * (24 * d * d * tokens + 4 * tokens * tokens * d)

    tok = 2 * 3 * cfg.patch_size ** 2 * d * n + blocks(cfg.tok_depth, 1 + cfg.tok_registers + n)
    return ((v_ctx + v_tgt) * tok + blocks(cfg.n_encoder, L + v_ctx * n)
            + blocks(cfg.n_estimator, n + L, v_tgt) + blocks(cfg.n_decoder, n + L, v_tgt)
            + 2 * 6 * cfg.patch_size ** 2 * d * n * (1 + v_tgt) + 2 * d * 3 * cfg.patch_size ** 2 * n * v_tgt)


def train(args):
    ddp = "RANK" in os.environ
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    cfg = Config.tiny() if args.tiny else Config.paper(args.res)
    model = UPLVSM(cfg)
    out = Path(args.out)
    resumed = latest_checkpoint(out) if out.is_dir() else None
    if resumed:
        path, ckpt = resumed
        model.load_state_dict(ckpt["model"])
        print0(f"resuming from {path} at step {ckpt['step']}")
    elif args.init:
        init = load_model(args.init, res=cfg.image_size)
        if replace(init.config, image_size=cfg.image_size) != cfg:
            raise ValueError(f"{args.init}: its architecture {init.config} differs from this run's {cfg}")
        model.load_state_dict(init.state_dict())
        print0(f"initialised from {args.init} (weights only: optimizer and schedule start fresh)")
    elif args.dinov2 != "none":
        load_dinov2(model, None if args.dinov2 == "download" else args.dinov2)
        print0("image tokenizer initialised from DINOv2 ViT-B/14 reg4")
    model.to(device)
    model.grad_checkpoint = args.grad_checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, args.lr, fused=cuda)
    step, updates = 0, 0
    if resumed:
        opt.load_state_dict(ckpt["optimizer"])
        step, updates = ckpt["step"], ckpt["updates"]
        torch.set_rng_state(ckpt["rng"]["torch"])  # the data order does not need these (see SceneDataset)
        random.setstate(ckpt["rng"]["python"])
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if ddp else model
    if args.compile and cuda:
        train_model = torch.compile(train_model)
    perceptual = PerceptualLoss(args.vgg).to(device) if args.perceptual > 0 else None

    data = SceneDataset(args.data, cfg.image_size, cfg.patch_size)
    per_epoch = len(data) // world // args.batch
    if per_epoch == 0:
        raise ValueError(f"{args.data}: {len(data)} scenes over {world} rank(s) make no batch of {args.batch}")
    heldout_views = []
    if args.eval_index and Path(args.eval_index).is_file():
        heldout_views = load_index_views(args.eval_data, args.eval_index)[:args.eval_scenes]

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"config: {cfg}\ntraining: {vars(args)}\ndevice: {device}, ranks: {world}, "
              f"parameters: {sum(p.numel() for p in params):,}, scenes: {len(data)}", flush=True)

    def state():
        return {"model": model.state_dict(), "config": asdict(cfg), "optimizer": opt.state_dict(),
                "step": step, "updates": updates, "args": vars(args),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    def batches(step):
        epoch, skip = divmod(step, per_epoch)
        while True:
            samples = epoch_samples(len(data), epoch, rank, world, args.seed)[skip * args.batch:]
            yield from torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=samples, drop_last=True,
                                                   num_workers=args.workers, pin_memory=cuda)
            epoch, skip = epoch + 1, 0

    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    it = batches(step)
    tick = time.time()
    while step < args.steps:
        ctx, ctx_k, tgt, tgt_k = (x.to(device, non_blocking=True) for x in next(it))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            render, _ = train_model(ctx, ctx_k, tgt, tgt_k)
            render, tgt = render.float().flatten(0, 1), tgt.flatten(0, 1)  # [b, v, 3, h, w] -> [b*v, 3, h, w]
            mse = F.mse_loss(render, tgt)
            loss = mse + args.perceptual * perceptual(render, tgt) if perceptual else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        mean_loss = loss.detach().clone()
        if ddp:
            torch.distributed.all_reduce(mean_loss, op=torch.distributed.ReduceOp.AVG)
        skip, gnorm = clip_or_skip(params, args.clip)
        if not skip and torch.isfinite(mean_loss):
            opt.step()
            updates += 1
        step += 1
        if rank == 0:
            dt, tick = time.time() - tick, time.time()
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss.item():.4f}", psnr=f"{-10 * math.log10(max(mse.item(), 1e-10)):.2f}",
                            lr=f"{opt.param_groups[0]['lr']:.2e}", gnorm=f"{gnorm:.2f}",
                            samples_s=f"{args.batch * world / dt:.1f}")
            if heldout_views and (step % args.eval_every == 0 or step == args.steps):
                scores = heldout(model, heldout_views, cfg, device, out / f"heldout_{step:07d}.png")
                bar.write(f"step {step}: held-out PSNR {scores['psnr']:.2f} dB (mean of context "
                          f"{scores['mean_of_context']:.2f}, best context copy {scores['best_context_copy']:.2f})")
            if step % args.save_every == 0 or step == args.steps:
                bar.write(f"saved {save_checkpoint(out, state(), args.keep)}")
    bar.close()
    if ddp:
        torch.distributed.destroy_process_group()


def bench(args):
    """Forward + backward + AdamW steps on random inputs: ms/step, samples/s, peak memory, MFU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = Config.tiny() if args.tiny else Config.paper(args.res)
    model = UPLVSM(cfg).to(device).train()
    model.grad_checkpoint = args.grad_checkpoint
    run = torch.compile(model) if args.compile and cuda else model
    opt = make_optimizer(model, args.lr, fused=cuda)
    R, b = cfg.image_size, args.batch
    k = torch.tensor([R * 1.0, R * 1.0, R / 2, R / 2], device=device)
    ctx, tgt = torch.rand(b, 2, 3, R, R, device=device), torch.rand(b, 6, 3, R, R, device=device)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            render, _ = run(ctx, k.expand(b, 2, 4), tgt, k.expand(b, 6, 4))
            loss = F.mse_loss(render.float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: compilation, allocator, kernel selection
        one_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.bench_steps):
        one_step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.time() - start) / args.bench_steps
    line = (f"bench: res {R}, batch {b}, compile {args.compile and cuda}, grad checkpoint {args.grad_checkpoint}, "
            f"{device}: {dt * 1000:.1f} ms/step, {b / dt:.1f} samples/s")
    if cuda:
        achieved = 3 * model_flops(cfg) * b / dt  # backward costs twice the forward
        line += (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB, "
                 f"MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:.0f} TFLOP/s")
    else:
        import resource
        line += f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"
    print(line)


# -----------------------------------------------------------------------------
# Command line. Paper numbers are the defaults; --tiny swaps in the classroom preset.

PRESETS = {
    224: dict(batch=16, steps=100_000, lr=4e-4, warmup=4000, out="runs/x224", dinov2="download",
              data="data/re10k/train/full_list.txt", perceptual=0.5, save_every=4000, eval_every=4000),
    518: dict(batch=6, steps=80_000, lr=4e-5, warmup=4000, out="runs/x518", dinov2="none",
              data="data/re10k/train/full_list.txt", perceptual=0.5, save_every=4000, eval_every=4000),
    # tiny: 1800 steps take 7-8 minutes on a 2-core CPU, leaving room under 10 for a slower day
    "tiny": dict(batch=8, steps=1800, lr=1e-3, warmup=100, out="runs/tiny", dinov2="none",
                 data="data/synthetic/train/full_list.txt", perceptual=0.0, save_every=200, eval_every=200),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train UP-LVSM (see the docstring of l3d.py for commands).")
    ap.add_argument("--res", type=int, default=224, choices=[224, 518], help="the paper config: 224 pre-training or 518 fine-tuning")
    ap.add_argument("--tiny", action="store_true", help="tiny model on 32x32 crops of generated rooms: trains on a CPU in under 10 minutes")
    ap.add_argument("--data", help="full_list.txt of a processed training split (default: per preset)")
    ap.add_argument("--out", help="run directory: checkpoints, held-out grids; rerunning resumes from it")
    ap.add_argument("--steps", type=int, help="optimizer steps (224: 100k, 518: 80k)")
    ap.add_argument("--batch", type=int, help="samples per GPU/process (224: 16, 518: 6)")
    ap.add_argument("--lr", type=float, help="peak learning rate (224: 4e-4, 518: 4e-5)")
    ap.add_argument("--warmup", type=int, help="linear warm-up steps (4000)")
    ap.add_argument("--init", help="start from these weights only (an l3d or release checkpoint); optimizer and schedule fresh")
    ap.add_argument("--dinov2", help="tokenizer init: 'download' (DINOv2 ViT-B/14 reg4 into the cache), a local .pth, or 'none'")
    ap.add_argument("--perceptual", type=float, help="weight of the VGG-19 perceptual loss (0.5; 0 turns it off)")
    ap.add_argument("--vgg", help="local imagenet-vgg-verydeep-19.mat (default: downloaded once into the cache)")
    ap.add_argument("--save_every", type=int, help="checkpoint every this many steps (4000)")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept in --out")
    ap.add_argument("--eval_every", type=int, help="held-out PSNR and render grid every this many steps (4000)")
    ap.add_argument("--eval_data", help="full_list.txt of held-out scenes (default: test/ beside --data)")
    ap.add_argument("--eval_index", help="evaluation index of held-out views (default: evaluation_index.json in that test/)")
    ap.add_argument("--eval_scenes", type=int, default=32, help="held-out scenes scored during training")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm; updates are skipped above 4x this")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 1,
                    help="DataLoader worker processes per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad_checkpoint", action="store_true", help="recompute each block in backward: less memory, ~30%% slower")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile the model (CUDA only)")
    ap.add_argument("--bench", action="store_true", help="time training steps on random inputs and exit")
    ap.add_argument("--bench_steps", type=int, default=10)
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator bf16 peak for MFU (H100 SXM: 989)")
    args = ap.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else args.res].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    test_dir = Path(args.data).parent.parent / "test"
    args.eval_data = args.eval_data or str(test_dir / "full_list.txt")
    args.eval_index = args.eval_index or str(test_dir / "evaluation_index.json")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.bench:
        bench(args)
    else:
        train(args)
