"""
eval.py: score UP-LVSM checkpoints with the paper's protocol (PSNR, SSIM, LPIPS).

For every scene of an evaluation index that is on disk, the two context views go in (in index
order) and each target view is rendered from the camera the model estimates from that target
image; the render is scored against the target. Works with the authors' released checkpoints
and with l3d's own. A PT-LVSM checkpoint is given the target cameras instead, normalised over
the scene's indexed views as the release does; an LVSM one (l3d.py --model lvsm) every camera.
Any index in the official format works, the release's extra ones too (extrapolation.json,
overlap_small/medium/large.json; their "overlap" numbers are ignored).

One process (the GPU if there is one, else the CPU):
    python eval.py --ckpt uplvsm_x224.pt --res 224 --data data/re10k/test/full_list.txt \
        --index evaluation_index_re10k.json --out runs/eval_x224
8 GPUs (scenes split across processes; the files come out the same as with one):
    torchrun --nproc_per_node 8 eval.py --ckpt uplvsm_x518.pt --res 518 \
        --data data/re10k/test/full_list.txt --index evaluation_index_re10k.json --out runs/eval_x518
The released weights by name (downloaded once into the cache; they know their image size):
    python eval.py --ckpt x224 --data data/re10k/test/full_list.txt --index evaluation_index_re10k.json \
        --out runs/eval_x224
How much a model leans on the cameras it is given (the paper's appendix on pose noise): Gaussian
noise of scale SIGMA on every given camera's 7-number pose encoding, the same on every rerun.
UP-LVSM is given no camera, so its scores do not move:
    python eval.py --ckpt runs/tiny_lvsm/ckpt_0003000.pt --data data/synthetic/test/full_list.txt \
        --index data/synthetic/test/evaluation_index.json --out runs/tiny_lvsm/noise_0.05 --no-lpips \
        --pose-noise 0.05
Two photos of your own: a fly-through from the first camera to the second (animated WebP, contact
sheet, cameras.json in --out):
    python eval.py --photos kitchen_1.jpg kitchen_2.jpg --ckpt x224 --out runs/kitchen
l3d checkpoints record their image size, so --res can be left out:
    python eval.py --ckpt runs/tiny/ckpt_0003000.pt --data data/synthetic/test/full_list.txt \
        --index data/synthetic/test/evaluation_index.json --out runs/tiny/eval --no-lpips

What lands in --out:
    images.csv    scene,view,position,psnr,ssim,lpips,copy_psnr,mean_context_psnr,camera_worth_db,
                  pose_rotation_error_deg,pose_translation_error_deg,transfer_psnr: one row per target
                  image (view: its frame number; position: where it lies between the context frames,
                  0 at the first, 1 at the second)
    metrics.csv   scene,psnr,...   one row per scene: means over its targets
    cameras.csv   scene,view,e00..e23,g00..g23: the relative camera the model estimated for each target
                  (P0^-1 Pt, 3x4 row by row) and the true one (C0^-1 Ct), which the linear probe reads
    summary.json  means over all target images (images_averaged: how many each mean has), the
                  linear probe, the means at each position between the context views (by_position),
                  counts of scenes scored (scored_now: by the last run) and of index entries skipped
    renders/      with --save-images and --video: context strip, target | render pairs, a video
Beyond the paper's metrics, measures that a model rendering one blurry image per scene cannot pass:
    copy_psnr         PSNR of the better context view copied as the render (a context view that
                      is the target itself left out): what a model must beat
    mean_context_psnr PSNR of the pixel mean of the two context views as the render
    camera_worth_db   PSNR minus the PSNR of the same target rendered from the camera of the next
                      target of its scene: 0 for a model that ignores its camera
    probe_*           a linear map from the estimated relative camera (12 numbers and a constant) to
                      the true relative rotation (rotation vector) and translation direction, fitted
                      on the scenes at even places in name order and scored on the odd ones, then the
                      other way round: R^2 near 1 when the learned cameras are the true ones in
                      other coordinates, 0 or below when they carry no trace of them
    transfer_psnr     on a transfer index (prepare.py's test_transfer/): room B rendered along room
                      A's path as UP-LVSM estimates it, at P_B0 P_A0^-1 P_At; summary.json's "transfer"
                      sets it beside the direct score (psnr), per pair too. NaN elsewhere
Does a learned camera mean the same in every room? B along A's path, against the generator's truth:
    python eval.py --ckpt runs/tiny/ckpt_0003000.pt --data data/synthetic/test_transfer/full_list.txt \
        --index data/synthetic/test_transfer/transfer_index.json --out runs/tiny/transfer --no-lpips
With --no-lpips the lpips columns read nan and summary.json has "lpips": null. A rerun with the
same --out scores only the scenes not yet in images.csv: every process appends each finished
scene (its renders written) to its own part file, and the part files are merged into the CSVs at
the start and the end of every run, so a killed run loses only the scenes in flight. run.json
holds what the scores belong to (checkpoint, data list, index, image size); a rerun with any of
them changed is refused unless --restart clears the folder's scores.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, features
from tqdm import tqdm

import l3d

# -----------------------------------------------------------------------------
# Metrics: PSNR (l3d.psnr), scikit-image's SSIM in torch, LPIPS from the lpips package


# scikit-image truncates its gaussian at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5, i.e. 11 taps,
# the same as the win_size=11 the release passes (which sets the border cropped from the SSIM map).
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_WIN = 2 * SSIM_RADIUS + 1


def ssim(pred, gt):
    """SSIM of images [N, 3, H, W] in [0, 1] -> [N] float64, equal to the release's scikit-image call
    structural_similarity(gt, pred, win_size=11, gaussian_weights=True, channel_axis=0, data_range=1.0).

    That is: gaussian-weighted local means and (co)variances, scaled to sample covariances by
    121/120 (scikit-image's default), the SSIM map cropped by the window radius on every side,
    averaged per channel and then over the channels. scikit-image filters with scipy's
    edge-repeating "reflect" border before that crop, but the windows of the pixels the crop keeps
    never reach the border, so a "valid" convolution, with no padding at all, gives the same numbers.
    """
    if min(pred.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, "
                         f"got {list(pred.shape)}")
    x, y = pred.double(), gt.double()
    r = SSIM_RADIUS
    taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()  # [11]; the 2-d window is its outer product, so it is applied one axis at a time
    stats = torch.stack([x, y, x * x, y * y, x * y])  # [5, N, 3, H, W]
    h, w = stats.shape[-2:]
    stats = stats.reshape(-1, 1, h, w)  # [5*N*3, 1, H, W]
    stats = F.conv2d(stats, taps.view(1, 1, -1, 1))  # [5*N*3, 1, H - 2r, W]
    stats = F.conv2d(stats, taps.view(1, 1, 1, -1))  # [5*N*3, 1, H - 2r, W - 2r]
    mx, my, mxx, myy, mxy = stats.reshape(5, *x.shape[:2], h - 2 * r, w - 2 * r)  # each [N, 3, H-2r, W-2r]
    cov_norm = SSIM_WIN ** 2 / (SSIM_WIN ** 2 - 1)  # scikit-image divides by NP - 1, NP = 11 * 11
    vx, vy, vxy = cov_norm * (mxx - mx * mx), cov_norm * (myy - my * my), cov_norm * (mxy - mx * my)
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 * data_range)^2 and (K2 * data_range)^2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # [N, 3, h', w']
    return s.mean((-2, -1)).mean(-1)


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's, for lpips' backbone


def load_lpips(device):
    """lpips' VGG network. Its linear heads ship with the package; the VGG-16 backbone comes from
    torchvision, which reads it from the torch hub cache or downloads it there."""
    import lpips  # imported here so that --no-lpips runs need neither lpips nor torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes about lpips' `pretrained=True`
        try:
            net = lpips.LPIPS(net="vgg", verbose=False)
        except OSError as e:  # no network: urllib's URLError is an OSError
            dest = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_URL.rsplit("/", 1)[1]
            raise OSError(f"LPIPS needs torchvision's VGG-16 weights, and downloading them failed ({e}). "
                          f"Fetch {VGG16_URL} elsewhere and put it at {dest}, "
                          f"or run with --no-lpips") from None
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# Videos: a camera path through the model's own pose estimates


def slerp(q0, q1, t):
    """Unit quaternions q0, q1 [..., 4] and fractions t [...] -> unit quaternions [..., 4] a
    fraction t of the way from q0 to q1 along the shorter great arc."""
    dot = (q0 * q1).sum(-1, keepdim=True)  # [..., 1]
    q1 = torch.where(dot < 0, -q1, q1)  # q and -q are the same rotation; the flipped one is the shorter way
    theta = torch.acos(dot.abs().clamp(max=1.0))
    sin = torch.sin(theta)
    t = t[..., None]  # [...] -> [..., 1]
    near = sin < 1e-6  # (nearly) equal rotations: the slerp weights are 0/0 there, and lerp is exact enough
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / sin.clamp(min=1e-6))
    w1 = torch.where(near, t, torch.sin(t * theta) / sin.clamp(min=1e-6))
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def camera_path(poses, fxfycxcy, n):
    """Key cameras (poses [k, 7], fxfycxcy [k, 4]) -> n cameras (poses [n, 7], fxfycxcy [n, 4]) from
    the first key to the last, evenly spaced in key number: between neighbouring keys translation
    and intrinsics move linearly and rotation by slerp."""
    s = torch.linspace(0, len(poses) - 1, n, dtype=poses.dtype, device=poses.device)
    i = s.floor().long().clamp(max=len(poses) - 2)  # each frame's segment; the last frame ends the last one
    t = (s - i)[:, None]  # [n] -> [n, 1]
    translation = poses[i, :3] + t * (poses[i + 1, :3] - poses[i, :3])
    rotation = slerp(poses[i, 3:], poses[i + 1, 3:], t[:, 0])
    return torch.cat([translation, rotation], -1), fxfycxcy[i] + t * (fxfycxcy[i + 1] - fxfycxcy[i])


@torch.no_grad()
def render_video(model, scene, n_frames, device, chunk=8):
    """A scene's renders [n_frames, 3, R, R] along camera_path through the poses the model estimates
    for all its views, context and targets, taken in frame order: from one context view to the other."""
    frame_numbers = scene["context"] + scene["target"]
    order = sorted(range(len(frame_numbers)), key=frame_numbers.__getitem__)
    images = torch.cat([scene["ctx_images"], scene["tgt_images"]])[order].to(device)  # [k, 3, R, R]
    fxfycxcy = torch.cat([scene["ctx_fxfycxcy"], scene["tgt_fxfycxcy"]])[order].to(device)  # [k, 4]
    ctx, ctx_k = scene["ctx_images"][None].to(device), scene["ctx_fxfycxcy"][None].to(device)
    latents = model.encode(ctx, ctx_k)  # [1, L, d]
    poses = model.estimate_pose(latents, images[None])[0].float()  # [k, 7]
    return render_path(model, latents, *camera_path(poses, fxfycxcy, n_frames), chunk)


def render_path(model, latents, poses, fxfycxcy, chunk=8, bar=False):
    """Scene latents [1, L, d] and a camera path (poses [n, 7], fxfycxcy [n, 4]) -> renders [n, 3, R, R]
    float32, decoded `chunk` frames at a time: chunks bound the decoder's memory."""
    starts = range(0, len(poses), chunk)
    frames = [model.decode(latents, l3d.pose_to_c2w(poses[None, j:j + chunk]), fxfycxcy[None, j:j + chunk])[0]
              for j in l3d.progress(starts, desc="rendering", unit="chunk", disable=not bar)[0]]
    return torch.cat(frames).float()


# -----------------------------------------------------------------------------
# Work: the indexed scenes on disk, loaded in DataLoader workers


def noisy_cameras(c2w, sigma, scene):
    """Cameras c2w [v, 4, 4] -> the same with Gaussian noise of scale sigma added to each one's 7-number
    pose encoding (translation, then quaternion xyzw), as the release's noise_scale does. The noise
    is drawn from a generator seeded by the scene's name: a rerun, any batch size and any number of
    processes give every scene the same noise."""
    v = torch.from_numpy(rotation_vector(c2w[:, :3, :3].numpy()))  # [v, 3], float64
    angle = v.norm(dim=-1, keepdim=True)
    axis = v / angle.clamp(min=1e-300)
    pose = torch.cat([c2w[:, :3, 3].double(), axis * torch.sin(angle / 2), torch.cos(angle / 2)], -1)  # [v, 7]
    noise = torch.randn(pose.shape, generator=torch.Generator().manual_seed(zlib.crc32(scene.encode())),
                        dtype=torch.float64)
    return l3d.pose_to_c2w(pose + sigma * noise).to(c2w.dtype)


def transfer_entries(index, index_path):
    """The transfer entries of an evaluation index (read_index's dict of prepare.py's
    test_transfer/transfer_index.json, read from index_path) -> {scene: {"context": [frames],
    "target": [frames]}}: the frames of room A that a scene of room B is rendered along, one A target
    for each B target. {} for an index without them. An entry that cannot be scored as written is
    refused, naming its scene and the file."""
    entries = {}
    for scene, views in index.items():
        if views is None or "transfer" not in views:
            continue
        a = views["transfer"]
        why = l3d.index_entry_problem(a)
        if not why and len(a["target"]) != len(views["target"]):
            why = f"{len(a['target'])} targets of room A for {len(views['target'])} of room B"
        if why:
            raise ValueError(f"{index_path}: the transfer entry of {scene!r} cannot be scored: {why}")
        entries[scene] = a
    return entries


class IndexedScenes(torch.utils.data.Dataset):
    """Loads the views of each scene of a work list (in DataLoader workers). A scene that cannot be
    scored comes back with the reason in "skip" ("out_of_range" or "unreadable") and "why". With
    pose_noise, the cameras a model is given (ctx_c2w, tgt_c2w) carry that noise; "c2w", the truth
    the pose errors and the probe are measured against, does not. A scene of transfer ({scene: the
    frames of room A, see transfer_entries}) also has room A's views, under "transfer"."""

    def __init__(self, work, res, patch, pose_noise=0.0, transfer=None):
        self.work, self.res, self.patch, self.pose_noise = work, res, patch, pose_noise
        self.transfer = transfer or {}

    def __len__(self):
        return len(self.work)

    def __getitem__(self, i):
        scene, meta, context, target = self.work[i]
        item = {"scene": scene, "context": context, "target": target, "skip": None}
        try:
            item |= l3d.load_indexed_scene(meta, context, target, self.res, self.patch)
            if scene in self.transfer:
                a = self.transfer[scene]
                item["transfer"] = l3d.load_indexed_scene(meta, a["context"], a["target"], self.res, self.patch)
        except IndexError as e:
            return item | {"skip": "out_of_range", "why": str(e)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            return item | {"skip": "unreadable", "why": str(e)}
        if self.pose_noise:
            given = noisy_cameras(torch.cat([item["ctx_c2w"], item["tgt_c2w"]]), self.pose_noise, scene)
            item |= {"ctx_c2w": given[:len(context)], "tgt_c2w": given[len(context):]}
        return item


def batches(items, size, skipped):
    """Loaded scenes -> lists of up to `size` scenes with the same view counts, so that they stack.
    Scenes that cannot be scored are counted in `skipped` and reported, never fatal."""
    batch = []
    for item in items:
        if item["skip"]:
            skipped[item["skip"]] += 1
            tqdm.write(f"eval.py: {item['scene']} not scored: {item['why']}")
            continue
        views = (len(item["context"]), len(item["target"]), "transfer" in item)
        first = batch and (len(batch[0]["context"]), len(batch[0]["target"]), "transfer" in batch[0])
        if batch and (len(batch) == size or views != first):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Scoring


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pose_errors(e, g):
    """How far the model's cameras are from the dataset's, in degrees, float64. e [b, v, 4, 4]: the
    cameras the model estimates for the targets relative to the one it estimates for context view 0,
    E = P0^-1 Pt, the frame UP-LVSM works in; g: the dataset's, G = C0^-1 Ct -> (the angle of
    E_R^T G_R, the angle between E_t and G_t), each [b, v]. Translations are compared by direction
    only, the model's scale being its own; NaN where the true camera did not move (|G_t| < 1e-6)."""
    r = e[..., :3, :3].transpose(-1, -2) @ g[..., :3, :3]
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)  # trace = 1 + 2 cos(angle)
    et, gt = e[..., :3, 3], g[..., :3, 3]
    translation = torch.atan2(torch.linalg.cross(et, gt).norm(dim=-1), (et * gt).sum(-1))
    translation = torch.where(gt.norm(dim=-1) < 1e-6, math.nan, translation)
    return torch.rad2deg(torch.arccos(cos)), torch.rad2deg(translation)


def positions(context, target):
    """Where each target lies between the first two context frames: 0 at the first, 1 at the second,
    outside [0, 1] beyond them; NaN with one context view."""
    if len(context) < 2 or context[0] == context[1]:
        return [math.nan] * len(target)
    return [(t - context[0]) / (context[1] - context[0]) for t in target]


@torch.no_grad()
def transfer_renders(model, batch, latents, tgt_k, p_b0, device):
    """UP-LVSM renders room B along room A's path: A's context views are encoded, the estimator places
    A's context view 0 and A's targets (P_A0, P_At) from their images, and B is rendered from its own
    latents [b, L, d] at P_B0 P_A0^-1 P_At, P_B0 being where the estimator places B's context view 0
    (p_b0 [b, 1, 4, 4] float64). A camera that means the same in every room renders what B looks like
    from there -> [b, v, 3, R, R]."""
    a_ctx, a_ctx_k, a_tgt = (torch.stack([s["transfer"][k] for s in batch]).to(device)
                             for k in ("ctx_images", "ctx_fxfycxcy", "tgt_images"))
    pose = model.estimate_pose(model.encode(a_ctx, a_ctx_k), torch.cat([a_ctx[:, :1], a_tgt], 1))  # [b, 1 + v, 7]
    p = l3d.pose_to_c2w(pose.double().cpu())  # [b, 1 + v, 4, 4]
    moved = p_b0 @ torch.linalg.inv(p[:, :1]) @ p[:, 1:]  # [b, v, 4, 4]
    return model.decode(latents, moved.float().to(device), tgt_k)


@torch.no_grad()
def score(model, batch, device, autocast, lpips_net):
    """A batch of b loaded scenes with the same view counts -> renders [b, v, 3, R, R] float32, per
    scene rows [frame number, position, *METRICS] for each of its v targets, per scene rows of
    CAMERAS (the relative cameras the probe reads), and the seconds the model took to render."""
    inputs = [torch.stack([s[key] for s in batch]).to(device) for key in l3d.MODEL_INPUTS]
    ctx, ctx_k, tgt = inputs[:3]
    synchronize(device)
    start = time.time()
    with autocast:
        render, pose = model(*inputs)
    synchronize(device)
    seconds = time.time() - start
    render = render.float()
    b, v_ctx, v = ctx.shape[0], ctx.shape[1], tgt.shape[1]
    pred, gt = render.flatten(0, 1), tgt.flatten(0, 1)  # [b, v, 3, R, R] -> [b*v, 3, R, R]
    psnr = l3d.psnr(pred, gt).cpu()
    lp = torch.full((b * v,), math.nan)
    if lpips_net:
        lp = lpips_net(gt, pred, normalize=True).flatten()  # [b*v, 1, 1, 1] -> [b*v]
    # the better context view copied; for a target that is a context view, the better of the others
    copies = torch.stack([l3d.psnr(ctx[:, k:k + 1].expand_as(tgt).flatten(0, 1), gt).cpu().reshape(b, v)
                          for k in range(v_ctx)])  # [v_ctx, b, v]
    itself = torch.tensor([[[t == s["context"][k] for t in s["target"]] for s in batch] for k in range(v_ctx)])
    copy = copies.masked_fill(itself, -math.inf).amax(0).flatten()  # [v_ctx, b, v] -> [b*v]
    copy = copy.masked_fill(copy == -math.inf, math.nan)
    mean_context = l3d.psnr(ctx.mean(1, keepdim=True).expand_as(tgt).flatten(0, 1), gt).cpu()
    worth = torch.full((b * v,), math.nan, dtype=torch.float64)
    if v > 1:  # untimed: every target again, from the next target's camera
        with autocast:
            other = l3d.next_camera_renders(model, *inputs, pose).float().flatten(0, 1)  # [b*v, 3, R, R]
        worth = psnr - l3d.psnr(other, gt).cpu()
    c2w = torch.stack([s["c2w"] for s in batch])  # [b, v_ctx + v, 4, 4], the dataset's, float64
    g = torch.linalg.inv(c2w[:, :1]) @ c2w[:, v_ctx:]  # [b, v, 4, 4]
    e = torch.full_like(g, math.nan)
    if pose is not None:  # UP-LVSM: context view 0 through the pose estimator too, untimed
        with autocast:
            latents = model.encode(ctx, ctx_k)  # [b, L, d], B's scene for the transfer below too
            pose0 = model.estimate_pose(latents, ctx[:, :1])  # [b, 1, 7]
        p0, pt = (l3d.pose_to_c2w(p.double().cpu()) for p in (pose0, pose))
        e = torch.linalg.inv(p0) @ pt  # [b, v, 4, 4]
    errors = torch.stack(pose_errors(e, g)).flatten(1)  # [2, b, v] -> [2, b*v]
    transfer = torch.full((b * v,), math.nan, dtype=torch.float64)
    if pose is not None and "transfer" in batch[0]:  # untimed: the same targets along room A's path
        with autocast:
            moved = transfer_renders(model, batch, latents, inputs[3], p0, device).float()
        transfer = l3d.psnr(moved.flatten(0, 1), gt).cpu()
    values = [psnr, ssim(pred, gt).cpu(), lp.double().cpu(), copy, mean_context, worth, *errors, transfer]
    values = torch.stack(values, -1).reshape(b, v, -1).tolist()  # [b*v, metrics] -> [b, v, metrics]
    rows = [[[f, x, *m] for f, x, m in zip(s["target"], positions(s["context"], s["target"]), ms)]
            for s, ms in zip(batch, values)]
    cameras = torch.cat([e[..., :3, :].flatten(2), g[..., :3, :].flatten(2)], -1)  # [b, v, 24]
    cameras = [[[f, *c] for f, c in zip(s["target"], cs)] for s, cs in zip(batch, cameras.tolist())]
    return render, rows, cameras, seconds


def save_images(folder, scene, render):
    """context.png: the context views side by side; targets.png: one row per target, target | render."""
    folder.mkdir(parents=True, exist_ok=True)
    l3d.to_pil(torch.cat(list(scene["ctx_images"]), 2)).save(folder / "context.png")
    pairs = [torch.cat([t, r.cpu()], 2) for t, r in zip(scene["tgt_images"], render)]
    l3d.to_pil(torch.cat(pairs, 1)).save(folder / "targets.png")


def save_video(folder, frames, name="video"):
    """frames [n, 3, R, R] in [0, 1] -> folder/name.webp, animated at 30 frames per second (a GIF if
    Pillow lacks WebP), written through a temporary file -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [l3d.to_pil(f) for f in frames]
    path = folder / (name + (".webp" if features.check("webp") else ".gif"))
    l3d.write_atomic(path, lambda tmp: images[0].save(tmp, format=path.suffix[1:].upper(), save_all=True,
                                                      append_images=images[1:], duration=33, loop=0))
    return path


# -----------------------------------------------------------------------------
# Your own photos: two pictures of one scene in, a fly-through from the first camera to the second out

PHOTO_FOV = 65.0  # degrees across the longer side when EXIF says nothing: a phone's main camera


def rgb8(img):
    """Any Pillow image -> 8-bit RGB, as the model was trained on. 16- and 32-bit integer images are
    scaled from 0..65535, float ones from 0..1 (a plain convert would clip them to white), and
    transparent pixels are laid over white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        scale = 255.0 if img.mode == "F" else 1 / 257
        pixels = (np.asarray(img, dtype=np.float64) * scale).round().clip(0, 255)
        img = Image.fromarray(pixels.astype(np.uint8))
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def read_photo(path, fov=PHOTO_FOV):
    """A photo (JPEG or PNG, any size) -> (upright RGB image, fxfycxcy [4] in its pixels, where the
    focal length came from). EXIF orientation is applied. The focal length is EXIF's 35 mm equivalent
    when the camera recorded one, else the one that spans `fov` degrees across the longer side."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        with Image.open(path) as img:
            exif = img.getexif()
            img = rgb8(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: too large for Pillow's guard against decompression bombs ({e}); "
                         f"downscale it first: the model reads a few hundred pixels a side") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
    w, h = img.size
    f35 = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.FocalLengthIn35mmFilm)
    if f35:  # the 35 mm equivalent keeps the diagonal view of a 36 x 24 mm frame
        f, source = float(f35) * math.hypot(w, h) / math.hypot(36, 24), f"EXIF: {f35} mm equivalent"
    else:
        f = max(w, h) / 2 / math.tan(math.radians(fov) / 2)
        source = f"--fov {fov:g} (no focal length in EXIF)"
    return img, [f, f, w / 2, h / 2], source


@torch.no_grad()
def fly_through(model, images, fxfycxcy, n_frames, beyond=0.2, chunk=8):
    """Photos A and B (images [2, 3, R, R], fxfycxcy [2, 4]) -> (frames [n, 3, R, R], poses [n, 7],
    fxfycxcy [n, 4], the frame at B's camera). The model estimates both cameras in the frame of A; A's
    lands at the identity only as nearly as the model has learned to put it there, so the path starts
    at A's estimate (README, "Try it on your photos"). It goes from A's camera to B's and a fraction
    `beyond` further: translation and intrinsics linearly, rotation by slerp."""
    latents = model.encode(images[None], fxfycxcy[None])  # [1, L, d]
    pose_a, pose_b = model.estimate_pose(latents, images[None])[0].float()  # [2, 7] -> [7], [7]
    at_b = round((n_frames - 1) / (1 + beyond))
    t = torch.arange(n_frames, device=images.device) / at_b  # [n]: 0 at A, 1 at B
    rotation = slerp(pose_a[3:].expand(n_frames, 4), pose_b[3:].expand(n_frames, 4), t)
    poses = torch.cat([pose_a[:3] + t[:, None] * (pose_b[:3] - pose_a[:3]), rotation], -1)  # [n, 7]
    path_fxfycxcy = fxfycxcy[0] + t[:, None] * (fxfycxcy[1] - fxfycxcy[0])  # [n, 4]
    return render_path(model, latents, poses, path_fxfycxcy, chunk, bar=True), poses, path_fxfycxcy, at_b


def contact_sheet(photos, frames, columns=8):
    """The two photos as the model sees them, then every frame of the path, `columns` to a row."""
    images = list(photos) + [torch.ones_like(photos[0])] * (columns - 2) + list(frames)
    images += [torch.ones_like(photos[0])] * (-len(images) % columns)
    rows = [torch.cat(images[i:i + columns], 2) for i in range(0, len(images), columns)]
    return l3d.to_pil(torch.cat(rows, 1))


def render_photos(args, photos, model, device):
    """eval.py --photos A B: the fly-through as an animated WebP (GIF without WebP), a contact sheet and
    the cameras in json, all written at the end, so that a failure leaves nothing half-written."""
    cfg = model.config
    views = []
    for path, (img, fxfycxcy, source) in zip(args.photos, photos):
        if min(img.size) < cfg.image_size:
            raise ValueError(f"{path}: {img.size[0]}x{img.size[1]} is smaller than the model's "
                             f"{cfg.image_size}x{cfg.image_size} input")
        print(f"{path}: {img.size[0]}x{img.size[1]}, focal length {fxfycxcy[0]:.1f} px from {source}")
        views.append((*l3d.crop_view(img, fxfycxcy, cfg.image_size, cfg.patch_size), source))
    images = torch.stack([v[0] for v in views]).to(device)
    fxfycxcy = torch.stack([v[1] for v in views]).to(device)
    frames, poses, path_fxfycxcy, at_b = fly_through(model, images, fxfycxcy, args.frames)
    cameras = {"photos": [str(p) for p in args.photos], "focal_length_from": [v[2] for v in views],
               "image_size": cfg.image_size, "frame_at_b": at_b,
               "frames": [{"c2w": l3d.pose_to_c2w(p).tolist(), "fxfycxcy": k.tolist()}
                          for p, k in zip(poses.cpu(), path_fxfycxcy.cpu())]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video = save_video(out, frames.cpu(), "flythrough")
    sheet = out / "contact_sheet.png"
    l3d.write_atomic(sheet, lambda tmp: contact_sheet(images.cpu(), frames.cpu()).save(tmp, format="PNG"))
    l3d.write_atomic(out / "cameras.json", json.dumps(cameras, indent=1) + "\n")
    print(f"{len(frames)} frames, B's camera at frame {at_b}: {video}, {sheet}, {out / 'cameras.json'}")
    return cameras


# -----------------------------------------------------------------------------
# Result files: per-process part files merged into images.csv, cameras.csv and metrics.csv


METRICS = ["psnr", "ssim", "lpips", "copy_psnr", "mean_context_psnr", "camera_worth_db",
           "pose_rotation_error_deg", "pose_translation_error_deg", "transfer_psnr"]
IMAGE_COLUMNS = ["view", "position", *METRICS]
# the model's relative camera E = P0^-1 Pt and the dataset's G = C0^-1 Ct, the top 3 x 4 of each, row-major
CAMERA_COLUMNS = ["view"] + [f"{m}{i}{j}" for m in "eg" for i in range(3) for j in range(4)]


def csv_text(header, rows):
    """Rows -> CSV text, floats with 6 decimals (plenty for metrics reported to 2 or 3)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([f"{x:.6f}" if isinstance(x, float) else x for x in row] for row in rows)
    return text.getvalue()


def read_table(path, columns):
    """images.csv or cameras.csv -> {scene: [[frame number, *the other columns as floats], ...]} ({}
    when there is none yet)."""
    if not path.exists():
        return {}
    scenes = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                values = [int(row["view"])] + [float(row[k]) for k in columns[1:]]
                scenes.setdefault(row["scene"], []).append(values)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: line {n} is not 'scene,{','.join(columns)}'; rerun with "
                                 f"--restart to score from scratch") from None
    return scenes


def merge_parts(out):
    """Fold the part files of earlier or current processes into images.csv, cameras.csv and
    metrics.csv, then delete them."""
    scenes = read_table(out / "images.csv", IMAGE_COLUMNS)
    cameras = read_table(out / "cameras.csv", CAMERA_COLUMNS)
    parts = sorted(out.glob("part.rank*.jsonl"))
    for part in parts:
        for line in part.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a killed process's last line can be cut short: that scene is scored again
                continue
            scenes.setdefault(record["scene"], record["rows"])
            cameras.setdefault(record["scene"], record["cameras"])
    names = sorted(scenes)
    l3d.write_atomic(out / "images.csv", csv_text(["scene", *IMAGE_COLUMNS],
                                              [[s, *row] for s in names for row in scenes[s]]))
    l3d.write_atomic(out / "cameras.csv", csv_text(["scene", *CAMERA_COLUMNS],
                                               [[s, *row] for s in sorted(cameras) for row in cameras[s]]))
    means = [[s, *nanmean([row[2:] for row in scenes[s]])[0]] for s in names]
    l3d.write_atomic(out / "metrics.csv", csv_text(["scene", *METRICS], means))
    for part in parts:
        part.unlink()


# -----------------------------------------------------------------------------
# The linear probe: how much of the true relative camera a linear map can read off the model's


def rotation_vector(r):
    """Rotation matrices [N, 3, 3] -> rotation vectors [N, 3] (the axis times the angle in radians),
    float64."""
    r = np.asarray(r, dtype=np.float64)
    cos = np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1)
    angle = np.arccos(cos)
    skew = np.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], -1)  # 2 sin(angle) axis
    sin = np.sin(angle)
    small = sin < 1e-6
    v = np.where(small, 0.5, angle / (2 * np.where(small, 1.0, sin)))[:, None] * skew  # angle -> 0: skew / 2
    half_turn = small & (cos < 0)  # there skew vanishes: (R + I) / 2 is axis axis^T, its largest column the axis
    for k in np.flatnonzero(half_turn):
        outer = (r[k] + np.eye(3)) / 2
        column = outer[:, np.argmax(np.linalg.norm(outer, axis=0))]
        v[k] = np.pi * column / np.linalg.norm(column)
    return v


