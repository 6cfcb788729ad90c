"""
prepare.py: the datasets l3d.py trains and eval.py scores on, in the processed RealEstate10K layout.

    <split>/images/<scene>/<frame:05d>.jpg (or .png)
    <split>/metadata/<scene>.json   {"scene_name", "frames": [{"image_path", "fxfycxcy", "w2c"}]}
    <split>/full_list.txt           the absolute path of every metadata json, sorted

LVSM's and the UP-LVSM release's converters write the same layout (with .png frames), so datasets
they made are read by l3d unchanged.

RealEstate10K from pixelSplat's .torch chunks (SRC/train/*.torch, SRC/test/*.torch). Frames keep
their JPEG bytes; --png decodes them to PNG as the release does. A stopped run resumes where it was:
finished scenes are skipped.
    python prepare.py re10k --src /data/re10k_pixelsplat --out data/re10k
    python prepare.py re10k --src /data/re10k_pixelsplat --out data/re10k --split test --png --workers 32

Generated rooms for training on a laptop CPU (under a minute on 2 cores), with
test/evaluation_index.json in the official index's format, test/extrapolation_index.json (every
target outside the context pair), test/range_index.json and test/sweep_index.json (the evaluation
index's context pairs with, as targets, the frames at 0, 1/4, ..., 1 and at 0, 1/10, ..., 1 of the
way from one context frame to the other: the context views themselves too), the data-scaling lists
train/little, medium, large_list.txt (the first 1/64, 1/16 and 1/4 of the training scenes), and
test_transfer/ with transfer_index.json (each test room B seen along another room A's camera path,
rendered exactly, with A's frames beside it; eval.py scores how well a model's cameras transfer):
    python prepare.py synthetic
    python prepare.py synthetic --out data/synthetic --size 56x32 --train-scenes 1000 --test-scenes 40 --seed 0
"""

import argparse
import colorsys
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import l3d

# -----------------------------------------------------------------------------
# The processed layout. A scene's metadata json is written last and atomically: its presence is
# the sign that the scene is complete, so a stopped run never lists a half-written scene.


def write_metadata(split_dir, name, frames):
    meta = json.dumps({"scene_name": name, "frames": frames}, indent=1)
    l3d.write_atomic(split_dir / "metadata" / f"{name}.json", meta)


def write_list(path, metas):
    """A scene list: the metadata files' absolute paths, sorted, one a line -> its number of scenes."""
    metas = sorted(os.path.abspath(m) for m in metas)
    l3d.write_atomic(path, "".join(m + "\n" for m in metas))
    return len(metas)


def write_full_list(split_dir):
    """Rebuild full_list.txt from the metadata folder; returns its number of scenes."""
    return write_list(split_dir / "full_list.txt", (split_dir / "metadata").glob("*.json"))


def run_parallel(fn, jobs, workers, desc):
    """Yield fn(job) for every job, in completion order, from a pool of processes, with a progress bar."""
    workers = min(workers or os.cpu_count(), len(jobs))
    if workers <= 1:  # no pool: quicker to start and easier to debug
        yield from l3d.progress(map(fn, jobs), total=len(jobs), desc=desc)[0]
        return
    with Pool(workers) as pool:
        yield from l3d.progress(pool.imap_unordered(fn, jobs), total=len(jobs), desc=desc)[0]


# -----------------------------------------------------------------------------
# RealEstate10K: pixelSplat's .torch chunks -> the processed layout
#
# A chunk is a torch.save'd list of scenes {"key", "url", "timestamps" [N], "cameras" [N, 18],
# "images": N uint8 tensors of JPEG bytes}. A camera row is fx, fy, cx, cy divided by the image
# width / height, two unused numbers, then the 3x4 world-to-camera matrix, row-major.


class BadScene(Exception):
    """A scene that cannot be converted whole. It is skipped whole: dropping a frame would shift the
    frame numbers that the evaluation index refers to."""


