"""
eval.py: score UP-LVSM checkpoints with the paper's protocol (PSNR, SSIM, LPIPS).

For every scene of an evaluation index that is on disk, the two context views go in (in index
order) and each target view is rendered from the camera the model estimates from that target
image; the render is scored against the target. Works with the authors' released checkpoints
and with l3d's own.

One process (the GPU if there is one, else the CPU):
    python eval.py --ckpt uplvsm_x224.pt --res 224 --data data/re10k/test/full_list.txt \
        --index evaluation_index_re10k.json --out runs/eval_x224
8 GPUs (scenes split across processes; the files come out the same as with one):
    torchrun --nproc_per_node 8 eval.py --ckpt uplvsm_x518.pt --res 518 \
        --data data/re10k/test/full_list.txt --index evaluation_index_re10k.json --out runs/eval_x518
l3d checkpoints record their image size, so --res can be left out:
    python eval.py --ckpt runs/tiny/ckpt_0001800.pt --data data/synthetic/test/full_list.txt \
        --index data/synthetic/test/evaluation_index.json --out runs/tiny/eval --no-lpips

What lands in --out:
    images.csv    scene,view,psnr,ssim,lpips   one row per target image (view: its frame number)
    metrics.csv   scene,psnr,ssim,lpips        one row per scene: means over its targets
    summary.json  means over all target images, counts of scenes scored (scored_now: by the last run)
                  and of index entries skipped
    renders/      with --save-images and --video: context strip, target | render pairs, a video
With --no-lpips the lpips columns read nan and summary.json has "lpips": null. A rerun with the
same --out scores only the scenes not yet in images.csv: every process appends each finished
scene to its own part file, and the part files are merged into the CSVs at the start and the end
of every run, so a killed run loses only the scenes in flight.
"""

import argparse
import csv
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import features
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
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {list(pred.shape)}")
    x, y = pred.double(), gt.double()
    r = SSIM_RADIUS
    taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()  # [11]; the 2-d window is its outer product, so it is applied one axis at a time
    stats = torch.stack([x, y, x * x, y * y, x * y])  # [5, N, 3, H, W]
    h, w = stats.shape[-2:]
    stats = stats.reshape(-1, 1, h, w)  # [5*N*3, 1, H, W]
    stats = F.conv2d(F.conv2d(stats, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))  # [5*N*3, 1, H - 2r, W - 2r]
    mx, my, mxx, myy, mxy = stats.reshape(5, *x.shape[:2], h - 2 * r, w - 2 * r)  # each [N, 3, H - 2r, W - 2r]
    cov_norm = SSIM_WIN ** 2 / (SSIM_WIN ** 2 - 1)  # scikit-image divides by NP - 1, NP = 11 * 11, weights or not
    vx, vy, vxy = cov_norm * (mxx - mx * mx), cov_norm * (myy - my * my), cov_norm * (mxy - mx * my)
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 * data_range)^2 and (K2 * data_range)^2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # [N, 3, H - 2r, W - 2r]
    return s.mean((-2, -1)).mean(-1)


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # what torchvision fetches for lpips' backbone


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
            raise RuntimeError(f"eval.py: LPIPS needs torchvision's VGG-16 weights, and downloading them failed ({e}). "
                               f"Fetch {VGG16_URL} elsewhere and put it at {dest}, or run with --no-lpips.") from None
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
    i = s.floor().long().clamp(max=len(poses) - 2)  # the segment of each frame; the last frame ends the last one
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
    latents = model.encode(scene["ctx_images"][None].to(device), scene["ctx_fxfycxcy"][None].to(device))  # [1, L, d]
    poses = model.estimate_pose(latents, images[None])[0].float()  # [k, 7]
    path, path_fxfycxcy = camera_path(poses, fxfycxcy, n_frames)
    frames = [model.decode(latents, l3d.pose_to_c2w(path[None, j:j + chunk]), path_fxfycxcy[None, j:j + chunk])[0]
              for j in range(0, n_frames, chunk)]  # chunks of frames bound the decoder's memory
    return torch.cat(frames).float()


# -----------------------------------------------------------------------------
# Work: the indexed scenes on disk, loaded in DataLoader workers