def rotation_matrix(v):
    """Rotation vectors [N, 3] -> rotation matrices [N, 3, 3] (Rodrigues), float64."""
    v = np.asarray(v, dtype=np.float64)
    angle = np.linalg.norm(v, axis=1)
    axis = v / np.maximum(angle, 1e-300)[:, None]
    k = np.zeros((len(v), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k -= k.transpose(0, 2, 1)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3) + s * k + (1 - c) * k @ k


def linear_probe(e, g, scenes):
    """Fit a linear map from the model's relative cameras to the true ones, and score it on scenes it
    was not fitted on. e, g [N, 3, 4]: E = P0^-1 Pt and G = C0^-1 Ct of N targets; scenes [N]: their
    scene names. Inputs: the 12 entries of E and a constant; outputs: G's rotation vector, and G's
    translation direction (targets where the camera moved). Least squares on the scenes at even
    positions in name order, scored on the odd ones, then the other way round -> {"rotation_r2",
    "translation_r2": 1 - residual / total sum of squares, each fold's total about its own mean,
    pooled over the folds and the 3 components (0: no better than the mean, below: worse),
    "rotation_error_deg": the mean angle between the probe's rotations and the true ones,
    "targets": N}, or {"targets": N, "note": why there is no fit}."""
    e, g = np.asarray(e, dtype=np.float64).reshape(-1, 12), np.asarray(g, dtype=np.float64)
    names = sorted(set(scenes))
    fold = np.array([names.index(s) % 2 for s in scenes])
    x = np.concatenate([e, np.ones((len(e), 1))], 1)  # [N, 13]
    moved = np.linalg.norm(g[:, :, 3], axis=1) >= 1e-6
    outputs = {"rotation": (rotation_vector(g[:, :, :3]), np.isfinite(e).all(1)),
               "translation": (g[:, :, 3] / np.where(moved, np.linalg.norm(g[:, :, 3], axis=1), 1)[:, None],
                               np.isfinite(e).all(1) & moved)}
    result = {"targets": len(e)}
    if not np.isfinite(e).any():
        return result | {"note": "the model gives no cameras of its own (PT-LVSM is given them)"}
    for name, (y, usable) in outputs.items():
        residual = total = 0.0
        predicted = np.zeros_like(y)
        for test in (0, 1):
            fit, scored = usable & (fold != test), usable & (fold == test)
            if fit.sum() <= x.shape[1] or not scored.any():
                return result | {"note": f"too few targets to fit the {name} probe: {int(fit.sum())} in the "
                                         f"scenes of one half, {x.shape[1] + 1} needed (13 inputs; ask for at "
                                         f"least 2 targets a scene, over more scenes)"}
            w = np.linalg.lstsq(x[fit], y[fit], rcond=None)[0]  # [13, 3]
            predicted[scored] = x[scored] @ w
            residual += ((y[scored] - predicted[scored]) ** 2).sum()
            total += ((y[scored] - y[scored].mean(0)) ** 2).sum()
        result[f"{name}_r2"] = 1 - residual / total if total > 0 else None
        if name == "rotation":
            r = rotation_matrix(predicted[usable]).transpose(0, 2, 1) @ g[usable, :, :3]
            cos = np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1)
            result["rotation_error_deg"] = float(np.degrees(np.arccos(cos)).mean())
    return result