def convert_scene(scene, split_dir, png):
    """One scene of a chunk -> its frames and metadata; returns (frames, bytes written)."""
    name, cameras, images = scene["key"], scene.get("cameras"), scene.get("images")
    if not torch.is_tensor(cameras) or cameras.ndim != 2 or cameras.shape[1] != 18:
        raise BadScene(f"cameras are not an [N, 18] tensor ({getattr(cameras, 'shape', type(cameras))})")
    if not isinstance(images, (list, tuple)) or len(images) != len(cameras):
        count = len(images) if isinstance(images, (list, tuple)) else "no"
        raise BadScene(f"{len(cameras)} cameras but {count} images")
    if len(cameras) == 0:
        raise BadScene("no frames")
    h, w = 1, 1  # intrinsics are fractions of the frame: their sign and finiteness do not depend on its size
    frames = [{"fxfycxcy": [c[0] * w, c[1] * h, c[2] * w, c[3] * h], "w2c": c[6:] + [0.0, 0.0, 0.0, 1.0]}
              for c in cameras.tolist()]
    for f in frames:
        f["w2c"] = np.array(f["w2c"]).reshape(4, 4)  # [16] -> [4, 4], row-major
    try:
        l3d.check_cameras(frames)  # the test training and evaluation apply: a scene they would skip
    except ValueError as e:
        raise BadScene(f"unusable cameras: {e}") from None
    image_dir = split_dir / "images" / name
    shutil.rmtree(image_dir, ignore_errors=True)  # frames left by a stopped run
    image_dir.mkdir(parents=True)
    frames, written = [], 0
    for i, (camera, jpeg) in enumerate(zip(cameras.tolist(), images)):
        try:
            data = jpeg.numpy().tobytes()
            img = Image.open(io.BytesIO(data)).convert("RGB")  # decodes every pixel: a bad frame fails here
        except Exception as e:
            shutil.rmtree(image_dir)
            raise BadScene(f"frame {i} does not decode ({type(e).__name__}: {e})") from e
        path = image_dir / f"{i:05d}.{'png' if png else 'jpg'}"
        if png:
            img.save(path, compress_level=1)  # level 1: 3x faster than the default, files ~10% larger
        else:
            path.write_bytes(data)
        written += path.stat().st_size
        w, h = img.size
        fx, fy, cx, cy = camera[:4]
        w2c = np.array(camera[6:] + [0.0, 0.0, 0.0, 1.0]).reshape(4, 4)  # [16] -> [4, 4], row-major
        frames.append({"image_path": str(path.absolute()), "fxfycxcy": [fx * w, fy * h, cx * w, cy * h],
                       "w2c": w2c.tolist()})
    write_metadata(split_dir, name, frames)
    return len(frames), written