class IndexedScenes(torch.utils.data.Dataset):
    """Loads the views of each scene of a work list (in DataLoader workers). A scene that cannot be
    scored comes back with the reason in "skip" ("out_of_range" or "unreadable") and "why"."""

    def __init__(self, work, res, patch):
        self.work, self.res, self.patch = work, res, patch

    def __len__(self):
        return len(self.work)

    def __getitem__(self, i):
        scene, meta, context, target = self.work[i]
        item = {"scene": scene, "context": context, "target": target, "skip": None}
        try:
            frames = l3d.read_scene(meta)["frames"]
            if not all(0 <= f < len(frames) for f in context + target):
                return {**item, "skip": "out_of_range", "why": f"index asks for frames {context + target}, scene has {len(frames)}"}
            item["ctx_images"], item["ctx_fxfycxcy"] = l3d.load_views(frames, context, self.res, self.patch)
            item["tgt_images"], item["tgt_fxfycxcy"] = l3d.load_views(frames, target, self.res, self.patch)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return {**item, "skip": "unreadable", "why": str(e)}
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
        views = (len(item["context"]), len(item["target"]))
        if batch and (len(batch) == size or views != (len(batch[0]["context"]), len(batch[0]["target"]))):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score(model, batch, device, autocast, lpips_net):
    """A batch of b loaded scenes -> renders [b, v, 3, R, R] float32 and, per scene, rows
    [frame number, psnr, ssim, lpips] for each of its v targets."""
    ctx, ctx_k, tgt, tgt_k = (torch.stack([s[key] for s in batch]).to(device)
                              for key in ("ctx_images", "ctx_fxfycxcy", "tgt_images", "tgt_fxfycxcy"))
    with autocast:
        render, _ = model(ctx, ctx_k, tgt, tgt_k)
    render = render.float()
    b, v = tgt.shape[:2]
    pred, gt = render.flatten(0, 1), tgt.flatten(0, 1)  # [b, v, 3, R, R] -> [b*v, 3, R, R]
    lp = lpips_net(gt, pred, normalize=True).flatten() if lpips_net else torch.full((b * v,), math.nan, device=device)  # [b*v, 1, 1, 1] -> [b*v]
    values = torch.stack([l3d.psnr(pred, gt), ssim(pred, gt), lp.double()], -1).reshape(b, v, 3).tolist()  # [b*v, 3] -> [b, v, 3]
    rows = [[[f, *m] for f, m in zip(s["target"], ms)] for s, ms in zip(batch, values)]
    return render, rows


def save_images(folder, scene, render):
    """context.png: the context views side by side; targets.png: one row per target, target | render."""
    folder.mkdir(parents=True, exist_ok=True)
    l3d.to_pil(torch.cat(list(scene["ctx_images"]), 2)).save(folder / "context.png")
    pairs = [torch.cat([t, r.cpu()], 2) for t, r in zip(scene["tgt_images"], render)]
    l3d.to_pil(torch.cat(pairs, 1)).save(folder / "targets.png")


def save_video(folder, frames):
    """frames [n, 3, R, R] in [0, 1] -> an animated WebP at 30 frames per second (a GIF if Pillow lacks WebP)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [l3d.to_pil(f) for f in frames]
    path = folder / ("video.webp" if features.check("webp") else "video.gif")
    images[0].save(path, save_all=True, append_images=images[1:], duration=33, loop=0)


# -----------------------------------------------------------------------------
# Result files: per-process part files merged into images.csv and metrics.csv


def csv_text(header, rows):
    """Rows -> CSV text, floats with 6 decimals (plenty for metrics reported to 2 or 3)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([f"{x:.6f}" if isinstance(x, float) else x for x in row] for row in rows)
    return text.getvalue()


def read_images_csv(path):
    """images.csv -> {scene: [[frame number, psnr, ssim, lpips], ...]} ({} when there is none yet)."""
    if not path.exists():
        return {}
    scenes = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                scenes.setdefault(row["scene"], []).append([int(row["view"]), float(row["psnr"]), float(row["ssim"]), float(row["lpips"])])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: line {n} is not 'scene,view,psnr,ssim,lpips'; move the file away to score from scratch") from None
    return scenes


def merge_parts(out):
    """Fold the part files of earlier or current processes into images.csv and metrics.csv, then delete them."""
    scenes = read_images_csv(out / "images.csv")
    parts = sorted(out.glob("part.rank*.jsonl"))
    for part in parts:
        for line in part.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a killed process can be cut short: that scene is scored again
                continue
            scenes.setdefault(record["scene"], record["rows"])
    names = sorted(scenes)
    l3d.write_atomic(out / "images.csv", csv_text(["scene", "view", "psnr", "ssim", "lpips"],
                                              [[s, *row] for s in names for row in scenes[s]]))
    l3d.write_atomic(out / "metrics.csv", csv_text(["scene", "psnr", "ssim", "lpips"],
                                               [[s, *np.mean([row[1:] for row in scenes[s]], 0).tolist()] for s in names]))
    for part in parts:
        part.unlink()


def check_run(out, ckpt, res):
    """Refuse to mix the scores of two checkpoints or image sizes in one --out, since a rerun resumes what is there."""
    record = {"ckpt": str(Path(ckpt).resolve()), "res": res}
    path = out / "run.json"
    if path.exists() and json.loads(path.read_text()) != record:
        raise SystemExit(f"eval.py: {path} says this folder holds scores of {json.loads(path.read_text())}, "
                         f"not of {record}; pass another --out")
    l3d.write_atomic(path, json.dumps(record) + "\n")
    return record