def file_digest(path):
    """blake2b of a file's bytes: what it holds, whatever it is called."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_run(out, args, res):
    """What a folder's scores belong to, kept in run.json: the checkpoint's bytes, the data list (its
    place and bytes), the index's bytes and the image size. A rerun scores only the scenes not yet
    scored, so one with any of these changed would mix two evaluations: it is refused, naming what
    changed, unless --restart clears the folder's scores first."""
    ckpt = l3d.CACHE_DIR / l3d.RELEASED[args.ckpt][0] if args.ckpt in l3d.RELEASED else Path(args.ckpt)
    record = {"ckpt": args.ckpt if args.ckpt in l3d.RELEASED else str(ckpt.resolve()),
              "ckpt_blake2b": file_digest(ckpt), "data": str(Path(args.data).resolve()),
              "data_blake2b": file_digest(args.data), "index": str(Path(args.index).resolve()),
              "index_blake2b": file_digest(args.index), "res": res, "pose_noise": args.pose_noise}
    path = out / "run.json"
    # a run that stopped before it scored anything holds no scores to protect from mixing
    parts = [p for p in out.glob("part.rank*.jsonl") if p.stat().st_size]
    holds_scores = bool(parts or read_table(out / "images.csv", IMAGE_COLUMNS))
    before = json.loads(path.read_text()) if path.exists() and holds_scores else record
    before = {"pose_noise": 0.0} | before  # folders scored before --pose-noise existed had none
    compared = {"checkpoint": ["ckpt_blake2b"], "data list": ["data", "data_blake2b"],
                "index": ["index_blake2b"], "image size": ["res"], "pose noise": ["pose_noise"]}
    changed = [what for what, keys in compared.items() if any(before.get(k) != record[k] for k in keys)]
    if changed and not args.restart:
        raise ValueError(f"{path}: this folder holds the scores of another {', another '.join(changed)} "
                         f"({', '.join(f'{k}: {before.get(k)}' for k in ('ckpt', 'data', 'index', 'res', 'pose_noise'))}"
                         f"); "
                         f"pass --restart to clear them, or another --out")
    if changed or args.restart:
        for old in [out / name for name in ("images.csv", "metrics.csv", "cameras.csv", "summary.json")]:
            old.unlink(missing_ok=True)
        for part in out.glob("part.rank*.jsonl"):
            part.unlink()
        shutil.rmtree(out / "renders", ignore_errors=True)
    l3d.write_atomic(path, json.dumps(record) + "\n")
    return record