def convert_chunk(job):
    """One .torch chunk -> report of what was written and what was skipped, and why, and the names
    of its scenes that are on disk now (converted by this run or before), in chunk order."""
    chunk, split_dir, png = job
    report = {"chunk": str(chunk), "scenes": 0, "frames": 0, "bytes": 0, "done_before": 0,
              "bad_scenes": [], "error": None, "on_disk": []}
    try:
        scenes = torch.load(chunk, weights_only=True)
        if not isinstance(scenes, list):
            raise TypeError(f"holds a {type(scenes).__name__}, not a list of scenes")
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        return report
    seen = set()
    for k, scene in enumerate(scenes):
        name = scene.get("key") if isinstance(scene, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            report["bad_scenes"].append((f"#{k}", f"no usable scene key ({name!r})"))
            continue
        if name in seen:  # one metadata file per key: the second would overwrite the first
            report["bad_scenes"].append((f"{name} (#{k})", "a duplicate: this chunk holds an earlier scene "
                                                           "with the same key, which was kept"))
            continue
        seen.add(name)
        if (split_dir / "metadata" / f"{name}.json").exists():
            report["done_before"] += 1
            report["on_disk"].append(name)
            continue
        try:
            frames, written = convert_scene(scene, split_dir, png)
        except BadScene as e:
            report["bad_scenes"].append((name, str(e)))
            continue
        report["scenes"] += 1
        report["frames"] += frames
        report["bytes"] += written
        report["on_disk"].append(name)
    return report


# The paper's data-scaling study: the first 76, 304 and 1,216 of RealEstate10K's 4,866 training
# chunks, in file-name order, so that each size holds the smaller ones; Full is full_list.txt.
SCALING_SPLITS = {"little": 76, "medium": 304, "large": 1216}


def write_scaling_lists(split_dir, chunks, on_disk):
    """split_dir/<size>_list.txt for every size with chunks enough: the scenes of its first chunks,
    sorted as full_list.txt is -> {size: (chunks, scenes), or None where there are too few chunks}."""
    written = {}
    for size, n_chunks in SCALING_SPLITS.items():
        if len(chunks) < n_chunks:
            written[size] = None
            continue
        names = [name for chunk in chunks[:n_chunks] for name in on_disk.get(chunk, [])]
        metas = [split_dir / "metadata" / f"{name}.json" for name in names]
        written[size] = (n_chunks, write_list(split_dir / f"{size}_list.txt", metas))
    return written


def convert_re10k(src, out, split="all", png=False, workers=None):
    """Convert every chunk of SRC/<split>/ into OUT/<split>/; returns the run's summary."""
    src, out = Path(src), Path(out)
    splits = [s for s in ("train", "test") if (src / s).is_dir()] if split == "all" else [split]
    if not splits:
        raise FileNotFoundError(f"{src}: no train/ or test/ folder of .torch chunks in it")
    jobs = []
    for s in splits:
        if not (src / s).is_dir():
            raise FileNotFoundError(f"{src / s}: no such folder of .torch chunks")
        (out / s / "metadata").mkdir(parents=True, exist_ok=True)
        jobs += [(chunk, out / s, png) for chunk in sorted((src / s).glob("*.torch"))]

    start = time.time()
    summary = {"scenes": 0, "frames": 0, "bytes": 0, "done_before": 0, "bad_scenes": [], "bad_chunks": []}
    on_disk = {}
    for r in run_parallel(convert_chunk, jobs, workers, "chunks"):
        on_disk[r["chunk"]] = r["on_disk"]
        for key in ("scenes", "frames", "bytes", "done_before"):
            summary[key] += r[key]
        for name, why in r["bad_scenes"]:
            tqdm.write(f"warning: {r['chunk']}: skipped scene {name}: {why}", file=sys.stderr)
            summary["bad_scenes"].append((name, r["chunk"], why))
        if r["error"]:
            tqdm.write(f"warning: {r['chunk']}: skipped the chunk, it does not load ({r['error']})",
                       file=sys.stderr)
            summary["bad_chunks"].append((r["chunk"], r["error"]))
    summary["seconds"] = time.time() - start
    summary["listed"] = {s: write_full_list(out / s) for s in splits}
    if "train" in splits:  # an unreadable chunk still counts, with no scenes: the sizes stay nested
        train_chunks = [str(chunk) for chunk, split_dir, _ in jobs if split_dir.name == "train"]
        summary["scaling"] = write_scaling_lists(out / "train", train_chunks, on_disk)

    t = max(summary["seconds"], 1e-9)
    print(f"converted {summary['scenes']} scenes, {summary['frames']} frames, "
          f"{summary['bytes'] / 1e6:.1f} MB in {t:.1f} s ({summary['scenes'] / t:.2f} scenes/s, "
          f"{summary['frames'] / t:.1f} frames/s)")
    print(f"already converted before, skipped: {summary['done_before']} scenes")
    print(f"skipped {len(summary['bad_scenes'])} bad scenes and {len(summary['bad_chunks'])} unreadable "
          f"chunks")
    for name, chunk, why in summary["bad_scenes"]:
        print(f"  scene {name} of {chunk}: {why}")
    for chunk, why in summary["bad_chunks"]:
        print(f"  chunk {chunk}: {why}")
    for s, n in summary["listed"].items():
        print(f"{out / s / 'full_list.txt'}: {n} scenes")
    for size, counts in summary.get("scaling", {}).items():
        if counts:
            print(f"{out / 'train' / f'{size}_list.txt'}: the first {counts[0]} chunks, {counts[1]} scenes")
        else:
            print(f"{out / 'train' / f'{size}_list.txt'}: not written, {SCALING_SPLITS[size]} chunks needed "
                  f"and {src / 'train'} has {len(train_chunks)}")
    return summary


# -----------------------------------------------------------------------------
# Generated rooms, for training on a CPU in minutes
#
# Each scene is a box-shaped room with textured walls, floor and ceiling, a few boxes and balls,
# and a camera walking through it like in a real-estate video. World frame: z up, the floor at
# z = 0. Cameras are OpenCV (x right, y down, z forward). Pictures are drawn by a vectorised ray
# caster with Lambertian shading from one light overhead plus ambient light, no shadows.
#
# What makes it learnable by a tiny model: large, low-frequency textures in a few bold colours,
# geometry that shading makes readable, and camera motion between the two context views (tens of
# degrees of turning, a metre or two of walking) that makes copying a context view clearly wrong.

PLAIN, CHECKER, STRIPES, WAVES = range(4)  # texture kinds of the room's six faces
AMBIENT = 0.45
WALL_MEAN = 0.55  # every wall and floor colour's mean over R, G and B; the brightest channel stays below 1


@dataclass
class Room:
    lo: np.ndarray  # [3] the corner (x, y, 0)
    hi: np.ndarray  # [3] the opposite corner (x, y, ceiling height)
    face_kind: np.ndarray  # [6] texture of face 2 * axis + (0 at lo, 1 at hi)
    face_scale: np.ndarray  # [6] texture period, metres
    face_a: np.ndarray  # [6, 3] the two colours each texture mixes
    face_b: np.ndarray  # [6, 3]
    box_lo: np.ndarray  # [k, 3] axis-aligned boxes
    box_hi: np.ndarray  # [k, 3]
    box_color: np.ndarray  # [k, 3]
    ball_centre: np.ndarray  # [m, 3]
    ball_radius: np.ndarray  # [m]
    ball_color: np.ndarray  # [m, 3]

    def __post_init__(self):  # float32 draws twice as fast as float64, and is plenty precise here
        for name, value in vars(self).items():
            if value.dtype.kind == "f":
                setattr(self, name, value.astype(np.float32))


def camera_walk(rng, n):
    """A smooth walk of n frames -> camera centres [n, 3], yaw [n] and pitch [n] in radians.

    Speed, direction of travel and turning rate drift slowly (a sine of random phase each), and the
    camera looks around as it goes, so that between frames 25-45 apart it turns 14-78 degrees and
    walks 0.6-2.3 metres.
    """
    t = np.arange(n) / n

    def drift(mean, amplitude):
        return mean + amplitude * np.sin(2 * np.pi * (rng.uniform(0.3, 1.0) * t + rng.uniform()))

    turn = rng.choice([-1, 1]) * rng.uniform(0.8, 1.6)  # degrees per frame
    yaw = rng.uniform(0, 2 * np.pi) + np.cumsum(np.radians(drift(turn, 0.3 * abs(turn))))
    pitch = np.radians(drift(rng.uniform(-16, -4), 3))  # looking a little down, at the floor and furniture
    speed = drift(rng.uniform(0.025, 0.05), 0.005)  # metres per frame
    # Walk forwards or towards the side it turns to: the picture then slides one way. Walking to
    # the other side would orbit a point ahead and keep the picture almost still.
    travel = yaw + np.sign(turn) * drift(rng.uniform(0, np.pi / 2), 0.2)
    step = speed[:, None] * np.stack([np.cos(travel), np.sin(travel), np.zeros(n)], 1)
    centres = np.cumsum(step, 0) + [0.0, 0.0, rng.uniform(1.3, 1.7)]
    centres[:, 2] += drift(0.0, 0.03)  # a little bobbing
    # Looking around: yaw swings 15-25 degrees and pitch 3-8 on periods shorter than a context gap.
    # Without it a target's camera is the context views' interpolated, and a model need only learn
    # how far along it lies; the tiny model then learned that and hardly used its camera (README).
    frame = np.arange(n)

    def swing(degrees, shortest, longest):
        return np.radians(degrees) * np.sin(2 * np.pi * (frame / rng.uniform(shortest, longest) + rng.uniform()))

    return centres, yaw + swing(rng.uniform(15, 25), 30, 50), pitch + swing(rng.uniform(3, 8), 25, 50)


def camera_to_world(centre, yaw, pitch):
    """OpenCV camera looking along heading `yaw` (from +x towards +y), tilted up by `pitch` -> c2w [4, 4]."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(forward, right), forward], 1)  # columns: x, y (down), z
    c2w[:3, 3] = centre
    return c2w


def random_room(rng, walk):
    """A room around a camera walk [n, 3], its objects kept 0.6 m away from the walk's bounding box."""
    # Colours differ in hue only: each has the same mean over its channels, so no wall is brighter
    # than another. On walls of different brightness the tiny model took which half of a view was
    # brighter for the direction of a turn (README, "Where the yaw goes").
    palette = np.array([colorsys.hsv_to_rgb(rng.uniform(), 0.65, 0.8) for _ in range(6)])
    palette *= WALL_MEAN / palette.mean(1, keepdims=True)
    lo, hi = walk.min(0) - rng.uniform(1.5, 2.5, 3), walk.max(0) + rng.uniform(1.5, 2.5, 3)
    lo[2], hi[2] = 0.0, rng.uniform(2.5, 3.0)
    # Every face has a colour of its own, so that what is in view says where the camera looks, and a
    # large, faint pattern, so that a wall does not look the same from everywhere. Floor: checkers
    # or planks; ceiling: plain and pale.
    kind = np.array([*rng.integers(CHECKER, WAVES + 1, 4), rng.choice([CHECKER, STRIPES]), PLAIN])
    scale = np.array([*rng.uniform(0.6, 1.5, 4), rng.uniform(0.6, 1.2), 1.0])
    order = rng.permutation(6)
    a = palette[order]
    b = 0.85 * a + 0.15 * palette[np.roll(order, rng.integers(1, 6))]  # tinted towards another colour
    a[5] = b[5] = 0.85 + 0.15 * a[5]

    def free(lo_xy, hi_xy):  # keeps the camera 0.6 m away from every object
        return np.any(lo_xy - 0.6 > walk[:, :2].max(0)) or np.any(hi_xy + 0.6 < walk[:, :2].min(0))

    boxes, balls, n_boxes, n_balls = [], [], rng.integers(2, 5), rng.integers(1, 3)
    while len(boxes) < n_boxes:
        size = np.array([*rng.uniform(0.4, 0.9, 2), rng.uniform(0.4, 1.4)])
        corner = np.array([*rng.uniform(lo[:2], hi[:2] - size[:2]), 0.0])
        if free(corner[:2], corner[:2] + size[:2]):
            boxes.append((corner, corner + size, colorsys.hsv_to_rgb(rng.uniform(), 0.8, 0.9)))
    while len(balls) < n_balls:
        r = rng.uniform(0.2, 0.45)
        centre = np.array([*rng.uniform(lo[:2] + r, hi[:2] - r), rng.uniform(r, 1.8)])
        if free(centre[:2] - r, centre[:2] + r):
            balls.append((centre, r, colorsys.hsv_to_rgb(rng.uniform(), 0.8, 0.9)))
    box_arrays = [np.array([x[k] for x in boxes]) for k in range(3)]  # lows, highs, colours
    ball_arrays = [np.array([x[k] for x in balls]) for k in range(3)]  # centres, radii, colours
    return Room(lo, hi, kind, scale, a, b, *box_arrays, *ball_arrays)


def random_scene(rng, n, w, h):
    """A room, the c2w [n, 4, 4] of a walk through it, and its intrinsics (fx, fy, cx, cy) in pixels."""
    centres, yaw, pitch = camera_walk(rng, n)
    room = random_room(rng, centres)
    c2w = np.stack([camera_to_world(c, y, p) for c, y, p in zip(centres, yaw, pitch)])
    f = rng.uniform(0.55, 0.7) * w  # 77-85 degrees across the frame, like RealEstate10K
    return room, c2w, (f, f, w / 2, h / 2)


def cast(room, o, d):
    """Rays from o [3] along unit directions d [3, n] -> first hits: points, normals and albedo, each [3, n].

    The nearest hit so far is kept while going through the room, then each box, then each ball.
    Arrays are [3, n] rather than [n, 3] because numpy reduces over a short leading axis much faster.
    """
    o = o[:, None]  # [3, 1]
    d = np.where(np.abs(d) < 1e-12, 1e-12, d)  # axis-parallel rays must not divide by zero
    # the room: the camera is inside, so each ray leaves it through the face whose plane it meets first
    t_planes = (np.where(d > 0, room.hi[:, None], room.lo[:, None]) - o) / d  # [3, n] exit plane of each axis
    t = t_planes.min(0)
    axis = np.where(t_planes[0] == t, 0, np.where(t_planes[1] == t, 1, 2))  # [n] of the face hit
    on = axis == np.arange(3)[:, None]  # [3, n] one-hot
    normal = -np.sign(d) * on
    albedo = room_texture(room, o + t * d, axis, (on & (d > 0)).any(0))
    for lo, hi, color in zip(room.box_lo, room.box_hi, room.box_color):
        t1, t2 = (lo[:, None] - o) / d, (hi[:, None] - o) / d  # [3, n] the slabs between the box's planes
        t_near = np.minimum(t1, t2)
        t_in = t_near.max(0)  # entering the last slab enters the box
        closer = (t_in < np.maximum(t1, t2).min(0)) & (t_in > 0) & (t_in < t)
        t = np.where(closer, t_in, t)
        normal = np.where(closer, -np.sign(d) * (t_near == t_in), normal)
        albedo = np.where(closer, color[:, None], albedo)
    for centre, radius, color in zip(room.ball_centre, room.ball_radius, room.ball_color):
        oc = o[:, 0] - centre
        b = oc @ d  # [n]
        disc = b**2 - (oc @ oc - radius**2)
        t_in = -b - np.sqrt(np.maximum(disc, 0))  # the camera is outside every ball: the nearer root
        closer = (disc > 0) & (t_in > 0) & (t_in < t)
        t = np.where(closer, t_in, t)
        normal = np.where(closer, (o + t * d - centre[:, None]) / radius, normal)
        albedo = np.where(closer, color[:, None], albedo)
    return o + t * d, normal, albedo


def room_texture(room, p, axis, at_hi):
    """Albedo [3, n] of the room's faces at points p [3, n], on faces of axis [n], at the hi side or not
    [n]."""
    face = 2 * axis + at_hi  # [n] in 0..5
    u = np.where(axis == 0, p[1], p[0])  # along a wall, or x on the floor and ceiling
    v = np.where(axis == 2, p[1], p[2])  # up a wall, or y on the floor and ceiling
    s = room.face_scale[face]
    mix = np.choose(room.face_kind[face], [np.zeros_like(u), (np.floor(u / s) + np.floor(v / s)) % 2,
                                           np.floor(u / s) % 2, 0.5 + 0.5 * np.sin(np.pi * u / s)])
    a, b = np.take(room.face_a, face, 0).T, np.take(room.face_b, face, 0).T  # [3, n]
    return a + mix * (b - a)


def shade(normal, albedo):
    """Lambertian: ambient light plus a light straight overhead on surfaces that face up. Overhead, so
    that every wall is lit alike and a wall's shade says nothing of the way it faces: with a light
    from a random side the tiny model met fewer goals (README, the tries). The cosine between the
    light and a unit normal [3, n] is then the normal's z."""
    return albedo * (AMBIENT + (1 - AMBIENT) * np.clip(normal[2], 0, None))


def pixel_rays(fxfycxcy, w, h):
    """Unit camera-space directions through the pixel centres of a w x h image -> [3, h*w], raster order."""
    fx, fy, cx, cy = fxfycxcy
    x, y = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)  # [h, w] each
    d = np.stack([(x.ravel() - cx) / fx, (y.ravel() - cy) / fy, np.ones(h * w)])
    return d / np.linalg.norm(d, axis=0)


