"""Tests of l3d.py, on the CPU with tiny configs, and a few on a CUDA GPU where there is one. Every
check compares against maths written here or against the same computation done another way."""

import csv
import functools
import http.server
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import l3d

from conftest import REPO, tiny_inputs, tiny_model, torchrun, write_scenes

RELEASE_KEYS = REPO / "assets" / "uplvsm_state_dict_keys.txt"  # names and shapes in uplvsm_x224.pt


# --- cameras --------------------------------------------------------------------------------------


def rodrigues(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def test_quaternion_to_rotation_known_rotations():
    # 90 degrees about z sends x to y: scalar-last (x, y, z, w) = (0, 0, sin 45, cos 45)
    q = torch.tensor([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)], dtype=torch.float64)
    expected = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)
    np.testing.assert_allclose(l3d.quat_to_rotation(q).numpy(), expected, atol=1e-12)
    # the identity, and a non-unit quaternion giving the same rotation as its unit version
    np.testing.assert_allclose(l3d.quat_to_rotation(torch.tensor([0, 0, 0, 3.0], dtype=torch.float64)).numpy(), np.eye(3), atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        axis, angle = rng.normal(size=3), rng.uniform(-math.pi, math.pi)
        unit = axis / np.linalg.norm(axis)
        q = np.concatenate([unit * math.sin(angle / 2), [math.cos(angle / 2)]]) * rng.uniform(0.3, 3.0)
        got = l3d.quat_to_rotation(torch.tensor(q)).numpy()
        np.testing.assert_allclose(got, rodrigues(axis, angle), atol=1e-12)


def test_pose_to_c2w():
    pose = torch.tensor([[1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = np.eye(4)
    expected[:3, 3] = [1.0, -2.0, 0.5]
    np.testing.assert_allclose(l3d.pose_to_c2w(pose)[0].numpy(), expected)


def test_plucker_rays_hand_computed_camera():
    # camera at (1, 2, 3), turned 90 degrees about the world y axis: its forward z looks along world +x
    rot = rodrigues([0, 1, 0], math.pi / 2)
    np.testing.assert_allclose(rot @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot, [1, 2, 3]
    fx, fy, cx, cy, h, w = 10.0, 20.0, 3.0, 2.0, 4, 6
    rays = l3d.plucker_rays(torch.tensor(c2w, dtype=torch.float32)[None, None],
                            torch.tensor([[[fx, fy, cx, cy]]]), h, w)[0, 0].double().numpy()  # [6, h, w]
    assert rays.shape == (6, h, w)
    o = np.array([1.0, 2.0, 3.0])
    for y, x in [(0, 0), (1, 2), (3, 5), (2, 4)]:
        d_cam = np.array([(x + 0.5 - cx) / fx, (y + 0.5 - cy) / fy, 1.0])
        d = rot @ d_cam
        d /= np.linalg.norm(d)
        np.testing.assert_allclose(rays[3:, y, x], d, atol=1e-6)
        np.testing.assert_allclose(rays[:3, y, x], np.cross(o, d), atol=1e-5)
    # the pixel at the principal point looks straight down the camera's z axis, i.e. world +x
    rays = l3d.plucker_rays(torch.tensor(c2w, dtype=torch.float32)[None, None],
                            torch.tensor([[[fx, fy, 2.5, 1.5]]]), h, w)[0, 0]
    np.testing.assert_allclose(rays[3:, 1, 2].numpy(), [1, 0, 0], atol=1e-6)


# --- patchify -------------------------------------------------------------------------------------


def test_patchify_order_hand_written():
    # x[c, row, col] = 100 c + 10 row + col on a 4x4 image with 2x2 patches
    c, h, w, p = 2, 4, 4, 2
    x = torch.tensor([[[100 * ci + 10 * r + col for col in range(w)] for r in range(h)] for ci in range(c)], dtype=torch.float32)
    tokens = l3d.patchify(x[None, None], p)[0, 0]
    assert tokens.shape == (4, 8)
    # patch 1 is the top-right patch (raster order); inside it (row, column, channel)
    expected_patch1 = [2, 102, 3, 103, 12, 112, 13, 113]
    assert tokens[1].tolist() == expected_patch1
    # patch 2 starts the second patch row
    assert tokens[2].tolist() == [20, 120, 21, 121, 30, 130, 31, 131]


def test_unpatchify_round_trip():
    x = torch.randn(2, 3, 6, 24, 16)
    np.testing.assert_array_equal(l3d.unpatchify(l3d.patchify(x, 8), 8, 24, 16).numpy(), x.numpy())


# --- transformer block ----------------------------------------------------------------------------


def reference_block(x, block, heads, dino):
    """The block in float64 numpy: pre-norm, RMS-normalised q and k, softmax(q k^T / sqrt(d)) v."""
    P = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    eps = 1e-6 if dino else 1e-5

    def layer_norm(t, name):
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + eps)
        return t * P[name + ".weight"] + (P[name + ".bias"] if dino else 0)

    def linear(t, name):
        return t @ P[name + ".weight"].T + (P[name + ".bias"] if dino else 0)

    def rms(t, weight):
        return t / np.sqrt((t ** 2).mean(-1, keepdims=True) + 1e-3) * weight

    gelu = np.vectorize(lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2))))
    x = x.double().numpy()
    n, d = x.shape[-2:]
    hd = d // heads
    qkv = linear(layer_norm(x, "norm1"), "attn.qkv")
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for h in range(heads):
            q = rms(qkv[b, :, h * hd:(h + 1) * hd], P["attn.q_norm.weight"])
            k = rms(qkv[b, :, d + h * hd:d + (h + 1) * hd], P["attn.k_norm.weight"])
            v = qkv[b, :, 2 * d + h * hd:2 * d + (h + 1) * hd]
            s = q @ k.T / math.sqrt(hd)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h * hd:(h + 1) * hd] = (a / a.sum(-1, keepdims=True)) @ v
    attn = linear(out, "attn.proj")
    x = x + (attn * P["ls1.gamma"] if dino else attn)
    mlp = linear(gelu(linear(layer_norm(x, "norm2"), "mlp.fc1")), "mlp.fc2")
    return x + (mlp * P["ls2.gamma"] if dino else mlp)


@pytest.mark.parametrize("dino", [False, True])
def test_block_matches_float64_attention(dino):
    torch.manual_seed(0)
    block = l3d.Block(32, 8, dino=dino)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 7, 32)
    got = block(x).detach().double().numpy()
    np.testing.assert_allclose(got, reference_block(x, block, heads=4, dino=dino), atol=2e-5, rtol=1e-5)


# --- position embeddings --------------------------------------------------------------------------