def summarize(out, counts, record):
    """summary.json from images.csv: means over every target image scored in any run, and the counts."""
    scenes = read_images_csv(out / "images.csv")
    values = np.array([row[1:] for rows in scenes.values() for row in rows]).reshape(-1, 3)  # [images, 3]
    means = values.mean(0).tolist() if len(values) else [math.nan] * 3
    summary = {name: None if math.isnan(m) else m for name, m in zip(("psnr", "ssim", "lpips"), means)}
    summary |= {"scenes": len(scenes), "images": len(values), **counts, **record}
    l3d.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


# -----------------------------------------------------------------------------
# Main


def barrier():
    if dist.is_initialized():
        dist.barrier()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Score an UP-LVSM checkpoint with the paper's protocol (see the docstring of eval.py).")
    ap.add_argument("--ckpt", required=True, help="a released checkpoint (uplvsm_x224.pt, uplvsm_x518.pt) or an l3d one")
    ap.add_argument("--res", type=int, help="image size: required for released checkpoints (224 or 518); l3d's record theirs")
    ap.add_argument("--data", required=True, help="full_list.txt of a processed test split")
    ap.add_argument("--index", required=True, help="evaluation index json (the paper's: evaluation_index_re10k.json)")
    ap.add_argument("--out", required=True, help="result folder; a rerun skips the scenes already scored there")
    ap.add_argument("--batch", type=int, default=8, help="scenes per forward pass")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype of the model (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-lpips", dest="lpips", action="store_false", help="skip LPIPS (no VGG-16 download)")
    ap.add_argument("--save-images", action="store_true", help="write renders/<scene>/context.png and targets.png")
    ap.add_argument("--video", type=int, default=0, metavar="N", help="write renders/<scene>/video.webp of N frames (0: none)")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU when there is one")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0,
                    help="DataLoader processes loading images, per GPU")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = l3d.setup(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model = l3d.load_model(args.ckpt, args.res).to(device)
    cfg = model.config
    out = Path(args.out)
    if rank == 0:  # only rank 0 touches the shared files, and only while the others wait
        out.mkdir(parents=True, exist_ok=True)
        record = check_run(out, args.ckpt, cfg.image_size)
        merge_parts(out)
    barrier()
    views, counts = l3d.index_views(args.data, args.index)
    done = read_images_csv(out / "images.csv")
    mine = [v for v in views if v[0] not in done][rank::world]  # every scene on exactly one rank: no padding, no drops
    lpips_net = None
    if args.lpips:  # rank 0 first, so that a download into the shared cache happens once
        if rank == 0:
            lpips_net = load_lpips(device)
        barrier()
        if rank != 0:
            lpips_net = load_lpips(device)
    loader = torch.utils.data.DataLoader(IndexedScenes(mine, cfg.image_size, cfg.patch_size), batch_size=None,
                                         num_workers=args.workers)
    skipped = {"out_of_range": 0, "unreadable": 0}
    scored = 0
    bar = tqdm(loader, desc=f"rank 0 of {world}", disable=rank != 0)
    with open(out / f"part.rank{rank}.jsonl", "a") as part:
        for batch in batches(bar, args.batch, skipped):
            renders, rows = score(model, batch, device, autocast, lpips_net)
            scored += len(batch)
            for scene, render, scene_rows in zip(batch, renders, rows):
                part.write(json.dumps({"scene": scene["scene"], "rows": scene_rows}) + "\n")
                part.flush()  # on disk as soon as it is scored: a killed run keeps it
                if args.save_images:
                    save_images(out / "renders" / scene["scene"], scene, render)
                if args.video:
                    with autocast:
                        frames = render_video(model, scene, args.video, device)
                    save_video(out / "renders" / scene["scene"], frames)
    every = [(scored, skipped)]
    if dist.is_initialized():  # gathering also waits for every rank to have closed its part file
        every = [None] * world if rank == 0 else None
        dist.gather_object((scored, skipped), every, dst=0)
    summary = None
    if rank == 0:
        merge_parts(out)
        counts |= {k: sum(s[k] for _, s in every) for k in skipped}
        summary = summarize(out, counts | {"scored_now": sum(n for n, _ in every)}, record)
        means = "  ".join(f"{k} {summary[k]:.4f}" if summary[k] is not None else f"{k} -" for k in ("psnr", "ssim", "lpips"))
        print(f"{means}  over {summary['images']} images of {summary['scenes']} scenes "
              f"({summary['scored_now']} scored by this run); not scored: "
              + ", ".join(f"{counts[k]} {k}" for k in ("index_null", "missing", *skipped)) + f"; files in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
