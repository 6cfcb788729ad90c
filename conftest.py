"""Helpers shared by the test files: tiny models and inputs, processed-layout scenes, torchrun."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import l3d

REPO = Path(__file__).resolve().parent


def tiny_model(seed=0):
    """The tiny UP-LVSM with every weight moved off its init, so that no tensor is trivially 0 or 1."""
    torch.manual_seed(seed)
    model = l3d.UPLVSM(l3d.Config.tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_inputs(b=2, v_tgt=3, seed=1):
    """Random context and target images for the tiny config, with off-centre, non-square intrinsics."""
    g = torch.Generator().manual_seed(seed)
    R = l3d.Config.tiny().image_size
    k = torch.tensor([0.9 * R, 1.1 * R, R / 2 + 1.5, R / 2 - 2.0])
    return (torch.rand(b, 2, 3, R, R, generator=g), k.expand(b, 2, 4).clone(),
            torch.rand(b, v_tgt, 3, R, R, generator=g), k.expand(b, v_tgt, 4).clone())


def write_scenes(root, frame_counts, width=112, height=64, seed=0):
    """A processed split of random frames, {scene name: frame count} -> root/{images,metadata},
    root/full_list.txt (returned), with intrinsics centred on the frame and identity cameras."""
    rng = np.random.default_rng(seed)
    metas = []
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for name, n_frames in frame_counts.items():
        (root / "images" / name).mkdir(parents=True)
        frames = []
        for i in range(n_frames):
            path = root / "images" / name / f"{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
            frames.append({"image_path": str(path), "fxfycxcy": [60.0, 60.0, width / 2, height / 2],
                           "w2c": np.eye(4).tolist()})
        meta = root / "metadata" / f"{name}.json"
        meta.write_text(json.dumps({"scene_name": name, "frames": frames}))
        metas.append(str(meta))
    (root / "full_list.txt").write_text("\n".join(metas) + "\n")
    return root / "full_list.txt"


def torchrun(nproc, *args):
    """The command and environment of a torchrun launch from inside a test: a standalone rendezvous,
    and none of the variables of a torchrun that may have started pytest itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, args)]
    return cmd, env