def antialiased_bicubic_matrix(n_in, n_out, a=-0.5):
    """PIL-style resampling weights: the cubic kernel stretched by the downscale factor, rows normalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        for j in range(n_in):
            t = abs((j + 0.5 - (i + 0.5) * scale) / stretch)
            weights[i, j] = ((a + 2) * t - (a + 3)) * t * t + 1 if t < 1 else ((((t - 5) * t + 8) * t - 4) * a if t < 2 else 0)
        weights[i] /= weights[i].sum()
    return weights


def test_pos_embed_resize_identity_and_bicubic_antialias():
    pos = torch.randn(1, 37 * 37, 12)
    assert l3d.resize_pos_embed(pos, 37, 37) is pos
    for g_out in (16, 20, 45):
        got = l3d.resize_pos_embed(pos, g_out, g_out)[0].double().numpy().reshape(g_out, g_out, 12)
        m = antialiased_bicubic_matrix(37, g_out)
        expected = np.einsum("ij,jkc,lk->ilc", m, pos[0].double().numpy().reshape(37, 37, 12), m)
        np.testing.assert_allclose(got, expected, atol=2e-5)


# --- loading released checkpoints ------------------------------------------------------------------


def to_release_name(name):
    """l3d parameter name -> the release's, written out independently of l3d's own table."""
    rules = [
        (r"^tokenizer\.patch_embed\.(weight|bias)$", r"image_tokenizer.1.dino_vit.patch_embed.proj.\1"),
        (r"^tokenizer\.", "image_tokenizer.1.dino_vit."),
        (r"^latents$", "n_light_field_latent"),
        (r"^canonical_rays\.", "canonical_pose_tokenizer.1."),
        (r"^target_rays\.", "target_pose_tokenizer.1."),
        (r"^decoder_norm_in\.", "transformer_input_layernorm_decoder."),
        (r"^decoder_norm_out\.", "image_token_decoder.0."),
        (r"^to_pixels\.", "image_token_decoder.1."),
        (r"^translation_head\.", "estimator.absT_head."),
        (r"^rotation_head\.", "estimator.quaR_head."),
        (r"^encoder\.", "transformer_encoder."),
        (r"^decoder\.", "transformer_decoder."),
        (r"^estimator\.(\d)", r"estimator.transformer_estimator.\1"),
        (r"^norm_in\.", "transformer_input_layernorm."),  # PT-LVSM's
        (r"^blocks\.", "transformer_blocks."),  # PT-LVSM's
    ]
    for pattern, repl in rules:
        if re.search(pattern, name):
            name = re.sub(pattern, repl, name)
            break
    if not name.startswith("image_tokenizer"):
        name = (name.replace("attn.qkv.", "attn.to_qkv.").replace("attn.proj.", "attn.fc.")
                .replace("mlp.fc1.", "mlp.mlp.0.").replace("mlp.fc2.", "mlp.mlp.2."))
    return name


def release_state_dict(model):
    return {to_release_name(k): v.clone() for k, v in model.state_dict().items()}


def test_release_names_map_onto_the_paper_model_and_load_by_name_over_http(tmp_path, monkeypatch):
    published = {}
    for line in RELEASE_KEYS.read_text().splitlines():
        name, shape = line.split("\t")
        published[name] = torch.empty([int(s) for s in shape.strip("[]").split(",")], device="meta")
    model = l3d.UPLVSM(l3d.Config.paper(224))
    ours = l3d.rename(published, l3d.RELEASE_PREFIXES, l3d.RELEASE_LAYERS)  # l3d's own table
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 260_132_743
    assert sum(p.numel() for p in model.tokenizer.parameters()) == 86_584_320
    # a release-named file of the paper's model, served over HTTP, loads by name into the cache, weights
    # unchanged, at the name's image size
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": release_state_dict(model)}, served / "uplvsm_x518.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("L3D_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(l3d, "CACHE_DIR", tmp_path / "cache")
    try:
        loaded = l3d.load_model("x518")
    finally:
        server.shutdown()
    assert loaded.config == l3d.Config.paper(518)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["uplvsm_x518.pt"]
    assert l3d.load_model("x518").config == l3d.Config.paper(518)  # again, with the server gone: from the cache


def test_release_checkpoint_loads_and_reproduces_outputs(tmp_path, capsys):
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        render, pose = model(*inputs)
    sd = release_state_dict(model)
    sd["loss_computer.perceptual_loss_module.vgg.features.0.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "uplvsm_tiny.pt"
    torch.save({"model": sd, "optimizer": {}, "fwdbwd_pass_step": 7}, path)
    loaded = l3d.load_model(str(path), config=model.config)
    assert "ignored 1 tensor" in capsys.readouterr().out
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        render2, pose2 = loaded(*inputs)
    np.testing.assert_array_equal(render2.numpy(), render.numpy())
    np.testing.assert_array_equal(pose2.numpy(), pose.numpy())
    # release files do not record their resolution: the error says what to pass
    with pytest.raises(ValueError, match="res=224"):
        l3d.load_model({"model": sd})


# --- PT-LVSM --------------------------------------------------------------------------------------


def plucker_numpy(c2w, fxfycxcy, R):
    """Plucker rays of every pixel, float64 -> [6, R, R]: cross(origin, direction), unit direction."""
    fx, fy, cx, cy = fxfycxcy
    ys, xs = np.meshgrid(np.arange(R) + 0.5, np.arange(R) + 0.5, indexing="ij")
    d = np.stack([(xs - cx) / fx, (ys - cy) / fy, np.ones_like(xs)], -1) @ c2w[:3, :3].T  # [R, R, 3]
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return np.concatenate([np.cross(c2w[:3, 3], d), d], -1).transpose(2, 0, 1)


def patches_numpy(x, p):
    """[C, R, R] -> [(R/p)^2, p*p*C]: patches in raster order, each (row, column, channel)."""
    c, r, _ = x.shape
    return x.reshape(c, r // p, p, r // p, p).transpose(1, 3, 2, 4, 0).reshape((r // p) ** 2, p * p * c)


def test_ptlvsm_release_names_load_and_forward_matches_float64():
    torch.manual_seed(0)
    cfg = l3d.Config.tiny("ptlvsm")
    model = l3d.PTLVSM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = release_state_dict(model)
    assert "transformer_blocks.5.attn.to_qkv.weight" in sd and "transformer_input_layernorm.weight" in sd
    loaded = l3d.load_model({"model": sd}, config=cfg)
    assert isinstance(loaded, l3d.PTLVSM)
    ctx, ctx_k, tgt, tgt_k = tiny_inputs(b=1, v_tgt=2)
    c2w = torch.tensor(np.stack([np.eye(4)] * 4))
    for i, (axis, angle, t) in enumerate([([0, 1, 0], 0.3, [0.2, 0, 0.1]), ([1, 0, 0], -0.2, [-0.3, 0.1, 0]),
                                          ([0, 0, 1], 0.5, [0.1, -0.2, 0.3]), ([1, 1, 0], 0.4, [0, 0.2, -0.1])]):
        c2w[i, :3, :3], c2w[i, :3, 3] = torch.tensor(rodrigues(axis, angle)), torch.tensor(t)
    c2w = c2w.float()
    with torch.no_grad():
        render, _ = loaded(ctx, ctx_k, tgt, tgt_k, c2w[None, :2], c2w[None, 2:])
        tokens = loaded.tokenizer(ctx)[0].double().numpy()  # [2, n, d]: the tokenizer is checked with UP-LVSM
    # the rest in float64, from the weights as the release names them
    W = {k: v.double().numpy() for k, v in sd.items()}
    R, p, n = cfg.image_size, cfg.patch_size, tokens.shape[1]

    def layer_norm(x, w):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w

    c2w64, k64 = c2w.double().numpy(), ctx_k[0].double().numpy()
    marker = patches_numpy(plucker_numpy(c2w64[0], k64[0], R), p) @ W["canonical_pose_tokenizer.1.weight"].T
    context = np.concatenate([tokens[0] + marker, tokens[1]])  # [2n, d]
    expected = []
    for j in range(2):
        target = patches_numpy(plucker_numpy(c2w64[2 + j], tgt_k[0, j].double().numpy(), R), p)
        x = np.concatenate([context, target @ W["target_pose_tokenizer.1.weight"].T])[None]  # [1, 3n, d]
        x = torch.tensor(layer_norm(x, W["transformer_input_layernorm.weight"]))
        for block in loaded.blocks:
            x = torch.tensor(reference_block(x, block, heads=cfg.dim // cfg.head_dim, dino=False))
        out = layer_norm(x[0, -n:].numpy(), W["image_token_decoder.0.weight"]) @ W["image_token_decoder.1.weight"].T
        rgb = 1 / (1 + np.exp(-out))  # [n, p*p*3]
        expected.append(rgb.reshape(R // p, R // p, p, p, 3).transpose(4, 0, 2, 1, 3).reshape(3, R, R))
    error = np.abs(render[0].double().numpy() - np.stack(expected)).max()
    print(f"PT-LVSM against the float64 reference: max |render difference| {error:.2e}")
    assert error < 1e-5, error


def test_lvsm_marks_every_context_view_with_its_own_rays():
    """LVSM's rung: each context view's tokens plus the ray tokens of its own camera, built here in
    float64; PT-LVSM with the same weights marks view 0 only."""
    torch.manual_seed(0)
    cfg = l3d.Config.tiny("lvsm")
    ctx, ctx_k, tgt, tgt_k = tiny_inputs(b=1, v_tgt=1)
    ctx_k[0, 1] = torch.tensor([30.0, 28.0, 15.0, 17.5])  # view 1's own intrinsics, so they must be its own
    c2w = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    for i, (axis, angle, t) in enumerate([([0, 1, 0], 0.3, [0.2, 0, 0.1]), ([1, 0, 0], -0.2, [-0.3, 0.1, 0]),
                                          ([0, 0, 1], 0.5, [0.1, -0.2, 0.3])]):
        c2w[i, :3, :3], c2w[i, :3, 3] = torch.tensor(rodrigues(axis, angle)), torch.tensor(t)
    R, p = cfg.image_size, cfg.patch_size
    lvsm = l3d.make_model(cfg).eval()
    pt = l3d.make_model(l3d.Config.tiny("ptlvsm")).eval()
    pt.load_state_dict(lvsm.state_dict())
    W = lvsm.canonical_rays.weight.detach().double().numpy()
    for model, marked in ((lvsm, 2), (pt, 1)):
        seen = {}
        model.norm_in.register_forward_hook(lambda m, args, out: seen.update(x=args[0][0].double().numpy()))
        with torch.no_grad():
            model(ctx, ctx_k, tgt, tgt_k, c2w[None, :2].float(), c2w[None, 2:].float())
            tokens = model.tokenizer(ctx)[0].double().numpy()  # [2, n, d]
        n = tokens.shape[1]
        for k in range(2):
            rays = patches_numpy(plucker_numpy(c2w[k].numpy(), ctx_k[0, k].double().numpy(), R), p)  # [n, 6 p p]
            expected = tokens[k] + (rays @ W.T if k < marked else 0)
            assert np.abs(seen["x"][k * n:(k + 1) * n] - expected).max() < 1e-5, (model.config.model, k)


def test_pose_normalisation_is_the_releases(tmp_path):
    rng = np.random.default_rng(0)
    c2w = np.stack([np.eye(4)] * 5)
    for i in range(5):
        c2w[i, :3, :3] = rodrigues(rng.normal(size=3), rng.uniform(0, 0.6))
        c2w[i, :3, 3] = rng.normal(size=3) * 2
    # the mean camera, written out: mean centre, mean forward (z) axis, right = mean down (y) x forward
    centre, forward = c2w[:, :3, 3].mean(0), c2w[:, :3, 2].mean(0)
    forward /= np.linalg.norm(forward)
    right = np.cross(c2w[:, :3, 1].mean(0), forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    mean = np.eye(4)
    mean[:3, :3], mean[:3, 3] = np.stack([right, down, forward], 1), centre
    expected = np.linalg.inv(mean) @ c2w
    expected[:, :3, 3] /= 1.35 * np.abs(expected[:, :3, 3]).max()
    got = l3d.normalize_poses(torch.tensor(c2w)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert abs(np.abs(got[:, :3, 3]).max() - 1 / 1.35) < 1e-12
    np.testing.assert_allclose(got[:, :3, 3].mean(0), 0, atol=1e-12)  # the mean camera is the origin
    # through a scene's metadata: w2c in, the same cameras out
    frames = [{"w2c": np.linalg.inv(m).tolist(), "fxfycxcy": [30.0, 30.0, 16.0, 16.0]} for m in c2w]
    np.testing.assert_allclose(l3d.load_cameras(frames, [3, 0, 1, 2, 4]).numpy(), expected[[3, 0, 1, 2, 4]], atol=1e-6)


def test_l3d_checkpoint_round_trip():
    model = tiny_model(3)
    loaded = l3d.load_model({"model": model.state_dict(), "config": asdict(model.config)})
    inputs = tiny_inputs(b=1, v_tgt=2)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(*inputs)[0].numpy(), model(*inputs)[0].numpy())


def test_bad_checkpoints_name_the_file_and_the_tensor(tmp_path):
    cfg = l3d.Config.tiny()
    sd = release_state_dict(tiny_model())
    cases = {"missing.pt": {k: v for k, v in sd.items() if k != "transformer_decoder.1.attn.fc.weight"},
             "misshapen.pt": sd | {"estimator.quaR_head.fc2.weight": torch.zeros(5, 64)},
             "deeper.pt": sd | {"transformer_decoder.3.attn.fc.weight": torch.zeros(128, 128)}}
    for name, bad in cases.items():
        torch.save({"model": bad}, tmp_path / name)
    with pytest.raises(ValueError, match=r"missing\.pt.*decoder\.1\.attn\.proj\.weight"):
        l3d.load_model(tmp_path / "missing.pt", config=cfg)
    with pytest.raises(ValueError, match=r"misshapen\.pt(.|\n)*rotation_head\.fc2\.weight(.|\n)*\[5, 64\]"):
        l3d.load_model(tmp_path / "misshapen.pt", config=cfg)
    with pytest.raises(ValueError, match=r"deeper\.pt.*decoder\.3\.attn\.proj\.weight"):  # not dropped silently
        l3d.load_model(tmp_path / "deeper.pt", config=cfg)
    with pytest.raises(ValueError, match=r"tiny\.pt.*does not fit"):  # a tiny file read as the paper's model
        torch.save({"model": sd}, tmp_path / "tiny.pt")
        l3d.load_model(tmp_path / "tiny.pt", res=224)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        l3d.load_model("nope.pt", res=64)
    torch.save({"model": sd}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])  # a download cut short
    with pytest.raises(ValueError, match=r"cut\.pt: .*[Ff]etch it again"):
        l3d.load_model(tmp_path / "cut.pt", res=224)
    torch.save({"state_dict": sd}, tmp_path / "foreign.pt")  # somebody else's layout
    with pytest.raises(ValueError, match=r"foreign\.pt: .*'model'"):
        l3d.load_model(tmp_path / "foreign.pt", res=224)


def test_backward_reaches_every_parameter():
    model = tiny_model().train()
    ctx, ctx_k, tgt, tgt_k = tiny_inputs()
    render, _ = model(ctx, ctx_k, tgt, tgt_k)
    F.mse_loss(render, tgt).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        model.grad_checkpoint = ckpt
        ctx, ctx_k, tgt, tgt_k = tiny_inputs()
        F.mse_loss(model(ctx, ctx_k, tgt, tgt_k)[0], tgt).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# --- DINOv2 initialisation ------------------------------------------------------------------------


def fake_dinov2(cfg, seed=0):
    """A state dict in DINOv2's own names (no QK-norm; a mask token) for the tokenizer of cfg."""
    g = torch.Generator().manual_seed(seed)
    d, p = cfg.dim, cfg.patch_size
    sd = {"cls_token": torch.randn(1, 1, d, generator=g), "pos_embed": torch.randn(1, 1 + cfg.tok_pos_grid ** 2, d, generator=g),
          "register_tokens": torch.randn(1, cfg.tok_registers, d, generator=g), "mask_token": torch.randn(1, d, generator=g),
          "patch_embed.proj.weight": torch.randn(d, 3, p, p, generator=g), "patch_embed.proj.bias": torch.randn(d, generator=g),
          "norm.weight": torch.randn(d, generator=g), "norm.bias": torch.randn(d, generator=g)}
    for i in range(cfg.tok_depth):
        shapes = {"norm1.weight": [d], "norm1.bias": [d], "attn.qkv.weight": [3 * d, d], "attn.qkv.bias": [3 * d],
                  "attn.proj.weight": [d, d], "attn.proj.bias": [d], "ls1.gamma": [d], "norm2.weight": [d], "norm2.bias": [d],
                  "mlp.fc1.weight": [4 * d, d], "mlp.fc1.bias": [4 * d], "mlp.fc2.weight": [d, 4 * d], "mlp.fc2.bias": [d], "ls2.gamma": [d]}
        sd.update({f"blocks.{i}.{k}": torch.randn(*s, generator=g) for k, s in shapes.items()})
    return sd