def nanmean(rows):
    """Column means of rows of METRICS, NaN left out (a camera that did not move has no translation
    direction) -> (means, the number of values each averages); NaN where a column holds nothing else
    (no LPIPS, no pose for PT-LVSM)."""
    values = np.array(rows, dtype=np.float64).reshape(-1, len(METRICS))
    counts = (~np.isnan(values)).sum(0)
    return [float(np.nansum(c) / n) if n else math.nan for c, n in zip(values.T, counts)], counts.tolist()


def finite_or_null(x):
    """NaN and infinities -> None, in nested dicts and lists: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_null(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def transfer_summary(scenes):
    """images.csv's rows {scene: rows} -> the transfer score over the scenes that have one (UP-LVSM on
    a transfer index): B rendered along A's path against B rendered from cameras estimated on its
    own frames (direct), the same targets' copy baselines, and a row per pair; None without any."""
    column = {name: 2 + i for i, name in enumerate(METRICS)}
    pairs = {name: np.array(rows) for name, rows in scenes.items()
             if all(math.isfinite(r[column["transfer_psnr"]]) for r in rows)}
    if not pairs:
        return None
    every = np.concatenate(list(pairs.values()))  # [images, columns]

    names = {"transfer_psnr": "transfer_psnr", "direct_psnr": "psnr", "copy_psnr": "copy_psnr",
             "mean_context_psnr": "mean_context_psnr"}

    def means(rows):
        m = {k: float(rows[:, column[c]].mean()) for k, c in names.items()}
        return m | {"gap_db": m["transfer_psnr"] - m["direct_psnr"]}

    return {"pairs": len(pairs), "images": len(every), **means(every),
            "by_pair": [{"pair": name, **means(rows)} for name, rows in sorted(pairs.items())]}


