"""Tests of eval.py on CPU: metrics against float64 maths written here, and whole runs on tiny generated scenes."""

import contextlib
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.error
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import eval as ev
import l3d
from conftest import REPO, tiny_inputs, tiny_model, torchrun, write_scenes

# --- metrics --------------------------------------------------------------------------------------


def test_psnr_against_float64():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 3, 20, 17, generator=g) * 1.4 - 0.2  # partly outside [0, 1]: PSNR clamps first
    gt = torch.rand(4, 3, 20, 17, generator=g)
    p, t = np.clip(pred.numpy().astype(np.float64), 0, 1), gt.numpy().astype(np.float64)
    expected = [-10 * math.log10(((p[i] - t[i]) ** 2).mean()) for i in range(4)]
    got = l3d.psnr(pred, gt)
    assert got.dtype == torch.float64 and got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    # a constant error of 0.1 everywhere is an MSE of 0.01: 20 dB
    assert l3d.psnr(torch.full((1, 3, 8, 8), 0.1), torch.zeros(1, 3, 8, 8)).item() == pytest.approx(20.0, abs=1e-6)


def ssim_like_scikit_image(x, y):
    """scikit-image's SSIM of two [3, H, W] images written out literally in float64: pad with scipy's
    "reflect" (edge pixel repeated), weight an 11 x 11 gaussian window at every pixel, sample
    covariances, crop 5 pixels off every side of the map, mean per channel, then over channels."""
    r, c1, c2 = 5, 0.01 ** 2, 0.03 ** 2
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()
    cov_norm = 121 / 120
    _, h, w = x.shape

    def reflect(i, n):
        return -1 - i if i < 0 else (2 * n - 1 - i if i >= n else i)

    rows = [reflect(i, h) for i in range(-r, h + r)]
    cols = [reflect(j, w) for j in range(-r, w + r)]
    per_channel = []
    for ch in range(3):
        px, py = x[ch][np.ix_(rows, cols)], y[ch][np.ix_(rows, cols)]
        s = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                a, b = px[i:i + 2 * r + 1, j:j + 2 * r + 1], py[i:i + 2 * r + 1, j:j + 2 * r + 1]
                mx, my = (window * a).sum(), (window * b).sum()
                vx = cov_norm * ((window * a * a).sum() - mx * mx)
                vy = cov_norm * ((window * b * b).sum() - my * my)
                vxy = cov_norm * ((window * a * b).sum() - mx * my)
                s[i, j] = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        per_channel.append(s[r:h - r, r:w - r].mean())
    return float(np.mean(per_channel))