def test_dinov2_init_from_a_local_file_and_from_a_download(tmp_path, monkeypatch):
    cfg = l3d.Config.tiny()
    sd = fake_dinov2(cfg)
    path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save(sd, path)
    model = l3d.UPLVSM(cfg)
    l3d.load_dinov2(model, path)
    tok = model.tokenizer.state_dict()
    torch.testing.assert_close(tok["patch_embed.weight"], sd["patch_embed.proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tok["blocks.1.mlp.fc2.bias"], sd["blocks.1.mlp.fc2.bias"], rtol=0, atol=0)
    torch.testing.assert_close(tok["pos_embed"], sd["pos_embed"], rtol=0, atol=0)
    assert torch.all(tok["blocks.0.attn.q_norm.weight"] == 1)  # new in UP-LVSM: starts at 1
    # the download path: fetched once into the cache through a temporary file
    monkeypatch.setattr(l3d, "CACHE_DIR", tmp_path / "cache")
    model2 = l3d.UPLVSM(cfg)
    l3d.load_dinov2(model2, url=path.as_uri())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # and no temporary file left
    torch.testing.assert_close(model2.tokenizer.state_dict()["norm.bias"], sd["norm.bias"], rtol=0, atol=0)
    with pytest.raises(OSError, match="could not download"):
        l3d.load_dinov2(l3d.UPLVSM(cfg), url=(tmp_path / "absent.pth").as_uri())


# --- perceptual loss ------------------------------------------------------------------------------

VGG_CONVS = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
             ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
             ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv4_4", 512, 512),
             ("conv5_1", 512, 512), ("conv5_2", 512, 512)]


def fake_matconvnet_vgg(path, seed=0):
    """A MatConvNet-layout .mat: a cell array of layer structs, conv weights [h, w, in, out] and biases [out, 1]."""
    import scipy.io
    rng = np.random.default_rng(seed)
    layers, weights = [], {}
    for name, cin, cout in VGG_CONVS:
        w = rng.normal(0, math.sqrt(2 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32)
        b = rng.normal(0, 0.1, (cout, 1)).astype(np.float32)
        cell = np.empty((1, 2), dtype=object)
        cell[0, 0], cell[0, 1] = w, b
        layers.append({"name": name, "type": "conv", "weights": cell})
        layers.append({"name": "relu" + name[4:], "type": "relu"})
        weights[name] = (w, b)
    cells = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cells[0, i] = layer
    scipy.io.savemat(path, {"layers": cells})
    return weights


def test_perceptual_loss_against_float64_vgg(tmp_path):
    weights = fake_matconvnet_vgg(tmp_path / "vgg.mat")
    loss_fn = l3d.PerceptualLoss(tmp_path / "vgg.mat")
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)

    def conv(x, name):
        w, b = weights[name]
        return F.relu(F.conv2d(x, torch.tensor(w, dtype=torch.float64).permute(3, 2, 0, 1),
                               torch.tensor(b[:, 0], dtype=torch.float64), padding=1))

    def features(img):
        x = img.double() * 255 - torch.tensor([123.68, 116.779, 103.939], dtype=torch.float64).reshape(1, 3, 1, 1)
        out = [x]
        for stage, names in enumerate([["conv1_1", "conv1_2"], ["conv2_1", "conv2_2"], ["conv3_1", "conv3_2", "conv3_3", "conv3_4"],
                                       ["conv4_1", "conv4_2", "conv4_3", "conv4_4"], ["conv5_1", "conv5_2"]]):
            if stage:
                x = F.avg_pool2d(x, 2)
            for name in names:
                x = conv(x, name)
                if name in ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"):
                    out.append(x)
        return out

    scales = [1, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5]
    expected = sum(s * (a - b).abs().mean() for s, a, b in zip(scales, features(pred), features(target))) / 255
    got = loss_fn(pred, target)
    assert abs(got.item() - expected.item()) < 1e-5 * expected.item()
    assert not any(p.requires_grad for p in loss_fn.parameters())


# --- training pieces ------------------------------------------------------------------------------


def test_a_gpu_without_bf16_runs_in_float32_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for has_bf16 in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
        assert l3d.autocast_dtype(gpu) == (torch.bfloat16 if has_bf16 else torch.float32)
        assert l3d.autocast_dtype(gpu, "bf16") == (torch.bfloat16 if has_bf16 else torch.float32)
        assert l3d.autocast_dtype(gpu, "fp32") == l3d.autocast_dtype(cpu) == torch.float32
    assert capsys.readouterr().out.count("Tesla V100 has no bfloat16: running in float32") == 2


def test_learning_rate_schedule():
    peak, warm, total = 4e-4, 4000, 100_000
    for step, expected in [(0, 0.0), (1000, 1e-4), (2000, 2e-4), (4000, 4e-4),
                           (28_000, 4e-4 * 0.5 * (1 + math.sqrt(0.5))), (52_000, 2e-4), (100_000, 0.0)]:
        assert l3d.lr_at(step, peak, warm, total) == pytest.approx(expected, abs=1e-12)


def test_weight_decay_only_on_matrices():
    model = l3d.UPLVSM(l3d.Config.tiny())
    opt = l3d.make_optimizer(model, 1e-3)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[i] for i in decayed}
    for must in ["latents", "tokenizer.pos_embed", "tokenizer.patch_embed.weight", "encoder.0.attn.qkv.weight",
                 "to_pixels.weight", "rotation_head.fc2.weight"]:
        assert must in decayed
    for never in ["tokenizer.blocks.0.ls1.gamma", "tokenizer.blocks.0.attn.qkv.bias", "encoder.0.norm1.weight",
                  "encoder.0.attn.q_norm.weight", "rotation_head.fc2.bias", "decoder_norm_out.weight"]:
        assert never not in decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_clip_and_skip_rule():
    p = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    p[0].grad, p[1].grad = torch.tensor([3.0, 0, 0, 0]), torch.zeros(3)
    skip, norm = l3d.clip_or_skip(p, clip=1.0)
    assert not skip and norm.item() == pytest.approx(3.0)
    assert p[0].grad.norm().item() == pytest.approx(1.0, rel=1e-5)  # clipped
    p[0].grad, p[1].grad = torch.tensor([3.0, 0, 0, 0]), torch.tensor([0, 4.0, 0])
    skip, norm = l3d.clip_or_skip(p, clip=1.0)
    assert skip and norm.item() == pytest.approx(5.0)  # above 4 x the clip: the update is skipped
    p[0].grad, p[1].grad = torch.tensor([float("nan"), 2.0, float("inf"), 0]), torch.zeros(3)
    skip, norm = l3d.clip_or_skip(p, clip=1.0)
    assert not skip and norm.item() == pytest.approx(2.0) and torch.isfinite(p[0].grad).all()