def render(room, c2w, fxfycxcy, w, h, ss=2, chunk=8192):
    """The w x h pictures seen by cameras c2w [v, 4, 4], averaging ss x ss rays per pixel -> uint8
    [v, h, w, 3].

    Rays go through the caster in chunks, small enough for its arrays to stay in the CPU's cache
    (25% faster than all at once).
    """
    rays = pixel_rays([k * ss for k in fxfycxcy], w * ss, h * ss)
    frames = []
    for pose in c2w:
        o, d = pose[:3, 3].astype(np.float32), (pose[:3, :3] @ rays).astype(np.float32)
        rgb = np.concatenate([shade(*cast(room, o, d[:, i:i + chunk])[1:])
                              for i in range(0, d.shape[1], chunk)], 1)
        frames.append(rgb.reshape(3, h, ss, w, ss).mean((2, 4)))  # [3, h*ss*w*ss] -> [3, h, w]
    frames = np.round(255 * np.clip(np.stack(frames), 0, 1)).astype(np.uint8)  # [v, 3, h, w]
    return frames.transpose(0, 2, 3, 1)  # [v, 3, h, w] -> [v, h, w, 3]


def make_scene(job):
    """Render and save one generated scene; returns its number of frames."""
    split_dir, name, seed, n, w, h = job
    room, c2w, fxfycxcy = random_scene(np.random.default_rng(seed), n, w, h)
    frames = []
    for i, image in enumerate(render(room, c2w, fxfycxcy, w, h)):
        path = split_dir / "images" / name / f"{i:05d}.png"
        Image.fromarray(image).save(path)
        frames.append({"image_path": str(path.absolute()), "fxfycxcy": list(fxfycxcy),
                       "w2c": np.linalg.inv(c2w[i]).tolist()})
    write_metadata(split_dir, name, frames)
    return n