def summarize(out, counts, record):
    """summary.json from images.csv and cameras.csv: means over every target image scored in any run
    and how many images each averages, the linear probe, the means at each position between the
    context views, and the counts."""
    scenes = read_table(out / "images.csv", IMAGE_COLUMNS)
    rows = [row for name in sorted(scenes) for row in scenes[name]]
    means, n = nanmean([row[2:] for row in rows])
    summary = {name: None if math.isnan(m) else m for name, m in zip(METRICS, means)}
    summary |= {"images_averaged": dict(zip(METRICS, n))}
    cameras = read_table(out / "cameras.csv", CAMERA_COLUMNS)
    flat = [(name, row[1:]) for name in sorted(cameras) for row in cameras[name]]
    if flat:
        values = np.array([v for _, v in flat])  # [N, 24]
        probe = linear_probe(values[:, :12].reshape(-1, 3, 4), values[:, 12:].reshape(-1, 3, 4),
                             [name for name, _ in flat])
        summary |= {f"probe_{k}": v for k, v in probe.items()}
    at = {}  # positions to the nearest 0.05: a fraction of a gap of 25 or more frames lands within 0.02
    for row in rows:
        if math.isfinite(row[1]):  # one context view: no position
            at.setdefault(round(row[1] * 20) / 20, []).append(row[2:])
    if at:
        summary["by_position"] = {f"{x:g}": dict(zip(["images", *METRICS], [len(v), *nanmean(v)[0]]))
                                  for x, v in sorted(at.items())}
    transfer = transfer_summary(scenes)
    if transfer:
        summary["transfer"] = transfer
    summary |= {"scenes": len(scenes), "images": len(rows), **counts, **record}
    summary = finite_or_null(summary)
    l3d.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