def test_auto_memory_budget_keeps_what_fits(monkeypatch):
    # tokens x blocks of one 224 sample, by hand: 8 images of 1 + 4 + 256 tokens through 12 tokenizer
    # blocks, 1024 + 512 through 6 encoder blocks, 6 targets of 256 + 1024 through 4 + 14 blocks
    cfg = l3d.Config.paper(224)
    assert l3d.token_blocks(cfg) == 8 * 261 * 12 + 1536 * 6 + 6 * 1280 * 18
    model = l3d.UPLVSM(cfg)
    args = l3d.parse_args(["--res", "224", "--perceptual", "0"])
    need = {b: l3d.step_memory(model, 16, b, False) for b in (1.0, 0.75, 0.5)}
    assert need[1.0] > need[0.75] > need[0.5]
    for free, chosen in ((2 * need[1.0], 1.0), ((need[1.0] + need[0.75]) / 2, 0.75), (need[0.75], 0.5)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
        budget, line = l3d.memory_budget(model, args, torch.device("cuda"))
        assert budget == chosen and "auto" in line
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 2 ** 31))
    assert "may not fit" in l3d.memory_budget(model, args, torch.device("cuda"))[1]
    args = l3d.parse_args(["--res", "224", "--memory-budget", "0.6"])
    assert l3d.memory_budget(model, args, torch.device("cuda"))[0] == 0.6  # a number is taken as it is
    with pytest.raises(SystemExit):
        l3d.parse_args(["--res", "224", "--memory-budget", "1.5"])