def extrapolation_index(rng, names, n, reach=12):
    """{scene: {"context": [i, j], "target": [a, b, c]}} with every target outside i..j, up to `reach`
    frames before i or after j: the release's extrapolation.json, in miniature. Same scenes nulled
    as in evaluation_index."""
    index = {}
    for k, name in enumerate(names):
        if k % 20 == 19:
            index[name] = None
            continue
        gap = int(rng.integers(min(25, n - 4), min(35, n - 4) + 1))  # room for 3 targets outside
        i = int(rng.integers(0, n - gap))
        outside = [f for f in range(i - reach, i + gap + 1 + reach) if 0 <= f < n and not i <= f <= i + gap]
        targets = sorted(int(x) for x in rng.choice(outside, 3, replace=False))
        index[name] = {"context": [i, i + gap], "target": targets}
    return index


def write_synthetic_scaling_lists(split_dir):
    """little/medium/large_list.txt beside full_list.txt: the first 1/64, 1/16 and 1/4 of the scenes in
    name order, nested, as prepare.py re10k nests its chunks -> {size: scenes}. A size that would
    hold no scene is left out (0)."""
    metas = sorted((split_dir / "metadata").glob("*.json"))
    sizes = {}
    for size, share in (("little", 64), ("medium", 16), ("large", 4)):
        sizes[size] = len(metas) // share
        if sizes[size]:
            write_list(split_dir / f"{size}_list.txt", metas[:sizes[size]])
    return sizes