# -----------------------------------------------------------------------------
# Main


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank0_first(rank, make):
    """make() on rank 0, then on the other ranks: a download into the shared cache happens once."""
    if rank == 0:
        made = make()
    barrier()
    if rank != 0:
        made = make()
    return made


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Score an UP-LVSM checkpoint with the paper's protocol (see the "
                                 "docstring of eval.py).")
    ap.add_argument("--ckpt", required=True, help="x224 or x518 (the released weights, downloaded once), "
                    "a released checkpoint file, or an l3d one")
    ap.add_argument("--res", type=int, help="image size: required for released checkpoint files (224, 518); "
                    "names and l3d's files know theirs")
    ap.add_argument("--data", help="full_list.txt of a processed test split")
    ap.add_argument("--index", help="evaluation index json (the paper's: evaluation_index_re10k.json)")
    ap.add_argument("--out", required=True, help="result folder; a rerun skips the scenes scored there")
    ap.add_argument("--restart", action="store_true", help="clear the scores already in --out and score "
                    "every scene again (needed when the checkpoint, data list, index or image size changed)")
    ap.add_argument("--photos", nargs="+", metavar="IMAGE", help="two photos of one scene, A B: render a "
                    "fly-through from A's camera to B's into --out, instead of scoring --data")
    ap.add_argument("--frames", type=int, default=60, help="with --photos: frames of the fly-through")
    ap.add_argument("--fov", type=float, default=PHOTO_FOV, help="with --photos: degrees across the longer "
                    "of a photo whose EXIF has no 35 mm equivalent focal length")
    ap.add_argument("--batch", type=int, default=32 if torch.cuda.is_available() else 8,
                    help="scenes per forward pass (default: 32 on a GPU, 8 on the CPU)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="autocast dtype of the model (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-lpips", dest="lpips", action="store_false", help="skip LPIPS (no VGG-16 download)")
    ap.add_argument("--save-images", action="store_true",
                    help="write renders/<scene>/context.png and targets.png")
    ap.add_argument("--video", type=int, default=0, metavar="N",
                    help="write renders/<scene>/video.webp of N frames (0: none)")
    ap.add_argument("--pose-noise", type=float, default=0.0, metavar="SIGMA",
                    help="Gaussian noise of this scale on the 7-number pose encoding (translation, quaternion) "
                         "of every camera a model is given, the same on every rerun; UP-LVSM is given none")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU when there is one")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count()) if torch.cuda.is_available() else 0,
                    help="DataLoader processes loading images, per GPU")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="do not torch.compile the transformer blocks (compiled only on CUDA)")
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; it names the folder the scores go in")
    if not (math.isfinite(args.pose_noise) and args.pose_noise >= 0):
        ap.error(f"--pose-noise {args.pose_noise}: a scale of noise is a finite number, 0 or more")
    if args.photos and len(args.photos) != 2:
        ap.error(f"--photos takes two images of one scene, A and B; got {len(args.photos)}: "
                 f"{' '.join(args.photos)}")
    if not args.photos and not (args.data and args.index):
        ap.error("--data and --index are required to score a test split (or --photos A B for your own "
                 "photos)")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = l3d.setup(args.device)
    dtype = l3d.autocast_dtype(device, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    photos = [read_photo(path, args.fov) for path in args.photos or []]  # bad photos fail before a download
    model = rank0_first(rank, lambda: l3d.load_model(args.ckpt, args.res)).to(device)
    if (photos or args.video) and not isinstance(model, l3d.UPLVSM):
        raise ValueError(f"{args.ckpt}: a {model.config.model} model renders only the cameras it is given; "
                         f"--photos and --video need UP-LVSM, which places the cameras itself")
    if args.compile and device.type == "cuda":
        l3d.compile_blocks(model)
    if photos:
        with autocast:
            return render_photos(args, photos, model, device)
    cfg = model.config
    out = Path(args.out)
    if rank == 0:  # only rank 0 touches the shared files, and only while the others wait
        out.mkdir(parents=True, exist_ok=True)
        record = check_run(out, args, cfg.image_size)
        merge_parts(out)
    barrier()
    index = l3d.read_index(args.index)
    views, counts = l3d.index_views(args.data, index)
    done = read_table(out / "images.csv", IMAGE_COLUMNS)
    mine = [v for v in views if v[0] not in done][rank::world]  # each scene on one rank: no padding, no drops
    lpips_net = rank0_first(rank, lambda: load_lpips(device)) if args.lpips else None
    transfer = transfer_entries(index, args.index)
    work = IndexedScenes(mine, cfg.image_size, cfg.patch_size, args.pose_noise, transfer)
    loader = torch.utils.data.DataLoader(work, batch_size=None, num_workers=args.workers)
    skipped = {"out_of_range": 0, "unreadable": 0, "nonfinite": 0}
    scored = 0
    # throughput after the first batch, which pays for compilation: the model alone, and everything
    rendered, model_seconds, start = 0, 0.0, None
    bar = l3d.progress(loader, desc=f"rank 0 of {world}", disable=rank != 0)[0]
    with open(out / f"part.rank{rank}.jsonl", "a") as part:
        for batch in batches(bar, args.batch, skipped):
            renders, rows, cameras, seconds = score(model, batch, device, autocast, lpips_net)
            if start is None:
                start = time.time()
            else:
                rendered += renders.shape[0] * renders.shape[1]
                model_seconds += seconds
            scored += len(batch)
            for scene, render, scene_rows, scene_cameras in zip(batch, renders, rows, cameras):
                if not (torch.isfinite(render).all() and all(math.isfinite(r[2]) and math.isfinite(r[3])
                                                             for r in scene_rows)):
                    # kept out of the means and not recorded as scored, so a rerun tries it again
                    skipped["nonfinite"] += 1
                    tqdm.write(f"eval.py: {scene['scene']} not scored: its renders or scores are not finite "
                               f"(NaN or infinite; look at its intrinsics and cameras)")
                    continue
                if args.save_images:
                    save_images(out / "renders" / scene["scene"], scene, render)
                if args.video:
                    with autocast:
                        frames = render_video(model, scene, args.video, device)
                    save_video(out / "renders" / scene["scene"], frames)
                # recorded once its files are written: a killed run scores a scene again, renders and all
                scored_scene = {"scene": scene["scene"], "rows": scene_rows, "cameras": scene_cameras}
                part.write(json.dumps(scored_scene) + "\n")
                part.flush()
    if rendered and not args.video and not args.save_images:
        print(f"rank {rank}: rendered {rendered} views after the first batch: {rendered / model_seconds:.1f} "
              f"views/s by the model alone, {rendered / (time.time() - start):.1f} views/s with loading and "
              f"scoring", flush=True)
    every = [(scored, skipped)]
    if dist.is_initialized():  # gathering also waits for every rank to have closed its part file
        every = [None] * world if rank == 0 else None
        dist.gather_object((scored, skipped), every, dst=0)
    summary = None
    if rank == 0:
        merge_parts(out)
        counts |= {k: sum(s[k] for _, s in every) for k in skipped}
        summary = summarize(out, counts | {"scored_now": sum(n for n, _ in every)}, record)
        means = "  ".join(f"{k} {summary[k]:.4f}" if summary[k] is not None else f"{k} -"
                          for k in ("psnr", "ssim", "lpips", "copy_psnr", "camera_worth_db"))
        print(f"{means}  over {summary['images']} images of {summary['scenes']} scenes "
              f"({summary['scored_now']} scored by this run); not scored: "
              + ", ".join(f"{counts[k]} {k}" for k in ("index_null", "missing", *skipped))
              + f"; files in {out}")
        if transfer and "transfer" not in summary:
            print(f"a transfer index: this {cfg.model} model is given the true moved cameras, so its psnr is the "
                  f"posed reference; only UP-LVSM, which estimates its cameras, is flown along room A's path")
        if "transfer" in summary:
            t = summary["transfer"]
            print(f"transfer over {t['pairs']} pairs: B along A's path {t['transfer_psnr']:.2f} dB, from cameras "
                  f"estimated on B's own frames {t['direct_psnr']:.2f} dB (gap {t['gap_db']:+.2f}); copies: "
                  f"better context view {t['copy_psnr']:.2f}, their mean {t['mean_context_psnr']:.2f}")
        if "probe_note" in summary:
            print(f"linear probe of the cameras: none, {summary['probe_note']}")
        elif "probe_targets" in summary:
            r2 = [f"{summary[k]:.3f}" if summary[k] is not None else "-"
                  for k in ("probe_rotation_r2", "probe_translation_r2")]
            print(f"linear probe of the cameras ({summary['probe_targets']} targets): R^2 rotation {r2[0]}, "
                  f"translation direction {r2[1]}; rotation error {summary['probe_rotation_error_deg']:.1f} deg "
                  f"(raw: {summary['pose_rotation_error_deg']:.1f})")
    if dist.is_initialized():
        dist.destroy_process_group()
    if summary is not None and summary["images"] == 0:
        raise ValueError(f"nothing scored: no scene of the index {args.index} could be scored from the list "
                         f"{args.data} (the counts above say why)")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input or a failed download: the message names it and the way out
        raise SystemExit(f"eval.py: {e}") from None