def test_ranks_train_on_different_scenes():
    n, world = 11, 3
    for epoch in range(3):
        shares = [l3d.epoch_samples(n, epoch, rank, world, seed=5) for rank in range(world)]
        scenes = [[i for i, _ in share] for share in shares]
        assert all(len(s) == n // world for s in scenes)  # equal shares: every rank takes the same number of steps
        flat = [i for s in scenes for i in s]
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))  # disjoint, real scene indices
        assert shares[0] == l3d.epoch_samples(n, epoch, 0, world, seed=5)  # a resumed run redraws the same
    assert l3d.epoch_samples(n, 0, 0, 1, seed=5) != l3d.epoch_samples(n, 1, 0, 1, seed=5)  # reshuffled every epoch


def test_view_selection_obeys_the_gap_rules():
    import random
    rng = random.Random(0)
    assert l3d.sample_views(26, rng) is None  # the release wants n_frames - 1 > 25
    seen_gaps = set()
    for n in (27, 40, 300):
        for _ in range(300):
            views = l3d.sample_views(n, rng)
            s, e, between = views[0], views[1], views[2:]
            gap = e - s
            seen_gaps.add(gap)
            assert 25 <= gap <= min(192, n - 1) and 0 <= s and e < n
            assert len(between) == 6 and len(set(between)) == 6 and all(s < f < e for f in between)
    assert min(seen_gaps) == 25 and max(seen_gaps) == 192


def test_kept_frames_give_the_same_samples_and_are_read_once(tmp_path):
    data = write_scenes(tmp_path / "train", {"s0": 30, "s1": 30})
    plain, kept = l3d.SceneDataset(data, 32, 8), l3d.SceneDataset(data, 32, 8, keep_frames=True)
    items = [(i, seed) for i in (0, 1) for seed in (3, 4)]
    first = [kept[item] for item in items]
    for item, sample in zip(items, first):
        assert all(torch.equal(a, b) for a, b in zip(plain[item][:6], sample[:6]))
        assert plain[item][6] == sample[6] == item[0]  # the scene drawn, which a warning about skips names
    shutil.rmtree(tmp_path / "train")  # in memory now: neither frames nor metadata are read again
    for item, sample in zip(items, first):
        assert all(torch.equal(a, b) for a, b in zip(kept[item][:6], sample[:6]))


def test_preprocessing_moves_intrinsics_with_the_crop(tmp_path):
    from PIL import Image
    # 100 x 50 frame with a bright stripe over pixels 71 and 72: its centre is x = 72.0 in continuous
    # coordinates (pixel edges), where the intrinsics live
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, 71:73] = 255
    Image.fromarray(img).save(tmp_path / "f.png")
    image, k = l3d.load_view(tmp_path / "f.png", [80.0, 40.0, 50.0, 25.0], res=32, patch=8)
    # height 50 -> 32 (x0.64); width 100 -> 64, already a multiple of 8; crop 16 px from the left
    np.testing.assert_allclose(k.numpy(), [80 * 0.64, 40 * 0.64, 50 * 0.64 - 16, 25 * 0.64], rtol=1e-6)
    assert image.shape == (3, 32, 32)
    # the stripe moves like a projected point: to 72 * 0.64 - 16 continuous, i.e. pixel index that - 0.5
    profile = image[0].mean(0).double()
    centre = (profile * torch.arange(32)).sum() / profile.sum()
    assert abs(centre.item() - (72 * 0.64 - 16 - 0.5)) < 0.1


# --- runs: resume after SIGKILL, and DDP over 2 CPU processes -------------------------------------


def l3d_command(data, out, steps, *extra):
    return [sys.executable, str(REPO / "l3d.py"), "--tiny", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch", "2", "--warmup", "0", "--save-every", "3", "--eval-every", "1000", "--workers", "0",
            "--device", "cpu", *extra]