def evaluation_index(rng, names, n):
    """{scene: {"context": [i, j], "target": [a, b, c]}} with the targets in the middle half of i..j.

    Middle targets are where neither context view is a good stand-in, so that the held-out score
    measures view synthesis rather than copying: near a context view, copying it scores well.
    """
    index = {}
    for k, name in enumerate(names):
        if k % 20 == 19:  # the official index maps some scenes to null too
            index[name] = None
            continue
        gap = int(rng.integers(25, min(45, n - 1) + 1))
        i = int(rng.integers(0, n - gap))
        middle = np.arange(i + gap // 4, i + gap - gap // 4)
        targets = sorted(int(x) for x in rng.choice(middle, 3, replace=False))
        index[name] = {"context": [i, i + gap], "target": targets}
    return index


RANGE = tuple(Fraction(k, 4) for k in range(5))  # range_index.json: the context views and three frames between
SWEEP = tuple(Fraction(k, 10) for k in range(11))  # sweep_index.json: nine frames between, and the ends


def range_index(index, fractions=RANGE):
    """{scene: views} with the context pair of each entry of `index` and, as targets, the frames at
    these fractions of the way from its first context frame to its second, rounded to a frame.
    Fractions 0 and 1 make the context views targets ("context_targets": true says it is meant):
    rendered back, they show whether the model reproduces what it was given; those between, whether
    it interpolates everywhere."""
    out = {}
    for name, views in index.items():
        if views is None:
            out[name] = None
            continue
        i, j = views["context"]
        nearest = {i + math.floor(f * (j - i) + Fraction(1, 2)) for f in fractions}  # a half frame rounds up
        out[name] = {"context": [i, j], "target": sorted(nearest), "context_targets": True}
    return out


# -----------------------------------------------------------------------------
# The transfer split: room B seen along room A's camera path, rendered exactly


def moved_cameras(b0, a0, a_targets):
    """Room A's target cameras a_targets [v, 4, 4] (c2w) carried into room B: each keeps its place and
    heading relative to A's context view 0 (a0), now relative to B's (b0) -> C_B0 C_A0^-1 C_At [v, 4, 4].
    Both rooms are in metres, so a step of 1 m in A is a step of 1 m in B."""
    return b0 @ np.linalg.inv(a0) @ a_targets


def camera_clear(room, centre, margin=0.6):
    """Whether a camera centre [3] lies inside the room and `margin` metres from its walls, floor,
    ceiling and every object (the walks keep 0.6 m; the caster assumes a camera outside every object)."""
    if np.any(centre < room.lo + margin) or np.any(centre > room.hi - margin):
        return False
    boxes = zip(room.box_lo - margin, room.box_hi + margin)
    if any(np.all(centre > lo) and np.all(centre < hi) for lo, hi in boxes):
        return False
    return all(np.linalg.norm(centre - c) >= r + margin for c, r in zip(room.ball_centre, room.ball_radius))


def transfer_pair(split_dir, a, b, w, h):
    """Write scene "<B>_along_<A>" of the transfer split, or return None when a moved camera would leave
    B's room or come near its objects. a, b: (name, room, c2w [n, 4, 4], fxfycxcy, evaluation index entry).
    Its frames: 0, 1 B's context views; 2.. B at A's target cameras moved into B (moved_cameras, B's
    intrinsics); then A's context views and targets, in A's own world, for the model to estimate A's
    path from -> (name, its index entry)."""
    (a_name, a_room, a_c2w, a_k, a_views), (b_name, b_room, b_c2w, b_k, b_views) = a, b
    moved = moved_cameras(b_c2w[b_views["context"][0]], a_c2w[a_views["context"][0]], a_c2w[a_views["target"]])
    if not all(camera_clear(b_room, c[:3, 3]) for c in moved):
        return None
    a_frames = a_views["context"] + a_views["target"]
    cameras = [(b_room, b_c2w[b_views["context"]], b_k), (b_room, moved, b_k), (a_room, a_c2w[a_frames], a_k)]
    name = f"{b_name}_along_{a_name}"
    (split_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    frames = []
    for room, c2w, k in cameras:
        for pose, image in zip(c2w, render(room, c2w, k, w, h)):
            path = split_dir / "images" / name / f"{len(frames):05d}.png"
            Image.fromarray(image).save(path)
            frames.append({"image_path": str(path.absolute()), "fxfycxcy": list(k),
                           "w2c": np.linalg.inv(pose).tolist()})
    write_metadata(split_dir, name, frames)
    n_b, n_a = len(b_views["context"]), len(a_views["context"])
    first_a = n_b + len(moved)  # the frames written above: B's context views, the moved ones, A's
    entry = {"context": list(range(n_b)), "target": list(range(n_b, first_a)),
             "transfer": {"context": list(range(first_a, first_a + n_a)),
                          "target": list(range(first_a + n_a, len(frames)))},
             "rooms": {"b": b_name, "b_context": b_views["context"], "a": a_name, "a_context": a_views["context"],
                       "a_target": a_views["target"]}}
    return name, entry


def transfer_split(split_dir, scenes, w, h):
    """test_transfer/: for each room B of the evaluation index (scenes: [(name, room, c2w, fxfycxcy,
    entry)] in name order), the rooms after it are tried as A, cyclically, until one keeps every moved
    camera clear -> a line saying how many pairs were tried and kept. Writes the layout of the other
    splits plus transfer_index.json, whose entries score B's moved frames as targets of B's context
    pair and name A's frames under "transfer". The index is written last: a split that has it is
    complete, and a stopped one is made again whole (a few hundred frames)."""
    if (split_dir / "transfer_index.json").exists():
        return f"{len(json.loads((split_dir / 'transfer_index.json').read_text()))} transfer pairs in {split_dir}"
    shutil.rmtree(split_dir, ignore_errors=True)
    (split_dir / "metadata").mkdir(parents=True)
    index, tried = {}, 0
    for k, b in enumerate(scenes):
        for a in scenes[k + 1:] + scenes[:k]:
            tried += 1
            made = transfer_pair(split_dir, a, b, w, h)
            if made:
                index[made[0]] = made[1]
                break
    write_full_list(split_dir)
    l3d.write_atomic(split_dir / "transfer_index.json", json.dumps(index, indent=1))
    return f"{len(index)} transfer pairs (of {tried} tried) in {split_dir}"


def make_synthetic(out="data/synthetic", size=(56, 32), frames=60, train_scenes=1000, test_scenes=40, seed=0,
                   workers=None):
    """Generate OUT/train and OUT/test (and OUT/test/evaluation_index.json), resuming a stopped run."""
    out, (w, h) = Path(out), size
    patch = l3d.Config.tiny().patch_size
    if min(w, h) < patch:  # checked before synthetic.json is written, so that a corrected rerun is taken
        raise ValueError(f"size {w}x{h}: frames need at least one patch of the tiny model ({patch} pixels) a side")
    for flag, n in (("train-scenes", train_scenes), ("test-scenes", test_scenes)):
        if n < 0:
            raise ValueError(f"--{flag} {n}: a number of scenes cannot be negative")
    if frames < 27:
        raise ValueError(f"frames={frames}: training needs a context gap of at least 25 and 6 frames inside "
                         f"it, so 27+")
    settings = {"size": [w, h], "frames": frames, "train_scenes": train_scenes, "test_scenes": test_scenes,
                "seed": seed}
    stamp = out / "synthetic.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise ValueError(f"{stamp}: {out} was generated with other settings ({stamp.read_text()}); "
                              f"delete it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    l3d.write_atomic(stamp, json.dumps(settings))

    start, jobs, names = time.time(), [], {}
    seeds = {}  # scene name -> the seed of its room and walk: (seed, 0 for train or 1 for test, number)
    for split_id, (split, count) in enumerate((("train", train_scenes), ("test", test_scenes))):
        names[split] = [f"{split}_{k:05d}" for k in range(count)]
        (out / split / "metadata").mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(names[split]):
            seeds[name] = (seed, split_id, k)
            (out / split / "images" / name).mkdir(parents=True, exist_ok=True)
            if not (out / split / "metadata" / f"{name}.json").exists():
                jobs.append((out / split, name, seeds[name], frames, w, h))
    n_frames = sum(run_parallel(make_scene, jobs, workers, "scenes"))
    for split in names:
        write_full_list(out / split)
    sizes = write_synthetic_scaling_lists(out / "train")
    index = evaluation_index(np.random.default_rng((seed, 2)), names["test"], frames)
    l3d.write_atomic(out / "test" / "evaluation_index.json", json.dumps(index, indent=1))
    for name, fractions in (("range_index.json", RANGE), ("sweep_index.json", SWEEP)):
        l3d.write_atomic(out / "test" / name, json.dumps(range_index(index, fractions), indent=1))
    scenes = [(name, *random_scene(np.random.default_rng(seeds[name]), frames, w, h), index[name])
              for name in names["test"] if index[name]]
    transfer = "no transfer split (it needs two test rooms)"
    if len(scenes) > 1:
        transfer = transfer_split(out / "test_transfer", scenes, w, h)
    index = extrapolation_index(np.random.default_rng((seed, 3)), names["test"], frames)
    l3d.write_atomic(out / "test" / "extrapolation_index.json", json.dumps(index, indent=1))
    print(f"generated {len(jobs)} scenes ({n_frames} frames of {w}x{h}) in {time.time() - start:.1f} s "
          f"into {out}/train and {out}/test; training sizes little, medium, large, full: "
          f"{', '.join(str(n) for n in sizes.values())}, {train_scenes}; {transfer}")


# -----------------------------------------------------------------------------
# Command line


def parse_size(text):
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 112x64") from None
    return w, h


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("re10k", help="convert pixelSplat's RealEstate10K .torch chunks")
    p.add_argument("--src", required=True, help="folder with train/ and/or test/ of .torch chunks")
    p.add_argument("--out", required=True, help="output folder: OUT/<split>/{images,metadata,full_list.txt}")
    p.add_argument("--split", choices=["train", "test", "all"], default="all", help="all: every split in SRC")
    p.add_argument("--png", action="store_true", help="decode frames to PNG (the release's layout) instead "
                   "of keeping their JPEG bytes")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p = commands.add_parser("synthetic", help="generate rooms for CPU training")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--size", type=parse_size, default=(56, 32), help="WIDTHxHEIGHT of the frames")
    p.add_argument("--frames", type=int, default=60, help="frames per scene (27 or more)")
    p.add_argument("--train-scenes", type=int, default=1000)
    p.add_argument("--test-scenes", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    try:
        if args.command == "re10k":
            convert_re10k(args.src, args.out, args.split, args.png, args.workers)
        else:
            make_synthetic(args.out, args.size, args.frames, args.train_scenes, args.test_scenes, args.seed,
                           args.workers)
    except (ValueError, OSError) as e:  # the message names the file and the problem
        raise SystemExit(f"prepare.py: {e}") from None


if __name__ == "__main__":
    main()