def test_ssim_window_by_window():
    rng = np.random.default_rng(0)
    gt = rng.random((2, 3, 16, 13))
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1)
    pred[1] = rng.random((3, 16, 13))  # an unrelated image too: SSIM near 0
    got = ev.ssim(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
    assert got.dtype == torch.float64 and got.shape == (2,)
    expected = [ssim_like_scikit_image(pred[i].astype(np.float32).astype(np.float64), gt[i].astype(np.float32).astype(np.float64)) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    assert ev.ssim(torch.from_numpy(gt), torch.from_numpy(gt)).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    with pytest.raises(ValueError, match="11x11"):
        ev.ssim(torch.rand(1, 3, 10, 20), torch.rand(1, 3, 10, 20))


def test_lpips_download_failure_says_what_to_do(monkeypatch):
    lpips = pytest.importorskip("lpips")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(OSError, match=r"vgg16-397923af\.pth.*--no-lpips"):
        ev.load_lpips(torch.device("cpu"))


def test_malformed_index_is_named(tmp_path):
    # the file, and what is wrong with it: its type, the entry at fault, or that it does not parse
    for name, text, why in [("list.json", "[1, 2]", "list"), ("half.json", '{"a": {"context": [0, 5]}}', "'a'"),
                            ("cut.json", '{"a": {"context"', "unreadable")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: .*{why}"):
            l3d.read_index(tmp_path / name)


# --- what the camera is worth, and the linear probe -----------------------------------------------


def scene_batch(b=2, v=3, seed=0):
    """b scored-scene dicts as eval.py loads them: tiny inputs, random rigid cameras, context frames 0
    and 10, targets at frames 3, 5, 7 (and more when v > 3)."""
    ctx, ctx_k, tgt, tgt_k = tiny_inputs(b, v, seed)
    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (b, 2 + v, 1, 1))
    c2w[..., :3, :3] = np.linalg.qr(rng.normal(size=(b, 2 + v, 3, 3)))[0]
    c2w[..., :3, :3] *= np.sign(np.linalg.det(c2w[..., :3, :3]))[..., None, None]
    c2w[..., :3, 3] = rng.normal(size=(b, 2 + v, 3))
    c2w = torch.tensor(c2w)
    return [{"ctx_images": ctx[i], "ctx_fxfycxcy": ctx_k[i], "tgt_images": tgt[i], "tgt_fxfycxcy": tgt_k[i],
             "ctx_c2w": c2w[i, :2].float(), "tgt_c2w": c2w[i, 2:].float(), "c2w": c2w[i], "context": [0, 10],
             "target": [3 + 2 * k for k in range(v)]} for i in range(b)]


def psnr64(x, y):
    return -10 * torch.log10(((x.double().clamp(0, 1) - y.double()) ** 2).flatten(1).mean(1))


@pytest.mark.parametrize("kind", ["uplvsm", "ptlvsm", "lvsm"])
def test_camera_worth_prices_the_camera_and_is_zero_for_a_model_that_ignores_it(kind):
    torch.manual_seed(0)
    model = l3d.make_model(l3d.Config.tiny(kind))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = scene_batch()
    ctx, ctx_k, tgt, tgt_k, ctx_c2w, tgt_c2w = (torch.stack([s[k] for s in batch]) for k in l3d.MODEL_INPUTS)
    column = {name: 2 + i for i, name in enumerate(ev.METRICS)}

    def scored():
        _, rows, _, _ = ev.score(model, batch, torch.device("cpu"), contextlib.nullcontext(), None)
        return np.array(rows)  # [b, v, 2 + metrics]

    # by hand: each target again from the camera of the next one (the last from the first's)
    nxt = [1, 2, 0]
    with torch.no_grad():
        if kind == "uplvsm":
            latents = model.encode(ctx, ctx_k)
            pose = model.estimate_pose(latents, tgt)
            own = model.decode(latents, l3d.pose_to_c2w(pose), tgt_k)
            other = model.decode(latents, l3d.pose_to_c2w(pose[:, nxt]), tgt_k[:, nxt])
        else:
            own = model(ctx, ctx_k, tgt, tgt_k, ctx_c2w, tgt_c2w)[0]
            other = model(ctx, ctx_k, tgt, tgt_k[:, nxt], ctx_c2w, tgt_c2w[:, nxt])[0]
    expected = psnr64(own.flatten(0, 1), tgt.flatten(0, 1)) - psnr64(other.flatten(0, 1), tgt.flatten(0, 1))
    rows = scored()
    np.testing.assert_allclose(rows[..., column["camera_worth_db"]].ravel(), expected.numpy(), atol=1e-5)
    assert np.abs(expected.numpy()).max() > 1e-2  # a model that reads its camera: the worth is not 0
    # the better context view copied, and where each target lies between the context frames 0 and 10
    copies = torch.stack([psnr64(ctx[:, k:k + 1].expand_as(tgt).flatten(0, 1), tgt.flatten(0, 1)) for k in (0, 1)])
    np.testing.assert_allclose(rows[..., column["copy_psnr"]].ravel(), copies.amax(0).numpy(), atol=1e-9)
    np.testing.assert_allclose(rows[..., 1], [[0.3, 0.5, 0.7]] * 2)

    with torch.no_grad():
        model.target_rays.weight.zero_()  # the target's rays, the only way its camera reaches the renders
    assert np.abs(scored()[..., column["camera_worth_db"]]).max() < 1e-9


def test_heldout_check_reports_what_the_camera_is_worth():
    model = tiny_model()
    batch = scene_batch(b=3)
    scores = l3d.heldout(model, batch, torch.device("cpu"))
    rows = ev.score(model, batch, torch.device("cpu"), contextlib.nullcontext(), None)[1]
    worth = np.array(rows)[..., 2 + ev.METRICS.index("camera_worth_db")]
    assert scores["camera_worth_db"] == pytest.approx(worth.mean(), abs=1e-5) and abs(worth.mean()) > 1e-3
    with torch.no_grad():
        model.target_rays.weight.zero_()
    assert abs(l3d.heldout(model, batch, torch.device("cpu"))["camera_worth_db"]) < 1e-9
    assert "camera worth" in l3d.heldout_line(scores)


def test_rotation_vectors_against_scipy():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    rotations = Rotation.from_rotvec(np.concatenate([
        rng.normal(size=(20, 3)),  # anywhere
        1e-8 * rng.normal(size=(3, 3)),  # next to the identity
        [[0, 0, 0], [np.pi, 0, 0], [0, -np.pi, 0]],  # the identity and two half turns
        (np.pi - 1e-9) * np.array([[0.6, 0.8, 0.0]])]))  # a hair short of one
    v = ev.rotation_vector(rotations.as_matrix())
    # the same rotation, and the rotation vector's length is the angle (a half turn's axis has two signs)
    np.testing.assert_allclose((Rotation.from_rotvec(v).inv() * rotations).magnitude(), 0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), rotations.magnitude(), atol=1e-7)
    np.testing.assert_allclose(ev.rotation_matrix(v[:20]), rotations[:20].as_matrix(), atol=1e-12)


def test_linear_probe_recovers_a_known_linear_map():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    n = 36  # 12 scenes of 3 targets
    e = rng.normal(size=(n, 3, 4))
    u = rng.normal(size=(n, 3))
    e[:, :, 3] = u / np.linalg.norm(u, axis=1, keepdims=True)  # the true direction, among the probe's inputs
    a, c = 0.05 * rng.normal(size=(3, 12)), np.array([0.1, -0.2, 0.3])
    g = np.zeros((n, 3, 4))
    g[:, :, :3] = Rotation.from_rotvec(e.reshape(n, 12) @ a.T + c).as_matrix()  # rotation vector: linear in E
    g[:, :, 3] = e[:, :, 3] * rng.uniform(0.5, 2.0, (n, 1))  # any length: only the direction is probed
    g[::7, :, 3] = 0  # targets where the camera did not move: no direction to probe, rotations still count
    scenes = [f"s{k // 3:02d}" for k in range(n)]
    probe = ev.linear_probe(e, g, scenes)
    assert probe["targets"] == n and "note" not in probe
    for key in ("rotation_r2", "translation_r2"):
        assert probe[key] == pytest.approx(1.0, abs=1e-6)
    assert probe["rotation_error_deg"] == pytest.approx(0.0, abs=1e-6)
    # true cameras with nothing to do with the model's: no better than each half's mean
    shuffled = ev.linear_probe(rng.normal(size=(n, 3, 4)), g, scenes)
    assert shuffled["rotation_r2"] < 0.2 and shuffled["translation_r2"] < 0.2
    # 4 scenes: 6 targets to fit 13 numbers; and PT-LVSM, which has no cameras of its own
    assert "too few targets" in ev.linear_probe(e[:12], g[:12], scenes[:12])["note"]
    assert "no cameras" in ev.linear_probe(np.full_like(e, np.nan), g, scenes)["note"]


# --- camera paths ---------------------------------------------------------------------------------


def axis_angle_quat(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return torch.tensor([*(axis * math.sin(angle / 2)), math.cos(angle / 2)], dtype=torch.float64)


def test_pose_errors_of_a_known_pair_of_cameras():
    # the dataset's cameras: context view 0 anywhere, the target 0.5 m along its own x axis and turned
    # 20 degrees about y; the model's: another frame altogether (its own world), the target turned
    # 20 + 7 degrees about the same axis and moved along a direction 30 degrees off in the x-z plane
    rng = np.random.default_rng(0)

    def c2w(rotation, translation):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rotation, translation
        return m

    def about_y(deg):
        r = math.radians(deg)
        return np.array([[math.cos(r), 0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0, math.cos(r)]])
    world = c2w(np.linalg.qr(rng.normal(size=(3, 3)))[0], rng.normal(size=3))
    world[:3, :3] *= np.sign(np.linalg.det(world[:3, :3]))
    c0 = world @ c2w(np.eye(3), [0, 0, 0])
    ct = c0 @ c2w(about_y(20), [0.5, 0, 0])
    p0 = c2w(about_y(-40), [1.0, 2.0, 3.0])  # the model's frame has nothing to do with the dataset's
    direction = [math.cos(math.radians(30)), 0, math.sin(math.radians(30))]
    pt = p0 @ c2w(about_y(27), 3.7 * np.array(direction))  # another scale: only the direction counts
    still = c0 @ c2w(about_y(-10), [0, 0, 0])  # a target that turned without moving
    to = lambda *ms: torch.tensor(np.stack(ms), dtype=torch.float64)[None]  # [1, k, 4, 4]
    rot, trans = ev.pose_errors(torch.linalg.inv(to(p0)) @ to(pt, pt), torch.linalg.inv(to(c0)) @ to(ct, still))
    np.testing.assert_allclose(rot[0].numpy(), [7.0, 37.0], atol=1e-9)
    assert trans[0, 0].item() == pytest.approx(30.0, abs=1e-9) and math.isnan(trans[0, 1].item())


def test_slerp_known_rotations():
    z = [0, 0, 1]
    half = ev.slerp(axis_angle_quat(z, 0.0), axis_angle_quat(z, math.pi / 2), torch.tensor(0.5, dtype=torch.float64))
    expected = np.array([[1, -1, 0], [1, 1, 0], [0, 0, math.sqrt(2)]]) / math.sqrt(2)  # 45 degrees about z
    np.testing.assert_allclose(l3d.quat_to_rotation(half).numpy(), expected, atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        axis, a, b = rng.normal(size=3), rng.uniform(-3, 3), rng.uniform(-3, 3)
        b = a + (b - a) % (2 * math.pi) - (2 * math.pi if (b - a) % (2 * math.pi) > math.pi else 0)  # |b - a| <= pi
        t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
        q0, q1 = axis_angle_quat(axis, a), axis_angle_quat(axis, b)
        for target in (q1, -q1):  # -q1 is the same rotation: still the short way round
            got = ev.slerp(q0.expand(4, 4), target.expand(4, 4), t)
            want = torch.stack([axis_angle_quat(axis, a + float(s) * (b - a)) for s in t])
            np.testing.assert_allclose(l3d.quat_to_rotation(got).numpy(), l3d.quat_to_rotation(want).numpy(), atol=1e-10)
    # equal rotations: no 0/0
    q = axis_angle_quat([1, 2, 3], 0.4)
    assert torch.allclose(ev.slerp(q, q, torch.tensor(0.5, dtype=torch.float64)), q, atol=1e-12)


def test_camera_path_passes_through_the_keys():
    keys = torch.stack([torch.cat([torch.tensor([float(i), 2.0 * i, 0.0], dtype=torch.float64), axis_angle_quat([0, 1, 0], 0.5 * i)])
                        for i in range(3)])
    fxfycxcy = torch.tensor([[50.0, 50, 32, 32], [60, 60, 32, 32], [70, 70, 32, 32]], dtype=torch.float64)
    poses, k = ev.camera_path(keys, fxfycxcy, 5)
    assert poses.shape == (5, 7) and k.shape == (5, 4)
    np.testing.assert_allclose(poses[::2].numpy(), keys.numpy(), atol=1e-12)
    np.testing.assert_allclose(poses[1].numpy(), torch.cat([torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64),
                                                           axis_angle_quat([0, 1, 0], 0.25)]).numpy(), atol=1e-12)
    np.testing.assert_allclose(k[:, 0].numpy(), [50, 55, 60, 65, 70])


# --- whole runs on generated scenes --------------------------------------------------------------


def write_dataset(root):
    """Processed-layout scenes s0..s4 that can be scored, plus every kind of index entry that cannot."""
    frame_counts = {f"s{i}": 6 for i in range(5)} | {"short": 4, "broken": 6, "nulled": 6, "unindexed": 6}
    write_scenes(root, frame_counts, width=96)
    (root / "images" / "broken" / "00002.png").unlink()
    views = {"context": [0, 5], "target": [3, 1, 2]}
    index = {f"s{i}": views for i in range(5)} | {"s3": {"context": [4, 0], "target": [2, 3, 1]}}
    index |= {"short": views, "broken": views, "nulled": None, "nowhere": None, "gone": views}
    (root / "index.json").write_text(json.dumps(index))
    return root / "full_list.txt", root / "index.json"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint, the generated scenes, and one single-process run over them that the tests below read."""
    root = tmp_path_factory.mktemp("eval")
    data, index = write_dataset(root / "test")
    model = tiny_model()  # off its init, so that renders differ from scene to scene
    ckpt = root / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    # on the CPU wherever the tests run: the numbers below are compared with float32 CPU maths
    args = ["--ckpt", str(ckpt), "--data", str(data), "--index", str(index), "--no-lpips", "--batch", "2",
            "--device", "cpu"]
    summary = ev.main(args + ["--out", str(root / "one"), "--save-images", "--video", "3"])
    return {"args": args, "model": model.eval(), "data": data, "out": root / "one", "summary": summary}


def read_csv(path):
    lines = path.read_text().splitlines()
    return lines[0], [line.split(",") for line in lines[1:]]


def test_end_to_end(tiny_run):
    out, summary = tiny_run["out"], tiny_run["summary"]
    assert {k: summary[k] for k in ("scenes", "images", "scored_now", "index_null", "missing", "out_of_range", "unreadable")} == \
        {"scenes": 5, "images": 15, "scored_now": 5, "index_null": 2, "missing": 1, "out_of_range": 1, "unreadable": 1}
    assert summary["lpips"] is None and json.loads((out / "summary.json").read_text()) == summary
    header, images = read_csv(out / "images.csv")
    assert header == ("scene,view,position,psnr,ssim,lpips,copy_psnr,mean_context_psnr,camera_worth_db,"
                      "pose_rotation_error_deg,pose_translation_error_deg,transfer_psnr")
    assert [r[:2] for r in images[:6]] == [["s0", "3"], ["s0", "1"], ["s0", "2"], ["s1", "3"], ["s1", "1"], ["s1", "2"]]
    assert all(r[5] == "nan" and r[11] == "nan" for r in images)  # no LPIPS; not a transfer index
    assert [r[2] for r in images[:3]] == ["0.600000", "0.200000", "0.400000"]  # frames 3, 1, 2 of the gap 0..5
    header, scenes = read_csv(out / "metrics.csv")
    assert header == ("scene,psnr,ssim,lpips,copy_psnr,mean_context_psnr,camera_worth_db,pose_rotation_error_deg,"
                      "pose_translation_error_deg,transfer_psnr")
    assert [r[0] for r in scenes] == ["s0", "s1", "s2", "s3", "s4"]
    values = np.array([[float(x) for x in r[3:5]] for r in images])  # [15, 2]
    np.testing.assert_allclose([[float(x) for x in r[1:3]] for r in scenes], values.reshape(5, 3, 2).mean(1), atol=1e-6)
    assert summary["psnr"] == pytest.approx(values[:, 0].mean(), abs=1e-9)
    assert summary["ssim"] == pytest.approx(values[:, 1].mean(), abs=1e-9)

    # the numbers of s3 recomputed here: context in index order, targets rendered from estimated poses
    frames = l3d.read_scene(Path(tiny_run["data"]).parent / "metadata" / "s3.json")["frames"]
    cfg = tiny_run["model"].config
    R = cfg.image_size
    ctx, ctx_k = l3d.load_views(frames, [4, 0], R, cfg.patch_size)
    tgt, tgt_k = l3d.load_views(frames, [2, 3, 1], R, cfg.patch_size)
    with torch.no_grad():
        render = tiny_run["model"](ctx[None], ctx_k[None], tgt[None], tgt_k[None])[0][0]  # [3, 3, R, R]
    mse = ((render.double().clamp(0, 1) - tgt.double()) ** 2).flatten(1).mean(1)  # [3, 3, R, R] -> [3, 3*R*R] -> [3]
    np.testing.assert_allclose(values[9:12, 0], (-10 * torch.log10(mse)).numpy(), atol=2e-6)
    np.testing.assert_allclose(values[9:12, 1], ev.ssim(render, tgt).numpy(), atol=2e-6)
    # the blur baseline: the pixel mean of the two context views, as the render
    mean_context = psnr64(ctx.double().mean(0, keepdim=True).expand_as(tgt), tgt).numpy()
    np.testing.assert_allclose([float(r[7]) for r in images[9:12]], mean_context, atol=1e-6)
    # the cameras: the generated frames all share the identity camera, so G is the identity and the
    # rotation error is the angle of the model's own relative rotation; no translation to compare
    from scipy.spatial.transform import Rotation
    with torch.no_grad():
        model = tiny_run["model"]
        poses = model.estimate_pose(model.encode(ctx[None], ctx_k[None]), torch.cat([ctx[:1], tgt])[None])[0]
    c2w = l3d.pose_to_c2w(poses.double()).numpy()  # [4, 4, 4]: context view 0, then the targets
    relative = np.linalg.inv(c2w[0]) @ c2w[1:]
    angles = np.degrees(Rotation.from_matrix(relative[:, :3, :3]).magnitude())
    rows = [r for r in images if r[0] == "s3"]
    np.testing.assert_allclose([float(r[9]) for r in rows], angles, atol=1e-4)
    assert all(r[10] == "nan" for r in rows) and summary["pose_translation_error_deg"] is None
    assert summary["pose_rotation_error_deg"] == pytest.approx(np.mean([float(r[9]) for r in images]), abs=1e-9)

    folder = out / "renders" / "s3"
    assert Image.open(folder / "context.png").size == (2 * R, R)
    assert Image.open(folder / "targets.png").size == (2 * R, 3 * R)
    assert Image.open(next(folder.glob("video.*"))).n_frames == 3
    assert not list(out.glob("part.rank*"))


def test_rerun_skips_scored_scenes_and_keeps_what_a_killed_run_left(tiny_run, tmp_path):
    args, out = tiny_run["args"], tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny_run["out"] / "run.json", out)
    images = (tiny_run["out"] / "images.csv").read_text().splitlines()
    first = {}
    for line in images[1:]:
        first.setdefault(line.split(",")[0], []).append(line)
    # s0 tampered with (a rerun must not score it again), s1 only in a killed process's part file
    # (with a line cut short after it), s3 never scored
    tampered = [",".join(line.split(",")[:3] + ["99.000000"] + line.split(",")[4:]) for line in first["s0"]]
    (out / "images.csv").write_text("\n".join([images[0]] + tampered + first["s2"] + first["s4"]) + "\n")
    s1 = [[int(v), *map(float, m)] for _, v, *m in (line.split(",") for line in first["s1"])]
    cameras = [line.split(",") for line in (tiny_run["out"] / "cameras.csv").read_text().splitlines()[1:]]
    s1_cameras = [[int(v), *map(float, c)] for name, v, *c in cameras if name == "s1"]
    (out / "part.rank5.jsonl").write_text(json.dumps({"scene": "s1", "rows": s1, "cameras": s1_cameras})
                                          + '\n{"scene": "s3", "ro')
    summary = ev.main(args + ["--out", str(out)])
    again = (out / "images.csv").read_text().splitlines()
    assert again[1:10] == tampered + first["s1"] + first["s2"] and again[13:] == first["s4"]
    assert same_rows(again[10:13], first["s3"])
    assert summary["scenes"] == 5 and summary["images"] == 15 and summary["scored_now"] == 1  # s3 only
    assert summary["psnr"] == pytest.approx(np.mean([float(line.split(",")[3]) for line in again[1:]]), abs=1e-9)
    assert not list(out.glob("part.rank*"))
    with pytest.raises(ValueError, match="another image size"):  # not mixed into these scores
        ev.main(args + ["--out", str(out), "--res", "48"])


def test_scores_of_another_checkpoint_index_or_list_are_refused_then_restarted(tiny_run, tmp_path):
    args, out = tiny_run["args"], tmp_path / "out"
    ckpt = Path(args[args.index("--ckpt") + 1])
    moved = tmp_path / "same.pt"  # the same bytes under another name: the same scores
    shutil.copy(ckpt, moved)
    first = ev.main(args + ["--out", str(out)])
    assert ev.main([*args, "--out", str(out), "--ckpt", str(moved)])["scored_now"] == 0
    # a new checkpoint saved over the old path: its scores must not be the old ones
    other = tiny_model(seed=1)
    torch.save({"model": other.state_dict(), "config": asdict(other.config)}, moved)
    with pytest.raises(ValueError, match="another checkpoint.*--restart"):
        ev.main([*args, "--out", str(out), "--ckpt", str(moved)])
    index = Path(args[args.index("--index") + 1])
    changed = json.loads(index.read_text()) | {"s4": {"context": [5, 0], "target": [1, 2, 3]}}
    (tmp_path / "index.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="another index"):
        ev.main([*args, "--out", str(out), "--index", str(tmp_path / "index.json")])
    shutil.copytree(Path(tiny_run["data"]).parent, tmp_path / "copy")
    (tmp_path / "copy" / "full_list.txt").write_text("metadata/s0.json\n")
    with pytest.raises(ValueError, match="another data list"):
        ev.main([*args, "--out", str(out), "--data", str(tmp_path / "copy" / "full_list.txt")])
    fresh = ev.main([*args, "--out", str(tmp_path / "fresh"), "--ckpt", str(moved)])
    again = ev.main([*args, "--out", str(out), "--ckpt", str(moved), "--restart"])
    assert again["scored_now"] == 5 and again["psnr"] == pytest.approx(fresh["psnr"], abs=1e-9)
    assert abs(again["psnr"] - first["psnr"]) > 1e-3  # another model scored: the old scores are gone
    # and the folder now belongs to the new checkpoint: a plain rerun is taken, with nothing left to score
    assert ev.main([*args, "--out", str(out), "--ckpt", str(moved)])["scored_now"] == 0


def test_a_scene_counts_as_scored_only_once_its_video_is_written(tiny_run, tmp_path, monkeypatch):
    args, out = tiny_run["args"], tmp_path / "out"
    real = ev.save_video
    calls = []

    def dies_at_the_second(folder, frames, name="video"):
        calls.append(folder.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run killed while writing the second scene's video
        return real(folder, frames, name)
    monkeypatch.setattr(ev, "save_video", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        ev.main(args + ["--out", str(out), "--video", "3"])
    recorded = [json.loads(line)["scene"] for line in (out / "part.rank0.jsonl").read_text().splitlines()]
    assert recorded == calls[:1]  # the first scene, whose video is on disk; not the second
    monkeypatch.setattr(ev, "save_video", real)
    summary = ev.main(args + ["--out", str(out), "--video", "3"])
    assert summary["scored_now"] == 4 and all((out / "renders" / f"s{i}" / "video.webp").exists() or
                                              (out / "renders" / f"s{i}" / "video.gif").exists() for i in range(5))


def same_rows(a, b, keys=3):
    """CSV lines equal in their first `keys` columns (scene, view, position in images.csv; scene in
    metrics.csv) and up to the last printed digit in their metrics: scenes batched or threaded
    differently may round the other way in the 6th decimal. Pose errors, angles out of a float32
    model through an arccos, agree to 1e-3 degrees."""
    a, b = [line.split(",") for line in a], [line.split(",") for line in b]
    pose = keys + ev.METRICS.index("pose_rotation_error_deg")  # and the translation's next to it

    def close(x, y, tol):
        return np.allclose([float(v) for v in x], [float(v) for v in y], rtol=0, atol=tol, equal_nan=True)
    return len(a) == len(b) and all(x[:keys] == y[:keys] and close(x[keys:pose] + x[pose + 2:], y[keys:pose] + y[pose + 2:], 2e-6)
                                    and close(x[pose:pose + 2], y[pose:pose + 2], 1e-3) for x, y in zip(a, b))


def rodrigues(axis, angle):
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def test_pose_noise_has_its_scale_and_is_the_same_on_a_rerun():
    rng = np.random.default_rng(0)
    n, sigma = 4000, 0.01
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = rng.uniform(0, 3, n)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = [rodrigues(a, t) for a, t in zip(axis, angle)]
    c2w[:, :3, 3] = rng.normal(size=(n, 3))
    c2w = torch.tensor(c2w)
    noised = ev.noisy_cameras(c2w, sigma, "scene_a")
    assert torch.equal(noised, ev.noisy_cameras(c2w, sigma, "scene_a"))  # the same noise on a rerun
    assert not torch.allclose(noised, ev.noisy_cameras(c2w, sigma, "scene_b"))  # each scene its own
    assert torch.equal(ev.noisy_cameras(c2w, 0.0, "scene_a")[:, :3, 3], c2w[:, :3, 3])
    np.testing.assert_allclose(ev.noisy_cameras(c2w, 0.0, "scene_a").numpy(), c2w.numpy(), atol=1e-9)
    shift = (noised[:, :3, 3] - c2w[:, :3, 3]).numpy()  # the translation's noise itself
    assert abs(shift.std() - sigma) < 0.03 * sigma and abs(shift.mean()) < 0.05 * sigma
    # Noise e on a unit quaternion q turns the camera by 2 atan(|e_perp| / (1 + e.q)), about 2 |e_perp|,
    # e_perp being the 3 components across q: for e of scale sigma, a mean of 2 sigma 2 sqrt(2 / pi).
    r = c2w[:, :3, :3].transpose(1, 2) @ noised[:, :3, :3]
    turned = np.arccos(np.clip((np.trace(r.numpy(), axis1=1, axis2=2) - 1) / 2, -1, 1))
    expected = 4 * sigma * math.sqrt(2 / math.pi)
    assert abs(turned.mean() - expected) < 0.03 * expected, (turned.mean(), expected)
    np.testing.assert_allclose((noised[:, :3, :3] @ noised[:, :3, :3].transpose(1, 2)).numpy(),
                               np.tile(np.eye(3), (n, 1, 1)), atol=1e-9)  # still rotations


def test_pose_noise_moves_the_posed_models_and_not_uplvsm(tiny_run, tmp_path):
    args = tiny_run["args"]
    noisy = ev.main(args + ["--out", str(tmp_path / "noisy"), "--pose-noise", "0.3"])
    assert read_csv(tmp_path / "noisy" / "images.csv") == read_csv(tiny_run["out"] / "images.csv")
    assert noisy["pose_noise"] == 0.3 and noisy["psnr"] == tiny_run["summary"]["psnr"]
    with pytest.raises(ValueError, match="another pose noise"):
        ev.main(args + ["--out", str(tmp_path / "noisy"), "--pose-noise", "0.1"])
    torch.manual_seed(0)
    model = l3d.make_model(l3d.Config.tiny("lvsm"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "lvsm.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    at = {sigma: ev.main([*args, "--ckpt", str(ckpt), "--out", str(tmp_path / f"lvsm_{sigma}"), "--pose-noise",
                          str(sigma)]) for sigma in (0.0, 0.3)}
    assert abs(at[0.0]["psnr"] - at[0.3]["psnr"]) > 1e-3


# --- transfer between rooms -----------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """A stand-in UP-LVSM that knows the truth of a split. It places each image at the true camera of
    its frame, in a world of its own for every pair of context views (a rigid motion drawn from
    them), as UP-LVSM has the frame of its own context view 0. It renders a camera as the split's
    frame there, dimmed so that PSNR stays finite, and grey where the split has no frame."""

    def __init__(self, split):
        super().__init__()
        self.config = l3d.Config.tiny()
        R, p = self.config.image_size, self.config.patch_size
        frames = [f for meta in l3d.read_list(split / "full_list.txt") for f in l3d.read_scene(meta)["frames"]]
        self.images = [l3d.load_view(f["image_path"], f["fxfycxcy"], R, p)[0] for f in frames]
        self.c2w = torch.linalg.inv(torch.tensor([f["w2c"] for f in frames], dtype=torch.float64))

    @staticmethod
    def world(latents):
        """Context views [2, 3, R, R] -> the rigid motion [4, 4] from the truth's world to the model's."""
        rng = np.random.default_rng(int(latents.double().sum() * 1000))
        q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = q * np.sign(np.linalg.det(q)), rng.normal(size=3)
        return torch.tensor(m)

    def encode(self, ctx, ctx_k):
        return ctx

    def estimate_pose(self, latents, images):
        from scipy.spatial.transform import Rotation
        poses = []
        for ctx, views in zip(latents, images):
            for image in views:
                c2w = self.world(ctx) @ self.c2w[next(k for k, im in enumerate(self.images) if torch.equal(im, image))]
                poses.append(np.concatenate([c2w[:3, 3], Rotation.from_matrix(c2w[:3, :3]).as_quat()]))  # xyzw
        return torch.tensor(np.array(poses), dtype=torch.float32).reshape(*images.shape[:2], 7)

    def decode(self, latents, c2w, fxfycxcy):
        renders = []
        for ctx, cams in zip(latents, c2w):
            for cam in cams:
                gap = (self.c2w - torch.linalg.inv(self.world(ctx)) @ cam.double()).abs().amax((1, 2))  # [frames]
                near = int(gap.argmin())
                renders.append(0.8 * self.images[near] + 0.1 if gap[near] < 1e-4 else torch.full_like(self.images[0], 0.5))
        return torch.stack(renders).reshape(*c2w.shape[:2], *renders[0].shape)

    def forward(self, ctx, ctx_k, tgt, tgt_k, ctx_c2w=None, tgt_c2w=None):
        pose = self.estimate_pose(ctx, tgt)
        return self.decode(ctx, l3d.pose_to_c2w(pose), tgt_k), pose


@pytest.fixture(scope="module")
def transfer_split(tmp_path_factory):
    import prepare
    out = tmp_path_factory.mktemp("transfer")
    prepare.make_synthetic(out, size=(48, 32), frames=30, train_scenes=0, test_scenes=3, seed=3, workers=1)
    return out / "test_transfer"


def test_transfer_of_true_cameras_scores_as_the_direct_targets(transfer_split, tmp_path, monkeypatch, capsys):
    oracle = Oracle(transfer_split)
    monkeypatch.setattr(ev.l3d, "load_model", lambda ckpt, res=None: oracle)
    args = ["--ckpt", "oracle", "--data", str(transfer_split / "full_list.txt"), "--no-lpips", "--device", "cpu"]
    (tmp_path / "oracle").write_bytes(b"a stand-in")  # run.json digests the checkpoint file
    monkeypatch.chdir(tmp_path)
    summary = ev.main(args + ["--index", str(transfer_split / "transfer_index.json"), "--out", "transfer"])
    index = json.loads((transfer_split / "transfer_index.json").read_text())
    # by hand: the dimmed truth of every target of B (frames 2, 3, 4 of each pair's 10), against the truth
    truth = torch.stack([oracle.images[k] for k in range(len(oracle.images)) if k % 10 in (2, 3, 4)])
    expected = psnr64(0.8 * truth + 0.1, truth).mean().item()
    t = summary["transfer"]
    assert t["pairs"] == len(index) >= 1 and t["images"] == 3 * len(index)
    assert t["transfer_psnr"] == pytest.approx(expected, abs=1e-6) and t["direct_psnr"] == pytest.approx(expected, abs=1e-6)
    assert [row["pair"] for row in t["by_pair"]] == sorted(index) and all(abs(row["gap_db"]) < 1e-9 for row in t["by_pair"])
    assert f"transfer over {len(index)} pairs" in capsys.readouterr().out
    header, rows = read_csv(tmp_path / "transfer" / "images.csv")
    assert header.endswith(",transfer_psnr") and all(float(r[-1]) == pytest.approx(float(r[3]), abs=1e-9) for r in rows)
    # an ordinary index has no transfer score, and a transfer entry that cannot be scored is named
    monkeypatch.setattr(ev.l3d, "load_model", lambda ckpt, res=None: oracle)
    monkeypatch.chdir(tmp_path)
    plain = {k: {"context": v["context"], "target": v["target"]} for k, v in index.items()}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    assert "transfer" not in ev.main(args + ["--index", "plain.json", "--out", "plain"])
    broken = {k: v | {"transfer": {"context": [5, 6], "target": [7, 8]}} for k, v in index.items()}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"broken.json: the transfer entry of '{next(iter(index))}'.*2 targets"):
        ev.main(args + ["--index", "broken.json", "--out", "broken"])


def test_two_processes_give_the_files_of_one(tiny_run, tmp_path):
    cmd, env = torchrun(2, REPO / "eval.py", *tiny_run["args"], "--out", tmp_path / "two")
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=240, cwd=tmp_path)
    for name, keys in (("images.csv", 3), ("metrics.csv", 1)):
        two, one = ((d / name).read_text().splitlines() for d in (tmp_path / "two", tiny_run["out"]))
        assert two[0] == one[0] and same_rows(two[1:], one[1:], keys)
    two, one = json.loads((tmp_path / "two" / "summary.json").read_text()), tiny_run["summary"]
    # means of printed values, each of which may round the other way in its 6th decimal (same_rows)
    assert two.keys() == one.keys()
    for key in two.keys() - {"pose_rotation_error_deg", "by_position"}:
        assert two[key] == (pytest.approx(one[key], abs=2e-6) if isinstance(one[key], float) else one[key]), key
    one = tiny_run["summary"]["by_position"]
    assert two["by_position"].keys() == one.keys()
    for x in one:
        assert two["by_position"][x]["images"] == one[x]["images"]
        assert two["by_position"][x]["psnr"] == pytest.approx(one[x]["psnr"], abs=2e-6)
    assert two["pose_rotation_error_deg"] == pytest.approx(tiny_run["summary"]["pose_rotation_error_deg"], abs=1e-3)


def test_lpips_column_with_a_random_backbone(tiny_run, tmp_path, monkeypatch):
    lpips = pytest.importorskip("lpips")
    # pnet_rand: a randomly initialised VGG-16 (no download); lpips' own linear heads still load
    monkeypatch.setattr(lpips, "LPIPS", functools.partial(lpips.LPIPS, pnet_rand=True))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"s0": {"context": [0, 5], "target": [3, 1, 2]}}))
    args = [a for a in tiny_run["args"] if a != "--no-lpips"]
    summary = ev.main(args[:args.index("--index") + 1] + [str(index)] + args[args.index("--index") + 2:] + ["--out", str(tmp_path / "out")])
    _, images = read_csv(tmp_path / "out" / "images.csv")
    lp = [float(r[5]) for r in images]
    assert len(lp) == 3 and all(x > 0 for x in lp)
    assert summary["lpips"] == pytest.approx(np.mean(lp), abs=1e-9)


# --- bad data: named, counted apart, never fatal ---------------------------------------------------


def bad_data_run(tmp_path, index, edit=None, model=None):
    """eval.py over scenes s0..s3 (12 frames each) with `index`; edit(frames of scene s1) spoils it first."""
    data = write_scenes(tmp_path / "test", {f"s{i}": 12 for i in range(4)}, width=96)
    if edit:
        meta = tmp_path / "test" / "metadata" / "s1.json"
        scene = json.loads(meta.read_text())
        edit(scene["frames"])
        meta.write_text(json.dumps(scene))
    (tmp_path / "index.json").write_text(json.dumps(index))
    ckpt = tmp_path / "tiny.pt"
    model = model or tiny_model()
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    return ["--ckpt", str(ckpt), "--data", str(data), "--index", str(tmp_path / "index.json"), "--no-lpips",
            "--device", "cpu", "--out", str(tmp_path / "out")]


PAIRS = {f"s{i}": {"context": [0, 10], "target": [3, 5, 7]} for i in range(4)}


@pytest.mark.parametrize("spoil", ["singular", "equal rows", "zero focal", "nan"])
def test_a_scene_with_unusable_cameras_is_skipped_and_named_and_the_rest_scored(tmp_path, capsys, spoil):
    def edit(frames):
        f = frames[5]
        if spoil == "singular":
            f["w2c"] = np.zeros((4, 4)).tolist()
        elif spoil == "equal rows":
            f["w2c"][1] = list(f["w2c"][0])
        elif spoil == "zero focal":
            f["fxfycxcy"][0] = 0.0
        else:
            f["w2c"][0][3] = math.nan
    summary = ev.main(bad_data_run(tmp_path, PAIRS, edit))
    assert summary["unreadable"] == 1 and summary["scenes"] == 3 and summary["images"] == 9
    assert "s1 not scored: frame 5: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="frame 5: "):
        l3d.check_cameras(l3d.read_scene(tmp_path / "test" / "metadata" / "s1.json")["frames"])


def test_one_and_three_context_views_are_scored(tmp_path):
    index = {"s0": {"context": [4], "target": [3, 5, 7]}, "s1": {"context": [0, 10, 6], "target": [3, 5, 7]},
             "s2": {"context": [0, 10], "target": [3, 5, 7]}}
    args = bad_data_run(tmp_path, index)
    summary = ev.main(args)
    assert summary["scenes"] == 3 and summary["images"] == 9 and summary["unreadable"] == 0
    rows = {r[0]: r for r in read_csv(tmp_path / "out" / "images.csv")[1]}
    model = l3d.load_model(args[1])
    frames = l3d.read_scene(tmp_path / "test" / "metadata" / "s1.json")["frames"]
    ctx, ctx_k = l3d.load_views(frames, [0, 10, 6], 32, 8)
    tgt, tgt_k = l3d.load_views(frames, [7], 32, 8)
    with torch.no_grad():
        render = model(ctx[None], ctx_k[None], tgt[None], tgt_k[None])[0][0, 0]
    mse = ((render.double().clamp(0, 1) - tgt[0].double()) ** 2).mean()
    assert float(rows["s1"][3]) == pytest.approx(-10 * math.log10(mse), abs=2e-5)  # the last target of s1
    # the better of three context views copied; one context view: no position, no next camera to price
    copies = [-10 * math.log10(((ctx[k].double() - tgt[0].double()) ** 2).mean()) for k in range(3)]
    assert float(rows["s1"][6]) == pytest.approx(max(copies), abs=1e-5)
    assert rows["s0"][2] == "nan" and rows["s0"][7] != "nan"


def test_nonfinite_weights_are_refused_and_nonfinite_scenes_counted_apart(tmp_path, monkeypatch, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.decoder[0].mlp.fc1.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"tiny\.pt: 1 tensor\(s\) hold NaN .* decoder\.0\.mlp\.fc1\.weight"):
        ev.main(bad_data_run(tmp_path, PAIRS, model=model))
    # a scene whose renders come out NaN (here, by a model patched to spoil s2's): not in the means,
    # not recorded as scored, so a rerun tries it again
    real = ev.score

    def spoils_s2(model, batch, *args):
        render, rows, cameras, seconds = real(model, batch, *args)
        for k, scene in enumerate(batch):
            if scene["scene"] == "s2":
                render[k] = math.nan
                rows[k] = [[f, x, math.nan, *m[1:]] for f, x, *m in rows[k]]
        return render, rows, cameras, seconds
    monkeypatch.setattr(ev, "score", spoils_s2)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    args = bad_data_run(tmp_path / "b", PAIRS)
    summary = ev.main(args)
    assert "s2 not scored: its renders or scores are not finite" in capsys.readouterr().out
    assert summary["nonfinite"] == 1 and summary["scenes"] == 3 and summary["images"] == 9
    assert summary["images_averaged"]["psnr"] == 9
    monkeypatch.setattr(ev, "score", real)
    assert ev.main(args)["scored_now"] == 1


def test_index_mistakes_are_refused_by_scene_and_reason(tmp_path):
    for entry, why in [({"context": [0, 10], "target": [7, 7, 7]}, "repeated targets"),
                       ({"context": [0, 10], "target": [0, 5]}, r"targets \[0\] are context views too"),
                       ({"context": [0, 10], "target": [True, 5]}, "frame numbers must be plain integers, not True"),
                       ({"context": [0, 10], "target": [1.0, 5]}, "frame numbers must be plain integers, not 1.0"),
                       ({"context": [0, 0], "target": [5]}, "repeated context views")]:
        (tmp_path / "index.json").write_text(json.dumps(PAIRS | {"s2": entry}))
        with pytest.raises(ValueError, match=f"index.json: 1 entries cannot be scored: 's2': {why}"):
            l3d.read_index(tmp_path / "index.json")
    meant = {"context": [0, 10], "target": [0, 5, 10], "context_targets": True}
    (tmp_path / "index.json").write_text(json.dumps(PAIRS | {"s2": meant}))
    assert l3d.read_index(tmp_path / "index.json")["s2"] == meant


def test_nothing_scored_fails_and_leaves_no_folder_that_refuses_the_corrected_rerun(tmp_path):
    args = bad_data_run(tmp_path, {})
    with pytest.raises(ValueError, match="nothing scored: no scene of the index .*index.json.* from the list .*full_list.txt"):
        ev.main(args)
    run = subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True)
    assert run.returncode != 0 and "nothing scored" in run.stderr
    (tmp_path / "index.json").write_text(json.dumps(PAIRS))  # corrected: another index, same --out
    assert ev.main(args)["scored_now"] == 4


def test_a_list_with_a_byte_order_mark_reads_its_first_scene(tmp_path):
    args = bad_data_run(tmp_path, PAIRS)
    data = Path(args[args.index("--data") + 1])
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes().replace(b"\n", b"\r\n"))
    assert ev.main(args)["scenes"] == 4
    assert l3d.read_list(data)[0].endswith("s0.json")


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    args = bad_data_run(tmp_path, PAIRS)
    (tmp_path / "out").write_text("")
    with pytest.raises(SystemExit):
        ev.main(args)
    assert "is a file" in capsys.readouterr().err


def test_ptlvsm_trains_and_is_scored_with_the_target_cameras(tmp_path):
    rng = np.random.default_rng(3)
    data = write_scenes(tmp_path / "test", {"s0": 30, "s1": 30}, width=96)
    for meta in (tmp_path / "test" / "metadata").glob("*.json"):  # cameras that move: rotations and steps
        scene = json.loads(meta.read_text())
        for f in scene["frames"]:
            w2c = np.eye(4)
            w2c[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            w2c[:3, :3] *= np.sign(np.linalg.det(w2c[:3, :3]))  # a rotation, not a reflection
            w2c[:3, 3] = rng.normal(size=3)
            f["w2c"] = w2c.tolist()
        meta.write_text(json.dumps(scene))
    run = subprocess.run([sys.executable, str(REPO / "l3d.py"), "--tiny", "--model", "ptlvsm", "--data", str(data),
                          "--eval-data", str(data), "--steps", "2", "--batch", "2", "--save-every", "2",
                          "--out", str(tmp_path / "run"), "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    ckpt = tmp_path / "run" / "ckpt_0000002.pt"
    model = l3d.load_model(ckpt)
    assert isinstance(model, l3d.PTLVSM) and model.config == l3d.Config.tiny("ptlvsm")
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"s0": {"context": [2, 20], "target": [9, 4, 15]}, "s1": {"context": [0, 25], "target": [12, 3, 24]}}))
    ev.main(["--ckpt", str(ckpt), "--data", str(data), "--index", str(index), "--out", str(tmp_path / "eval"),
             "--no-lpips", "--device", "cpu"])
    _, rows = read_csv(tmp_path / "eval" / "images.csv")
    # s1 recomputed here: the cameras of the 5 indexed views normalised together, the targets' given
    frames = l3d.read_scene(tmp_path / "test" / "metadata" / "s1.json")["frames"]
    ctx, ctx_k = l3d.load_views(frames, [0, 25], 32, 8)
    tgt, tgt_k = l3d.load_views(frames, [12, 3, 24], 32, 8)
    c2w = l3d.load_cameras(frames, [0, 25, 12, 3, 24])
    with torch.no_grad():
        render = model(ctx[None], ctx_k[None], tgt[None], tgt_k[None], c2w[None, :2], c2w[None, 2:])[0][0]
    mse = ((render.double().clamp(0, 1) - tgt.double()) ** 2).flatten(1).mean(1)  # [3, 3, R, R] -> [3, 3*R*R] -> [3]
    np.testing.assert_allclose([float(r[3]) for r in rows if r[0] == "s1"], (-10 * torch.log10(mse)).numpy(), atol=2e-6)
    assert all(r[9] == r[10] == "nan" for r in rows)  # PT-LVSM is given its cameras: no pose error
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["pose_rotation_error_deg"] is None and summary["pose_translation_error_deg"] is None
    with pytest.raises(ValueError, match="--photos and --video need UP-LVSM"):
        ev.main(["--ckpt", str(ckpt), "--data", str(data), "--index", str(index), "--out", str(tmp_path / "v"),
                 "--no-lpips", "--device", "cpu", "--video", "4"])


# --- your own photos -------------------------------------------------------------------------------


def write_photo(path, w, h, seed=0, orientation=None, f35=None):
    """A smooth random photo with the EXIF tags given -> its pixels as stored, [h, w, 3]."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    exif = Image.Exif()
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    if f35:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.FocalLengthIn35mmFilm] = f35
    image.save(path, exif=exif)
    return np.asarray(image).astype(float)


def test_photo_exif_orientation_and_focal_length(tmp_path):
    # stored 80 x 50, orientation 6: the camera was held turned, so the photo is 50 wide and 80 tall,
    # the stored pixels turned 90 degrees clockwise
    stored = write_photo(tmp_path / "turned.jpg", 80, 50, orientation=6, f35=26)
    img, fxfycxcy, source = ev.read_photo(tmp_path / "turned.jpg")
    upright = np.asarray(img).astype(float)
    assert upright.shape == (80, 50, 3)
    assert np.abs(upright - np.rot90(stored, k=-1)).mean() < 3  # JPEG's loss only
    assert np.abs(upright - np.rot90(stored, k=1)).mean() > 10  # and not the other way round
    f = 26 * math.hypot(50, 80) / math.hypot(36, 24)  # 35 mm equivalent: the diagonal view of a 36 x 24 mm frame
    assert fxfycxcy == pytest.approx([f, f, 25.0, 40.0]) and "EXIF" in source
    # no focal length in EXIF: the stated field of view across the longer side
    write_photo(tmp_path / "plain.png", 120, 90)
    _, fxfycxcy, source = ev.read_photo(tmp_path / "plain.png", fov=90.0)
    assert fxfycxcy == pytest.approx([60.0, 60.0, 60.0, 45.0]) and "--fov 90" in source


def test_16_bit_float_and_transparent_photos_read_as_their_8_bit_copies(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 0..255 -> 0..65535
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    eight = np.asarray(ev.read_photo(tmp_path / "gray8.png")[0])
    assert np.array_equal(eight, np.repeat(gray[..., None], 3, -1))
    for name in ("gray16.png", "float.tiff"):
        assert np.array_equal(np.asarray(ev.read_photo(tmp_path / name)[0]), eight), name
    # transparent pixels over white, opaque ones as they are
    rgba = np.concatenate([rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                           np.where(np.arange(40) < 20, 255, 0).astype(np.uint8)[None, :, None].repeat(30, 0)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    img = np.asarray(ev.read_photo(tmp_path / "cutout.png")[0])
    assert np.array_equal(img[:, :20], rgba[:, :20, :3]) and np.all(img[:, 20:] == 255)


def test_a_photo_past_pillows_size_guard_is_named(tmp_path, monkeypatch):
    write_photo(tmp_path / "huge.png", 120, 90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 120 x 90 is over twice that: Pillow refuses it
    with pytest.raises(ValueError, match="huge.png: too large for Pillow's guard"):
        ev.read_photo(tmp_path / "huge.png")


def test_portrait_photo_is_cropped_in_height(tmp_path):
    # 40 wide, 100 tall, a bright band at y in [50, 52): resized to 32 x 80 (x0.8), then rows 24..56 kept
    img = np.zeros((100, 40, 3), np.uint8)
    img[50:52] = 255
    image, k = l3d.crop_view(Image.fromarray(img), [50.0, 50.0, 20.0, 50.0], res=32, patch=8)
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(k.numpy(), [40.0, 40.0, 16.0, 40.0 - 24], rtol=1e-6)
    profile = image[0].mean(1).double()
    centre = (profile * torch.arange(32)).sum() / profile.sum()  # the row moves like a projected point
    assert abs(centre.item() - (51 * 0.8 - 24 - 0.5)) < 0.2  # Lanczos rings a little; a crop off by one: 1


def photo_pair(tmp_path):
    write_photo(tmp_path / "a.png", 90, 60, seed=1)
    write_photo(tmp_path / "b.jpg", 60, 90, seed=2, orientation=3, f35=28)
    return [tmp_path / "a.png", tmp_path / "b.jpg"]


def photo_inputs(paths, cfg):
    """Photos as eval.py hands them to the model -> (images [2, 3, R, R], fxfycxcy [2, 4])."""
    views = [l3d.crop_view(*ev.read_photo(p)[:2], cfg.image_size, cfg.patch_size) for p in paths]
    return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])


def test_fly_through_goes_from_a_to_b_where_the_model_puts_them(tmp_path):
    model, cfg = tiny_model(), l3d.Config.tiny()
    images, fxfycxcy = photo_inputs(photo_pair(tmp_path), cfg)
    frames, poses, path_k, at_b = ev.fly_through(model, images, fxfycxcy, n_frames=12)
    assert frames.shape == (12, 3, cfg.image_size, cfg.image_size) and at_b == 9
    with torch.no_grad():  # the model's own renders of A and B as targets, at the cameras it estimates
        render, pose = model(images[None], fxfycxcy[None], images[None], fxfycxcy[None])
    for frame, end in ((0, 0), (at_b, 1)):  # the path starts at A's camera and passes through B's
        c2w_path, c2w_model = l3d.pose_to_c2w(poses[frame]), l3d.pose_to_c2w(pose[0, end])  # q and -q: one rotation
        np.testing.assert_allclose(c2w_path.numpy(), c2w_model.numpy(), atol=1e-6)
        np.testing.assert_allclose(path_k[frame].numpy(), fxfycxcy[end].numpy(), rtol=1e-6)
        np.testing.assert_allclose(frames[frame].numpy(), render[0, end].numpy(), atol=1e-5)
    # between them, the camera moves at a steady pace: along the line from A to B, then a little beyond
    t = torch.arange(12, dtype=torch.float64)[:, None] / 9
    a, b = pose[0, 0].double(), pose[0, 1].double()
    np.testing.assert_allclose(poses[:, :3].double().numpy(), (a[:3] + t * (b[:3] - a[:3])).numpy(), atol=1e-6)
    rotation = [2 * math.acos(min(1.0, abs(float(q.double() @ a[3:])))) for q in poses[:, 3:]]  # away from A's
    np.testing.assert_allclose(rotation, t[:, 0].numpy() * rotation[at_b], atol=1e-3)  # acos near 1: float32


def test_photos_command_writes_video_sheet_and_cameras(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    out, photos = tmp_path / "out", photo_pair(tmp_path)
    cameras = ev.main(["--photos", *map(str, photos), "--ckpt", str(ckpt), "--out", str(out),
                       "--frames", "10", "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["cameras.json", "contact_sheet.png", next(out.glob("flythrough.*")).name])
    video = Image.open(next(out.glob("flythrough.*")))
    durations = []
    for i in range(video.n_frames):  # the encoder may merge identical frames, adding up their durations
        video.seek(i)
        video.load()
        durations.append(video.info["duration"])
    assert sum(durations) == 10 * 33
    assert json.loads((out / "cameras.json").read_text()) == cameras
    with torch.no_grad():  # the path starts at A's camera as the model estimates it
        images, fxfycxcy = photo_inputs(photos, model.config)
        pose_a = model(images[None], fxfycxcy[None], images[None, :1], fxfycxcy[None, :1])[1][0, 0]
    np.testing.assert_allclose(cameras["frames"][0]["c2w"], l3d.pose_to_c2w(pose_a).numpy(), atol=1e-5)
    R = model.config.image_size
    assert Image.open(out / "contact_sheet.png").size == (8 * R, 3 * R)  # the photos, then 10 frames, 8 a row
    assert "EXIF: 28 mm equivalent" in capsys.readouterr().out


def test_photos_bad_input_is_named_and_leaves_nothing(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, ckpt)
    a, b = photo_pair(tmp_path)
    (tmp_path / "notes.jpg").write_text("not a picture")
    write_photo(tmp_path / "small.png", 40, 20)
    out = tmp_path / "out"
    cases = [([str(tmp_path / "nowhere.jpg"), str(b)], "nowhere.jpg: no such image"),
             ([str(tmp_path / "notes.jpg"), str(b)], "notes.jpg: not an image"),
             ([str(a), str(tmp_path / "small.png")], "small.png: 40x20 is smaller than the model's 32x32"),
             ([str(a), str(b)], "x999: no such checkpoint file, nor the name of released weights")]
    for k, (photos, why) in enumerate(cases):
        args = ["--photos", *photos, "--out", str(out), "--device", "cpu", "--ckpt", "x999" if "x999" in why else str(ckpt)]
        if k == 0:  # from the command line: one line, no traceback
            run = subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True)
            assert run.returncode != 0 and why in run.stderr and "Traceback" not in run.stderr, run.stderr
        else:
            with pytest.raises((ValueError, OSError), match=why):
                ev.main(args)
    for photos in ([str(a)], [str(a), str(b), str(a)]):  # one image, or three
        with pytest.raises(SystemExit) as stop:
            ev.main(["--photos", *photos, "--out", str(out), "--ckpt", str(ckpt)])
        assert stop.value.code == 2
        assert f"--photos takes two images of one scene, A and B; got {len(photos)}" in capsys.readouterr().err
    assert not out.exists()