def log_steps(out):
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["step", "elapsed_s", "lr", "loss"]
    return [int(r[0]) for r in rows[1:]]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run every stopped one is compared with: (its data, its folder, its steps)."""
    root = tmp_path_factory.mktemp("straight")
    data = write_scenes(root / "train", {f"scene{s:03d}": 30 for s in range(6)})
    subprocess.run(l3d_command(data, root / "straight", 30), check=True, capture_output=True)
    return data, root / "straight", 30


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGUSR1", "SIGINT"])
def test_stopped_then_resumed_matches_an_uninterrupted_run(tmp_path, sig, straight_run):
    data, straight, steps = straight_run
    cmd = l3d_command(data, tmp_path / "stopped", steps, "--log-every", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a few steps in, mid-run
        if (tmp_path / "stopped" / "log.csv").exists() and len(log_steps(tmp_path / "stopped")) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    stdout, _ = proc.communicate(timeout=60)
    saved = sorted((tmp_path / "stopped").glob("ckpt_*.pt"))
    stopped_at = int(saved[-1].stem.split("_")[1])
    assert saved and stopped_at < steps, "the signal came too late to test anything"
    if sig != "SIGKILL":  # the run finishes its step, saves it, says so, and exits as the signal would
        assert proc.returncode == 128 + getattr(signal, sig)
        assert f"stopped by {sig} after step {stopped_at}" in stdout
        assert log_steps(tmp_path / "stopped")[-1] == stopped_at  # not one step lost
        assert not list((tmp_path / "stopped").glob("*.tmp"))
    for path in saved:  # whatever the signal interrupted, every checkpoint on disk loads
        torch.load(path, weights_only=True)
    resumed = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"resuming from {saved[-1]}" in resumed.stdout
    a = torch.load(straight / f"ckpt_{steps:07d}.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / f"ckpt_{steps:07d}.pt", weights_only=True)
    assert a["step"] == b["step"] == steps and a["updates"] == b["updates"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert len(list((tmp_path / "stopped").glob("ckpt_*.pt"))) <= 3  # --keep
    logged = log_steps(tmp_path / "stopped")  # the rows past the checkpoint were dropped, then logged again
    assert logged == sorted(set(logged)) and logged[-1] == steps
    assert set(range(1, steps + 1)) <= set(logged)


def test_init_takes_weights_only_from_a_release_file(tmp_path):
    data = write_scenes(tmp_path / "train", {f"scene{s:03d}": 30 for s in range(4)})
    model = tiny_model()
    torch.save({"model": release_state_dict(model), "optimizer": {}, "fwdbwd_pass_step": 50_000}, tmp_path / "release.pt")
    # lr 0: the one AdamW step leaves the weights exactly where --init put them
    run = subprocess.run(l3d_command(data, tmp_path / "ft", 1, "--init", str(tmp_path / "release.pt"), "--lr", "0"),
                         check=True, capture_output=True, text=True)
    assert "initialised from" in run.stdout
    ckpt = torch.load(tmp_path / "ft" / "ckpt_0000001.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["updates"] == 1  # the schedule starts over
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v.cpu()), k
    # weights of another architecture are refused, not half loaded, and the error names the file
    other = l3d.UPLVSM(replace(l3d.Config.tiny(), n_decoder=2))
    torch.save({"model": release_state_dict(other)}, tmp_path / "other.pt")
    run = subprocess.run(l3d_command(data, tmp_path / "ft2", 1, "--init", str(tmp_path / "other.pt")),
                         capture_output=True, text=True)
    assert run.returncode != 0 and "other.pt" in run.stderr and "decoder.2." in run.stderr
    assert not list((tmp_path / "ft2").glob("ckpt_*.pt"))


def test_518_needs_the_224_weights_or_says_why_not(tmp_path, capsys):
    out = tmp_path / "x518"
    with pytest.raises(SystemExit):
        l3d.parse_args(["--res", "518", "--out", str(out)])
    message = capsys.readouterr().err
    assert "--init runs/x224/ckpt_0100000.pt" in message and "--init x224" in message and "--init none" in message
    assert l3d.parse_args(["--res", "518", "--out", str(out), "--init", "none"]).init is None  # said on purpose
    assert l3d.parse_args(["--res", "518", "--out", str(out), "--init", "x224"]).init == "x224"
    out.mkdir()
    (out / "ckpt_0004000.pt").touch()  # a run to resume: no --init needed
    assert l3d.parse_args(["--res", "518", "--out", str(out)]).init is None
    assert l3d.parse_args(["--res", "224", "--out", str(tmp_path / "x224")]).init is None  # 224 starts from DINOv2


def two_nodes(tmp_path, *args, outs):
    """The README's several-node launch, two "nodes" of one process each on 127.0.0.1 (c10d
    rendezvous, gloo): -> the two finished processes. outs: each node's --out."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "--rdzv_id", f"l3d{port}", *map(str, args), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for out in outs]
    for proc in procs:
        proc.output = proc.communicate(timeout=240)[0]
    return procs


def test_two_nodes_train_as_one_and_refuse_to_resume_from_different_steps(tmp_path):
    data = write_scenes(tmp_path / "train", {f"scene{s:03d}": 30 for s in range(8)})
    run = tmp_path / "run"
    args = l3d_command(data, run, 4)[2:]
    i = args.index("--out")
    args = args[:i] + args[i + 2:]
    procs = two_nodes(tmp_path, REPO / "test_l3d.py", tmp_path / "log", *args, outs=[run, run])
    assert all(p.returncode == 0 for p in procs), procs[0].output[-2000:]
    for rank in (0, 1):
        rows = [line.split() for line in (tmp_path / f"log{rank}").read_text().splitlines()]
        assert len(rows) == 4 and all(float(diff) == 0.0 for diff, _ in rows)  # identical after every step
    # each node given its own --out: one holds the run's step 3, the other nothing
    other = tmp_path / "other"
    other.mkdir()
    start = time.time()
    procs = two_nodes(tmp_path, REPO / "l3d.py", *args[:args.index("--steps") + 1], "8",
                      *args[args.index("--steps") + 2:], outs=[run, other])
    assert time.time() - start < 120  # no hang
    for proc in procs:
        assert proc.returncode != 0
        assert "--out must be one folder that every node sees" in proc.output
        assert "step 4 in " + str(run.resolve()) in proc.output and "step 0 in " + str(other.resolve()) in proc.output
        assert "Traceback" not in proc.output.split("l3d.py: the ranks")[0][-300:]
    assert not list(other.glob("ckpt_*.pt")) and max(run.glob("ckpt_*.pt")).name == "ckpt_0000004.pt"


def test_bench_times_the_training_step_and_needs_no_weights():
    import bench
    run = subprocess.run([sys.executable, str(REPO / "bench.py"), "--tiny", "--bench-steps", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert float(re.search(r"([0-9.]+) ms/step", run.stdout).group(1)) > 0
    assert "attention _scaled_dot_product" in run.stdout  # the kernel seen at dispatch, named
    # --res 518 trains from the 224 weights, but the bench loads none and must not ask for them
    args = bench.parse_args(["--res", "518", "--out", "nowhere"])
    assert args.init is None and args.batch == 6 and args.lr == 4e-5 and args.bench_steps == 10


class Stream(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_in_a_log_file_is_redrawn_rarely_and_keeps_its_numbers(terminal, monkeypatch):
    stream = Stream(terminal)
    monkeypatch.setattr(sys, "stderr", stream)
    bar, refresh = l3d.progress(total=300, file=stream)
    for step in range(1, 301):
        bar.update(1)
        if step % 10 == 0:  # a log row every 10 steps, as train() sets it
            bar.set_postfix(loss=f"{1 / step:.4f}", refresh=refresh)
    bar.close()
    redraws = stream.getvalue().split("\r")
    # a terminal shows every postfix; a file gets its first line and the closing one, with the last postfix
    assert (len(redraws) > 30) if terminal else (len(redraws) <= 3)
    assert "300/300" in redraws[-1] and "loss=0.0033" in redraws[-1]


def test_bad_arguments_are_refused(capsys):
    for flag, value in (("--batch", "0"), ("--steps", "-5"), ("--save-every", "0"), ("--eval-every", "0"),
                        ("--log-every", "0")):
        with pytest.raises(SystemExit):
            l3d.parse_args(["--tiny", flag, value])
        assert f"{flag} must be a positive number" in capsys.readouterr().err


def test_a_failed_save_leaves_no_temporary_file_and_says_why(tmp_path, monkeypatch):
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "step": 3}
    l3d.save_checkpoint(tmp_path, ckpt, keep=3)

    def full_disk(obj, path):  # what torch.save does on a full disk: half a file, then an error
        Path(path).write_bytes(b"PK" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        l3d.save_checkpoint(tmp_path, {**ckpt, "step": 6}, keep=3)
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert str(tmp_path) in str(e.value) and f"about {size / 2 ** 30:.2f} GiB" in str(e.value)
    assert "GiB free" in str(e.value) and "file write failed" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003.pt"]  # nothing half-written, the old one kept


def test_unreadable_heldout_scene_is_skipped_and_named(tmp_path, capsys):
    write_scenes(tmp_path / "test", {f"scene{s}": 30 for s in range(3)})
    index = {f"scene{s}": {"context": [0, 29], "target": [10, 15, 20]} for s in range(3)}
    (tmp_path / "index.json").write_text(json.dumps(index))
    (tmp_path / "test" / "images" / "scene1" / "00015.png").write_bytes(b"not a png")
    scenes = l3d.load_heldout(tmp_path / "test" / "full_list.txt", tmp_path / "index.json", 32, l3d.Config.tiny())
    assert len(scenes) == 2 and "held-out scene scene1 skipped" in capsys.readouterr().out


def test_heldout_check_takes_one_and_three_context_views(tmp_path):
    write_scenes(tmp_path / "test", {f"scene{s}": 30 for s in range(3)})
    index = {"scene0": {"context": [4], "target": [10, 15]}, "scene1": {"context": [0, 29, 12], "target": [10, 15]},
             "scene2": {"context": [0, 29], "target": [10, 15]}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    scenes = l3d.load_heldout(tmp_path / "test" / "full_list.txt", tmp_path / "index.json", 32, l3d.Config.tiny())
    scores = l3d.heldout(tiny_model(), scenes, torch.device("cpu"), tmp_path / "grid.png")
    # the better context view copied, by hand over the 1, 3 and 2 views of each scene
    copies = [max(float(l3d.psnr(s["ctx_images"][k:k + 1], s["tgt_images"][t:t + 1])) for k in range(len(s["ctx_images"])))
              for s in scenes for t in range(2)]
    assert len(scenes) == 3 and scores["best_context_copy"] == pytest.approx(np.mean(copies), abs=1e-9)
    assert all(math.isfinite(v) for v in scores.values()) and (tmp_path / "grid.png").exists()


def test_errors_print_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "l3d.py"), "--tiny", "--data", str(tmp_path / "absent.txt"),
                          "--out", str(tmp_path / "run"), "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"l3d.py: {tmp_path / 'absent.txt'}: no such list file")


# --- bad training data -----------------------------------------------------------------------------


def spoil_focal(data, names):
    for name in names:
        meta = data.parent / "metadata" / f"{name}.json"
        scene = json.loads(meta.read_text())
        for f in scene["frames"]:
            f["fxfycxcy"][0] = 0.0
        meta.write_text(json.dumps(scene))


def tiny_train(tmp_path, data, *flags):
    return subprocess.run([sys.executable, str(REPO / "l3d.py"), "--tiny", "--data", str(data), "--eval-data",
                           str(data), "--batch", "2", "--steps", "4", "--out", str(tmp_path / "run"), "--device",
                           "cpu", *flags], capture_output=True, text=True, cwd=tmp_path)


def test_scenes_with_unusable_cameras_are_skipped_and_named_and_training_goes_on(tmp_path):
    data = write_scenes(tmp_path / "train", {f"s{i}": 30 for i in range(8)}, width=48, height=32)
    spoil_focal(data, ["s1", "s3", "s5", "s7"])
    run = tiny_train(tmp_path, data)
    assert run.returncode == 0, run.stderr
    assert re.search(r"skipping scene \S*s[1357]\.json: frame 0: focal lengths fx, fy = 0, 60", run.stderr)
    assert "done: step 4 of 4" in run.stdout and "skipped" not in run.stdout.split("done:")[1].splitlines()[0]
    with pytest.raises(ValueError, match="frame 0: focal lengths"):
        l3d.load_cameras(l3d.read_scene(data.parent / "metadata" / "s1.json")["frames"], [0, 1])


@pytest.mark.parametrize("why", ["cameras", "short"])
def test_a_list_with_no_usable_scene_is_refused_before_the_first_step_in_one_line(tmp_path, why):
    data = write_scenes(tmp_path / "train", {f"s{i}": 30 if why == "cameras" else 20 for i in range(4)}, width=48, height=32)
    if why == "cameras":
        spoil_focal(data, ["s0", "s1", "s2", "s3"])
    run = tiny_train(tmp_path, data)
    expected = "frame 0: focal lengths" if why == "cameras" else "only 20 frames"
    assert run.returncode == 1 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert f"none of its 4 scenes can be trained on; the first: " in run.stderr and expected in run.stderr
    assert not (tmp_path / "run" / "log.csv").exists()


def test_a_run_whose_every_update_is_skipped_says_it_learned_nothing(tmp_path):
    data = write_scenes(tmp_path / "train", {f"s{i}": 30 for i in range(4)}, width=48, height=32)
    run = tiny_train(tmp_path, data, "--clip", "1e-12", "--log-every", "2")  # every gradient "spikes"
    assert run.returncode == 1, run.stderr
    assert "learned nothing: all 4 updates of this run were skipped" in run.stdout and "done:" not in run.stdout
    assert re.search(r"warning: steps 1-2: 100% of the updates skipped .*drew \d scenes: \S*s\d\.json", run.stdout)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [r["skipped"] for r in rows] == ["2", "2"]


def test_a_truncated_newest_checkpoint_is_renamed_aside_and_never_counts_toward_keep(tmp_path, capsys):
    model = tiny_model()
    for step in (1, 2, 3):
        l3d.save_checkpoint(tmp_path, {"model": model.state_dict(), "step": step}, keep=2)
    newest = tmp_path / "ckpt_0000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    path, ckpt = l3d.latest_checkpoint(tmp_path)
    assert path.name == "ckpt_0000002.pt" and ckpt["step"] == 2
    assert "renamed it ckpt_0000003.pt.unreadable" in capsys.readouterr().out
    l3d.save_checkpoint(tmp_path, {"model": model.state_dict(), "step": 4}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000002.pt", "ckpt_0000003.pt.unreadable",
                                                          "ckpt_0000004.pt"]


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    with pytest.raises(SystemExit):
        l3d.parse_args(["--tiny", "--out", str(tmp_path / "run")])
    assert "--out " + str(tmp_path / "run") + " is a file" in capsys.readouterr().err


def ddp_probe(log, argv):
    """Run l3d.train with an AdamW whose every step writes, per rank, how far this rank's parameters
    are from rank 0's and their sum. Started by torchrun: python test_l3d.py LOG ARGS..."""
    import torch.distributed as dist
    real_step = torch.optim.AdamW.step

    def checked_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        flat = torch.cat([p.detach().flatten() for g in self.param_groups for p in g["params"]])
        every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        with open(f"{log}{dist.get_rank()}", "a") as f:
            f.write(f"{(every[0] - flat).abs().max().item()} {flat.double().abs().sum().item()}\n")
        return out

    torch.optim.AdamW.step = checked_step
    l3d.train(l3d.parse_args(argv))


def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path):
    data = write_scenes(tmp_path / "train", {f"scene{s:03d}": 30 for s in range(8)})
    cmd, env = torchrun(2, REPO / "test_l3d.py", tmp_path / "log", *l3d_command(data, tmp_path / "run", 4)[2:])
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=240)
    for rank in (0, 1):
        rows = [line.split() for line in (tmp_path / f"log{rank}").read_text().splitlines()]
        assert len(rows) == 4
        assert all(float(diff) == 0.0 for diff, _ in rows)  # identical on both ranks after every step
        sums = [float(s) for _, s in rows]
        assert len(set(sums)) == 4  # and they did change every step


@pytest.mark.parametrize("model", ["uplvsm", "ptlvsm"])
def test_bench_flop_formula_matches_torch_flop_counter(model):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = l3d.Config.tiny(model)
    ctx, ctx_k, tgt, tgt_k = tiny_inputs(b=1, v_tgt=6)
    c2w = torch.eye(4).expand(1, 8, 4, 4)
    # the math backend: FlopCounterMode cannot see inside the fused kernels of some builds
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        l3d.make_model(cfg)(ctx, ctx_k, tgt, tgt_k, c2w[:, :2], c2w[:, 2:])
    # the attention products were seen: q k^T and (softmax) v, 2 n^2 d multiply-adds per sequence of n
    d, n, L, seq_tok = cfg.dim, (cfg.image_size // cfg.patch_size) ** 2, cfg.n_latents, 1 + cfg.tok_registers + 16
    if model == "uplvsm":  # 8 images tokenized, the encoder, and per target the estimator and the decoder
        # the last block of each LVSM stack asks queries of the tokens it keeps only: L, n and n
        attention = 4 * d * (8 * cfg.tok_depth * seq_tok ** 2
                             + (cfg.n_encoder - 1) * (L + 2 * n) ** 2 + L * (L + 2 * n)
                             + 6 * (cfg.n_estimator + cfg.n_decoder - 2) * (n + L) ** 2 + 6 * 2 * n * (n + L))
    else:  # 2 context images tokenized, then per target one stack over 3n tokens, the last keeping n
        attention = 4 * d * (2 * cfg.tok_depth * seq_tok ** 2 + 6 * (cfg.n_blocks - 1) * (3 * n) ** 2
                             + 6 * n * 3 * n)
    assert abs(counter.get_flop_counts()["Global"][torch.ops.aten.bmm] / attention - 1) < 0.02
    # the formula leaves out the pose heads' few matmuls
    assert abs(l3d.model_flops(cfg) / counter.get_total_flops() - 1) < 1e-3


def test_compiled_blocks_train_evaluate_and_train_again_without_falling_back_to_eager(monkeypatch):
    # train() compiles the blocks, trains, runs a held-out check without gradients, and trains on:
    # more graphs than dynamo's default limit of 8 for the one forward that all blocks share
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    model = l3d.compile_blocks(tiny_model().train())
    ctx, ctx_k, tgt, tgt_k = tiny_inputs(b=2, v_tgt=6)
    model(ctx, ctx_k, tgt, tgt_k)[0].sum().backward()
    with torch.no_grad():
        for b in (1, 2):  # held-out scenes one at a time, eval.py's batches of several
            model.eval()(*tiny_inputs(b=b, v_tgt=3))
    model.train()(ctx, ctx_k, tgt, tgt_k)[0].sum().backward()
    torch._dynamo.reset()


# --- on a CUDA GPU: compilation, bf16, the memory plan ------------------------------------------
# These run only where there is a GPU; everything above compares against CPU maths and stays there.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fp32_cuda():
    """Plain float32 matmuls (no TF32) for the length of a test."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@cuda
def test_cuda_compiled_blocks_render_as_eager(fp32_cuda):
    model = tiny_model().to(fp32_cuda)
    inputs = [x.to(fp32_cuda) for x in tiny_inputs()]
    with torch.no_grad():
        eager, eager_pose = model(*inputs)
        compiled, compiled_pose = l3d.compile_blocks(model)(*inputs)
    # float32 both ways; the compiled kernels only fuse and reorder sums
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled_pose, eager_pose, rtol=0, atol=1e-5)


@cuda
def test_cuda_bf16_renders_agree_with_fp32(fp32_cuda):
    torch.manual_seed(0)
    with fp32_cuda:
        model = l3d.UPLVSM(l3d.Config.paper(224)).eval()  # the paper's model at its own init
    R = 224
    g = torch.Generator(device=fp32_cuda).manual_seed(1)
    k = torch.tensor([0.9 * R, 0.95 * R, R / 2, R / 2], device=fp32_cuda)
    inputs = (torch.rand(2, 2, 3, R, R, device=fp32_cuda, generator=g), k.expand(2, 2, 4),
              torch.rand(2, 3, 3, R, R, device=fp32_cuda, generator=g), k.expand(2, 3, 4))
    with torch.no_grad():
        fp32 = model(*inputs)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(*inputs)[0].float()
    diff = (bf16 - fp32).abs()
    print(f"bf16 vs fp32 renders: max {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
    # the release's own spread on such weights: max 7.8e-3, mean 6.2e-4 (measured on an H100)
    assert diff.max() < 2e-2 and diff.mean() < 2e-3


@cuda
def test_cuda_one_training_step_with_the_default_memory_plan():
    from torch._functorch import config as functorch_config
    results = []
    for compiled in (False, True):
        args = l3d.parse_args(["--tiny", "--device", "cuda", "--lr", "0"] + ([] if compiled else ["--no-compile"]))
        assert args.memory_budget == "auto" and not args.grad_checkpoint  # the defaults under test
        torch.manual_seed(0)
        model = tiny_model().cuda()
        opt = l3d.make_optimizer(model, args.lr)
        step = l3d.make_train_step(model, opt, args, torch.device("cuda"), 1)
        batch = (*tiny_inputs(b=4, v_tgt=6), torch.eye(4).expand(4, 2, 4, 4), torch.eye(4).expand(4, 6, 4, 4))
        results.append([x.item() for x in step(batch, 0.0)])
        if compiled:  # the tiny step fits any GPU: auto keeps every activation
            assert functorch_config.activation_memory_budget == 1.0
            assert any(isinstance(m, l3d.Block) and m._compiled_call_impl is not None for m in model.modules())
    (loss, psnr, gnorm, updated), (loss_c, psnr_c, gnorm_c, updated_c) = results
    assert updated_c == updated and math.isfinite(loss_c)
    # both under bf16 autocast: the compiled step may round differently, not compute something else
    assert loss_c == pytest.approx(loss, rel=1e-2) and gnorm_c == pytest.approx(gnorm, rel=3e-2)


@cuda
def test_cuda_checkpointed_compiled_blocks_give_the_same_gradients(fp32_cuda):
    grads = []
    for ckpt in (False, True):
        model = l3d.compile_blocks(tiny_model().to(fp32_cuda).train())
        model.grad_checkpoint = ckpt
        ctx, ctx_k, tgt, tgt_k = (x.to(fp32_cuda) for x in tiny_inputs())
        F.mse_loss(model(ctx, ctx_k, tgt, tgt_k)[0], tgt).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
    ddp_probe(sys.argv[1], sys.argv[2:])
