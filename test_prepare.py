"""
Tests of prepare.py, on the CPU in seconds: RealEstate10K conversion of chunks made here with
Pillow, and the geometry of the generated rooms checked with numpy maths written here.

    python -m pytest -q test_prepare.py
"""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import l3d
import prepare

# -----------------------------------------------------------------------------
# Chunks in pixelSplat's format, made by hand


def jpeg(seed, w=64, h=36):
    """Smooth random colours plus a little noise, as JPEG bytes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def camera(k):
    """Row k of a scene's cameras: fx, fy, cx, cy over the image size, two unused numbers, the 3x4 w2c."""
    a = 0.1 * k
    w2c = [[np.cos(a), 0, np.sin(a), k], [0, 1, 0, -1], [-np.sin(a), 0, np.cos(a), 2]]
    return [0.5 + 0.01 * k, 0.9, 0.5, 0.45, 0.0, 0.0, *np.ravel(w2c)]


def scene(key, n, seed, w=64, h=36):
    return {"key": key, "url": f"https://youtube.com/{key}", "timestamps": torch.arange(n) * 33_000,
            "cameras": torch.tensor([camera(k) for k in range(n)], dtype=torch.float32),
            "images": [torch.frombuffer(bytearray(jpeg(seed + k, w, h)), dtype=torch.uint8) for k in range(n)]}


@pytest.fixture
def chunks(tmp_path):
    """src/train: two chunks of three scenes (one of 48x30 frames), src/test: one chunk of one scene."""
    src = tmp_path / "src"
    scenes = {"train": [[scene("aaa", 3, 0), scene("bbb", 4, 10)], [scene("ccc", 2, 20, w=48, h=30)]],
              "test": [[scene("ddd", 3, 30)]]}
    for split, split_chunks in scenes.items():
        (src / split).mkdir(parents=True)
        for i, chunk in enumerate(split_chunks):
            torch.save(chunk, src / split / f"{i:06d}.torch")
    by_key = {s["key"]: (split, s) for split, split_chunks in scenes.items() for c in split_chunks for s in c}
    return src, by_key


def decoded(data_or_path):
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as img:
        return np.asarray(img.convert("RGB"))


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


# -----------------------------------------------------------------------------
# RealEstate10K conversion


@pytest.mark.parametrize("png", [False, True])
def test_frames_cameras_and_list(chunks, tmp_path, png):
    src, by_key = chunks
    out = tmp_path / "out"
    summary = prepare.convert_re10k(src, out, png=png, workers=1)
    assert (summary["scenes"], summary["frames"]) == (4, 12)
    assert summary["bytes"] == sum(p.stat().st_size for p in out.rglob(f"*.{'png' if png else 'jpg'}"))

    for key, (split, s) in by_key.items():
        meta = json.loads((out / split / "metadata" / f"{key}.json").read_text())
        assert set(meta) == {"scene_name", "frames"} and meta["scene_name"] == key
        assert len(meta["frames"]) == len(s["images"])
        for k, (frame, data) in enumerate(zip(meta["frames"], s["images"])):
            assert set(frame) == {"image_path", "fxfycxcy", "w2c"}
            path = Path(frame["image_path"])
            assert path.is_absolute() and path == out.absolute() / split / "images" / key / f"{k:05d}.{'png' if png else 'jpg'}"
            data = data.numpy().tobytes()
            if not png:
                assert path.read_bytes() == data  # the JPEG is kept as it came
            assert np.array_equal(decoded(path), decoded(data))
            w, h = (48, 30) if key == "ccc" else (64, 36)
            fx, fy, cx, cy = np.float32([0.5 + 0.01 * k, 0.9, 0.5, 0.45]).tolist()
            assert frame["fxfycxcy"] == pytest.approx([fx * w, fy * h, cx * w, cy * h], rel=1e-12)
            assert frame["fxfycxcy"] == pytest.approx([(0.5 + 0.01 * k) * w, 0.9 * h, w / 2, 0.45 * h], rel=1e-6)
            w2c = np.array(frame["w2c"])
            a = 0.1 * k
            expected = [[np.cos(a), 0, np.sin(a), k], [0, 1, 0, -1], [-np.sin(a), 0, np.cos(a), 2], [0, 0, 0, 1]]
            np.testing.assert_allclose(w2c, expected, atol=1e-7)

    for split in ("train", "test"):
        listed = (out / split / "full_list.txt").read_text().splitlines()
        assert listed == sorted(str(p.absolute()) for p in (out / split / "metadata").glob("*.json"))
        assert [Path(p).stem for p in listed] == sorted(k for k, (s, _) in by_key.items() if s == split)


def test_bad_input_is_skipped_and_named(chunks, tmp_path, capsys):
    src, _ = chunks
    bad_frame = scene("eee", 3, 40)
    bad_frame["images"][1] = torch.frombuffer(bytearray(b"not a jpeg at all"), dtype=torch.uint8)
    truncated = scene("fff", 3, 50)
    truncated["images"][2] = truncated["images"][2][:200]
    miscounted = scene("ggg", 3, 60)
    miscounted["images"].pop()
    torch.save([bad_frame, truncated, miscounted, scene("hhh", 2, 70)], src / "train" / "000002.torch")
    (src / "train" / "000003.torch").write_text("this is not a torch file")

    out = tmp_path / "out"
    summary = prepare.convert_re10k(src, out, workers=1)
    err = capsys.readouterr().err
    assert sorted(name for name, _, _ in summary["bad_scenes"]) == ["eee", "fff", "ggg"]
    assert [Path(c).name for c, _ in summary["bad_chunks"]] == ["000003.torch"]
    for name, why in (("eee", "frame 1"), ("fff", "frame 2"), ("ggg", "3 cameras but 2 images")):
        assert any(name in line and "000002.torch" in line and why in line for line in err.splitlines()), err
        assert not (out / "train" / "metadata" / f"{name}.json").exists()
        assert not (out / "train" / "images" / name).exists()  # no half-written scene left behind
    assert "000003.torch" in err
    assert summary["scenes"] == 5  # aaa, bbb, ccc, hhh and the test split's ddd
    listed = [Path(p).stem for p in (out / "train" / "full_list.txt").read_text().splitlines()]
    assert listed == ["aaa", "bbb", "ccc", "hhh"]


def test_scenes_training_could_not_use_are_skipped_and_a_repeated_key_is_named_a_duplicate(chunks, tmp_path, capsys):
    src, _ = chunks
    empty = scene("iii", 0, 80)
    empty["cameras"] = torch.zeros(0, 18)
    nan = scene("jjj", 3, 90)
    nan["cameras"][1, 7] = float("nan")
    singular = scene("kkk", 3, 100)
    singular["cameras"][2, 6:] = 0.0
    first, second = scene("lll", 2, 110), scene("lll", 3, 120)
    torch.save([empty, nan, singular, first, second], src / "train" / "000002.torch")
    out = tmp_path / "out"
    summary = prepare.convert_re10k(src, out, workers=1)
    why = {name: reason for name, _, reason in summary["bad_scenes"]}
    assert why["iii"] == "no frames"
    assert why["jjj"].startswith("unusable cameras: frame 1: w2c is not finite")
    assert why["kkk"].startswith("unusable cameras: frame 2: the rotation part of w2c cannot be inverted")
    assert why["lll (#4)"].startswith("a duplicate")
    assert summary["done_before"] == 0 and "lll (#4)" in capsys.readouterr().err
    assert len(json.loads((out / "train" / "metadata" / "lll.json").read_text())["frames"]) == 2  # the first kept
    listed = [Path(p).stem for p in (out / "train" / "full_list.txt").read_text().splitlines()]
    assert listed == ["aaa", "bbb", "ccc", "lll"]


@pytest.mark.parametrize("flags, why", [(["--size", "0x0"], "size 0x0: frames need at least one patch"),
                                        (["--size", "1x1"], "size 1x1"),
                                        (["--train-scenes", "-3"], "--train-scenes -3: a number of scenes cannot be negative"),
                                        (["--test-scenes", "-1"], "--test-scenes -1")])
def test_synthetic_settings_are_checked_before_anything_is_written(tmp_path, flags, why):
    out = tmp_path / "synthetic"
    run = subprocess.run([sys.executable, str(Path(prepare.__file__)), "synthetic", "--out", str(out), *flags],
                         capture_output=True, text=True)
    assert run.returncode != 0 and why in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_rerun_is_a_no_op(chunks, tmp_path):
    src, _ = chunks
    out = tmp_path / "out"
    prepare.convert_re10k(src, out, workers=1)
    before = mtimes(out)
    summary = prepare.convert_re10k(src, out, workers=1)
    assert (summary["scenes"], summary["done_before"]) == (0, 4)
    assert mtimes(out) == before


def test_interrupted_run_completes(chunks, tmp_path):
    src, by_key = chunks
    out = tmp_path / "out"
    prepare.convert_re10k(src, out, workers=1)
    full_list = (out / "train" / "full_list.txt").read_text()
    # a run killed inside scene bbb: frames half written, its metadata not yet renamed into place
    (out / "train" / "metadata" / "bbb.json").rename(out / "train" / "metadata" / "bbb.json.tmp")
    (out / "train" / "images" / "bbb" / "00003.jpg").unlink()
    (out / "train" / "images" / "bbb" / "00002.jpg").write_bytes(b"half a jpeg")
    (out / "train" / "images" / "bbb" / "00007.png").write_bytes(b"left by another run")
    untouched = {p: t for p, t in mtimes(out).items() if "bbb" not in p.name and "bbb" not in p.parent.name
                 and p.name != "full_list.txt"}

    summary = prepare.convert_re10k(src, out, workers=1)
    assert (summary["scenes"], summary["done_before"]) == (1, 3)
    assert (out / "train" / "full_list.txt").read_text() == full_list
    assert sorted(p.name for p in (out / "train" / "images" / "bbb").iterdir()) == [f"{k:05d}.jpg" for k in range(4)]
    for k, data in enumerate(by_key["bbb"][1]["images"]):
        assert (out / "train" / "images" / "bbb" / f"{k:05d}.jpg").read_bytes() == data.numpy().tobytes()
    assert {p: t for p, t in mtimes(out).items() if p in untouched} == untouched


def test_scaling_lists_take_the_first_chunks_in_name_order(chunks, tmp_path, monkeypatch, capsys):
    src, _ = chunks
    # chunk 000002 has a bad scene; 000003 does not load but counts as a chunk: the sizes stay nested
    bad = scene("eee", 3, 40)
    bad["images"][1] = torch.frombuffer(bytearray(b"not a jpeg"), dtype=torch.uint8)
    torch.save([scene("fff", 2, 50), bad], src / "train" / "000002.torch")
    (src / "train" / "000003.torch").write_text("not a torch file")
    torch.save([scene("ggg", 2, 60)], src / "train" / "000004.torch")
    monkeypatch.setattr(prepare, "SCALING_SPLITS", {"little": 1, "medium": 3, "large": 5, "huge": 6})
    out = tmp_path / "out"
    summary = prepare.convert_re10k(src, out, workers=1)
    assert summary["scaling"] == {"little": (1, 2), "medium": (3, 4), "large": (5, 5), "huge": None}

    def listed(size):
        return [Path(p).stem for p in (out / "train" / f"{size}_list.txt").read_text().splitlines()]

    assert listed("little") == ["aaa", "bbb"]  # chunk 000000
    assert listed("medium") == ["aaa", "bbb", "ccc", "fff"]  # 000000 to 000002, without the bad scene
    assert listed("large") == ["aaa", "bbb", "ccc", "fff", "ggg"]
    assert not (out / "train" / "huge_list.txt").exists()
    assert "huge_list.txt: not written, 6 chunks needed" in capsys.readouterr().out
    for size in ("little", "medium", "large"):  # every listed file is a scene on disk
        assert all(Path(p).is_file() for p in (out / "train" / f"{size}_list.txt").read_text().splitlines())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "train").glob("*_list.txt")}
    summary = prepare.convert_re10k(src, out, workers=2)  # a rerun, all scenes done before: the same files
    assert summary["scaling"]["medium"] == (3, 4)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "train").glob("*_list.txt")} == before


def test_command_line_with_two_workers(chunks, tmp_path):
    src, _ = chunks
    out = tmp_path / "out"
    cmd = [sys.executable, "prepare.py", "re10k", "--src", str(src), "--out", str(out), "--split", "train",
           "--workers", "2"]
    run = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "converted 3 scenes, 9 frames" in run.stdout
    assert not (out / "test").exists()
    assert len((out / "train" / "full_list.txt").read_text().splitlines()) == 3


# -----------------------------------------------------------------------------
# Generated rooms

SEED, W, H, FRAMES = 3, 48, 32, 30


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    prepare.make_synthetic(out, size=(W, H), frames=FRAMES, train_scenes=2, test_scenes=1, seed=SEED, workers=1)
    return out


def saved_cameras(split_dir, name):
    frames = json.loads((split_dir / "metadata" / f"{name}.json").read_text())["frames"]
    return np.array([f["fxfycxcy"] for f in frames]), np.array([f["w2c"] for f in frames]), frames


def project(w2c, fxfycxcy, points):
    """World points [n, 3] -> pixel coordinates [n, 2] (x right, y down, pixel centres at +0.5) and depth [n]."""
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    fx, fy, cx, cy = fxfycxcy
    return np.stack([fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy], 1), cam[:, 2]


def test_layout_and_index(synthetic):
    for split, n in (("train", 2), ("test", 1)):
        listed = (synthetic / split / "full_list.txt").read_text().splitlines()
        assert [Path(p).name for p in listed] == [f"{split}_{k:05d}.json" for k in range(n)]
        for meta in listed:
            frames = json.loads(Path(meta).read_text())["frames"]
            assert len(frames) == FRAMES
            for f in frames:
                with Image.open(f["image_path"]) as img:
                    assert (img.size, img.mode, img.format) == ((W, H), "RGB", "PNG")
    index = json.loads((synthetic / "test" / "evaluation_index.json").read_text())
    (i, j), targets = index["test_00000"]["context"], index["test_00000"]["target"]
    assert 25 <= j - i <= FRAMES - 1 and j < FRAMES
    assert len(set(targets)) == 3 and all(i + (j - i) // 4 <= t < j - (j - i) // 4 for t in targets)
    # same settings: nothing to do; other settings: refused rather than mixed
    before = mtimes(synthetic)
    prepare.make_synthetic(synthetic, size=(W, H), frames=FRAMES, train_scenes=2, test_scenes=1, seed=SEED)
    assert mtimes(synthetic) == before
    with pytest.raises(ValueError, match="other settings"):
        prepare.make_synthetic(synthetic, size=(W, H), frames=FRAMES, train_scenes=3, test_scenes=1, seed=SEED)


def test_synthetic_scaling_lists_are_nested_in_name_order_and_extrapolation_lies_outside(tmp_path):
    prepare.make_synthetic(tmp_path, size=(16, 16), frames=27, train_scenes=64, test_scenes=20, seed=SEED)
    names = [f"train_{k:05d}.json" for k in range(64)]
    lists = {size: [Path(p).name for p in (tmp_path / "train" / f"{size}_list.txt").read_text().splitlines()]
             for size in ("little", "medium", "large", "full")}
    assert lists == {"little": names[:1], "medium": names[:4], "large": names[:16], "full": names}
    index = json.loads((tmp_path / "test" / "extrapolation_index.json").read_text())
    assert len(index) == 20 and sum(v is None for v in index.values()) == 1  # nulled as the official index
    for views in filter(None, index.values()):
        (i, j), targets = views["context"], views["target"]
        assert i < j and len(set(targets)) == 3
        assert all(0 <= t < 27 and not i <= t <= j for t in targets), views
    # too few scenes for a size: that list is not written, rather than written empty
    prepare.make_synthetic(tmp_path / "few", size=(16, 16), frames=27, train_scenes=8, test_scenes=0, seed=SEED)
    assert sorted(p.name for p in (tmp_path / "few" / "train").glob("*_list.txt")) == ["full_list.txt", "large_list.txt"]


def test_range_and_sweep_indexes_hold_the_context_pair_and_the_fractions_of_the_gap(synthetic):
    evaluation = json.loads((synthetic / "test" / "evaluation_index.json").read_text())
    (i, j) = evaluation["test_00000"]["context"]
    for name, fractions in (("range_index.json", [0, 1, 2, 3, 4]), ("sweep_index.json", list(range(11)))):
        index = json.loads((synthetic / "test" / name).read_text())
        assert index.keys() == evaluation.keys() and index["test_00000"]["context"] == [i, j]
        # the frame nearest to each fraction, halves rounded up: written out here for quarters and tenths
        parts = 4 if name == "range_index.json" else 10
        expected = [i + (k * (j - i) * 2 + parts) // (2 * parts) for k in fractions]
        assert index["test_00000"]["target"] == expected
        assert expected[0] == i and expected[-1] == j
    gap = [(0, 45), (13, 41), (6, 50)]  # hand-made pairs: odd, even and a gap of 44
    made = prepare.range_index({f"s{k}": {"context": list(c), "target": [0]} for k, c in enumerate(gap)} | {"n": None})
    assert made == {"s0": {"context": [0, 45], "target": [0, 11, 23, 34, 45], "context_targets": True},
                    "s1": {"context": [13, 41], "target": [13, 20, 27, 34, 41], "context_targets": True},
                    "s2": {"context": [6, 50], "target": [6, 17, 28, 39, 50], "context_targets": True}, "n": None}
    l3d.read_index(synthetic / "test" / "range_index.json")  # read as written: its context targets are meant


def test_generation_is_deterministic(synthetic, tmp_path):
    prepare.make_synthetic(tmp_path, size=(W, H), frames=FRAMES, train_scenes=1, test_scenes=0, seed=SEED, workers=1)
    for k in (0, FRAMES - 1):
        a = synthetic / "train" / "images" / "train_00000" / f"{k:05d}.png"
        assert np.array_equal(decoded(a), decoded(tmp_path / "train" / "images" / "train_00000" / f"{k:05d}.png"))


def test_camera_conventions(synthetic):
    fxfycxcy, w2c, _ = saved_cameras(synthetic / "train", "train_00001")
    centres, yaw, pitch = prepare.camera_walk(np.random.default_rng((SEED, 0, 1)), FRAMES)
    c2w = np.linalg.inv(w2c)
    np.testing.assert_allclose(c2w[:, :3, 3], centres, atol=1e-9)  # the camera centre is on the walk
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    # smooth walking; the look-around swing of at most 25 degrees on a period of at least 30 frames
    # bends the heading by at most 25 * (2 pi / 30)^2 = 1.1 degrees per frame squared
    assert steps.max() < 0.07 and np.abs(np.diff(yaw, 2)).max() < np.radians(1.2)
    np.testing.assert_allclose(c2w[:, :3, :3] @ c2w[:, :3, :3].transpose(0, 2, 1), np.broadcast_to(np.eye(3), (FRAMES, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(c2w[:, :3, :3]), 1, atol=1e-12)
    f = fxfycxcy[0, 0]
    assert np.all(fxfycxcy == [f, f, W / 2, H / 2]) and 0.55 * W <= f <= 0.7 * W

    for k in range(FRAMES):
        forward = np.array([np.cos(pitch[k]) * np.cos(yaw[k]), np.cos(pitch[k]) * np.sin(yaw[k]), np.sin(pitch[k])])
        right = np.array([np.sin(yaw[k]), -np.cos(yaw[k]), 0])  # heading turned clockwise, seen from above
        ahead, above, to_right = centres[k] + 3 * forward, centres[k] + 3 * forward + [0, 0, 0.5], centres[k] + 3 * forward + 0.5 * right
        (p_ahead, p_above, p_right), depth = project(w2c[k], fxfycxcy[k], np.stack([ahead, above, to_right]))
        np.testing.assert_allclose(p_ahead, [W / 2, H / 2], atol=1e-9)  # straight ahead: the principal point
        np.testing.assert_allclose(depth[0], 3, atol=1e-12)
        assert p_above[1] < H / 2 - 1 and abs(p_above[0] - W / 2) < 1e-6  # y points down
        assert p_right[0] > W / 2 + 1  # x points right


def test_views_agree_on_3d_points(synthetic):
    """A surface point seen at a pixel of one view is drawn in the same colour where it projects in another."""
    fxfycxcy, w2c, frames = saved_cameras(synthetic / "train", "train_00000")
    room, _, _ = prepare.random_scene(np.random.default_rng((SEED, 0, 0)), FRAMES, W, H)
    a, b = 0, 12
    image_a, image_b = (decoded(frames[k]["image_path"]).astype(np.float64) for k in (a, b))
    # rays through every pixel centre of view a, OpenCV camera, pixel centres at +0.5
    fx, fy, cx, cy = fxfycxcy[a]
    x, y = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    c2w_a = np.linalg.inv(w2c[a])
    dirs = np.stack([(x.ravel() - cx) / fx, (y.ravel() - cy) / fy, np.ones(W * H)], 1) @ c2w_a[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    points, normals, albedo = prepare.cast(room, c2w_a[:3, 3], dirs.T)
    # the renderer, one ray per pixel, shoots the same rays; with 2 x 2 it drew the saved picture
    one_ray = prepare.shade(normals, albedo).T.reshape(H, W, 3)  # [3, h*w] -> [h, w, 3]
    np.testing.assert_allclose(prepare.render(room, c2w_a[None], fxfycxcy[a], W, H, ss=1)[0], 255 * one_ray, atol=0.51)
    assert np.abs(prepare.render(room, c2w_a[None], fxfycxcy[a], W, H)[0] - image_a).max() <= 1
    points = points.T.astype(np.float64)  # [3, n] -> [n, 3] the surfaces hit
    # each hit is where the ray is, and where view a's pixel is
    along = ((points - c2w_a[:3, 3]) * dirs).sum(1)
    np.testing.assert_allclose(points, c2w_a[:3, 3] + along[:, None] * dirs, atol=1e-4)
    pix_a, _ = project(w2c[a], fxfycxcy[a], points)
    np.testing.assert_allclose(pix_a, np.stack([x.ravel(), y.ravel()], 1), atol=1e-3)

    # the same points in view b: keep those in frame and not hidden behind something else
    pix_b, depth_b = project(w2c[b], fxfycxcy[b], points)
    c2w_b = np.linalg.inv(w2c[b])
    to_points = points - c2w_b[:3, 3]
    seen = prepare.cast(room, c2w_b[:3, 3], (to_points / np.linalg.norm(to_points, axis=1, keepdims=True)).T)[0].T
    visible = ((depth_b > 0) & (pix_b[:, 0] >= 1) & (pix_b[:, 0] < W - 1) & (pix_b[:, 1] >= 1) & (pix_b[:, 1] < H - 1)
               & (np.linalg.norm(seen - points, axis=1) < 1e-3))
    assert visible.mean() > 0.3, "views 0 and 12 should share much of the scene"
    # pixels on edges blend their neighbours differently in each view: compare inside flat areas
    padded = np.pad(image_a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    flat = np.all([padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] == image_a for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                  axis=(0, 3)).ravel()  # [h, w] -> [h*w]
    keep = visible & flat
    assert keep.sum() > 100
    colour_a = image_a.reshape(-1, 3)[keep]  # [h, w, 3] -> [h*w, 3]
    colour_b = image_b[pix_b[keep, 1].astype(int), pix_b[keep, 0].astype(int)]
    diff = np.abs(colour_a - colour_b).max(1)
    assert np.mean(diff <= 2) > 0.9, np.mean(diff <= 2)
    # and the pixels of another spot would not agree
    shuffled = colour_b[np.random.default_rng(0).permutation(len(colour_b))]
    assert np.mean(np.abs(colour_a - shuffled).max(1) <= 2) < 0.5


def test_rooms_are_lit_from_straight_overhead():
    """Floor-like faces get the full light, walls and the ceiling only the ambient, a face tilted 60
    degrees from up the cosine of 60 degrees of it; whichever way a wall faces."""
    tilted = [math.sin(math.radians(60)), 0.0, math.cos(math.radians(60))]
    normals = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], tilted]).T  # [3, n]
    albedo = np.tile([[0.2], [0.5], [0.8]], (1, normals.shape[1]))  # [3, n]
    ambient = prepare.AMBIENT
    light = np.array([1, ambient, ambient, ambient, ambient, ambient, ambient + (1 - ambient) * 0.5])
    np.testing.assert_allclose(prepare.shade(normals, albedo), albedo * light, rtol=1e-12)


def test_walls_and_floor_differ_in_hue_not_brightness():
    """Both colours of every wall and of the floor average the same over R, G and B in every room, so
    that no half of a view is brighter for its colours; they still differ, and none exceeds 1."""
    walk = np.array([[0.0, 0.0, 1.5], [1.0, 0.5, 1.5]])
    for k in range(20):
        room = prepare.random_room(np.random.default_rng((SEED, 5, k)), walk)
        colours = np.concatenate([room.face_a[:5], room.face_b[:5]]).astype(np.float64)  # [10, 3]
        np.testing.assert_allclose(colours.sum(1) / 3, 0.55, atol=1e-6)
        assert colours.max() <= 1 and colours.min() >= 0
        assert np.abs(colours[:5, None] - colours[None, :5]).max() > 0.2  # some two faces tell apart


# -----------------------------------------------------------------------------
# The transfer split


def test_moved_cameras_of_a_hand_built_pair():
    # room A: the target 0.5 m ahead of context view 0 and turned 10 degrees towards +y, a second one
    # 0.3 m to its right, not turned; carried into room B, the same steps from B's context view 0
    def upright(centre, yaw_deg):  # x right, y down, z forward, looking along the heading yaw
        yaw = math.radians(yaw_deg)
        forward, right = np.array([math.cos(yaw), math.sin(yaw), 0]), np.array([math.sin(yaw), -math.cos(yaw), 0])
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = np.stack([right, np.cross(forward, right), forward], 1), centre
        return m

    def ahead(yaw_deg, metres):
        return metres * np.array([math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg)), 0])

    def to_right(yaw_deg, metres):
        return metres * np.array([math.sin(math.radians(yaw_deg)), -math.cos(math.radians(yaw_deg)), 0])
    a0, b0 = upright([1.0, 2.0, 1.5], 30), upright([-1.0, 0.5, 1.4], 200)
    a_targets = np.stack([upright(a0[:3, 3] + ahead(30, 0.5), 40), upright(a0[:3, 3] + to_right(30, 0.3), 30)])
    expected = np.stack([upright(b0[:3, 3] + ahead(200, 0.5), 210), upright(b0[:3, 3] + to_right(200, 0.3), 200)])
    np.testing.assert_allclose(prepare.moved_cameras(b0, a0, a_targets), expected, atol=1e-12)
    np.testing.assert_allclose(prepare.moved_cameras(a0, a0, a_targets), a_targets, atol=1e-12)  # A in itself


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    prepare.make_synthetic(out, size=(W, H), frames=FRAMES, train_scenes=0, test_scenes=3, seed=SEED, workers=1)
    return out


def test_transfer_split_holds_b_along_a_and_the_frames_it_came_from(transfer):
    index = json.loads((transfer / "test_transfer" / "transfer_index.json").read_text())
    evaluation = json.loads((transfer / "test" / "evaluation_index.json").read_text())
    # by hand: B is kept when some other room A's targets, carried into B, keep clear of B's walls and objects
    rooms = {name: prepare.random_scene(np.random.default_rng((SEED, 1, int(name[-1]))), FRAMES, W, H)[0]
             for name in evaluation}
    c2w_of = {name: np.linalg.inv(saved_cameras(transfer / "test", name)[1]) for name in evaluation}

    def clear(a, b):
        a_views, b_views = evaluation[a], evaluation[b]
        rel = np.linalg.inv(c2w_of[a][a_views["context"][0]]) @ c2w_of[a][a_views["target"]]
        return all(prepare.camera_clear(rooms[b], (c2w_of[b][b_views["context"][0]] @ m)[:3, 3]) for m in rel)
    kept = sorted(b for b in evaluation if any(clear(a, b) for a in evaluation if a != b))
    assert sorted(e["rooms"]["b"] for e in index.values()) == kept and kept
    listed = [Path(p).stem for p in (transfer / "test_transfer" / "full_list.txt").read_text().splitlines()]
    assert listed == sorted(index)
    for name, entry in index.items():
        a, b = entry["rooms"]["a"], entry["rooms"]["b"]
        assert name == f"{b}_along_{a}" and a != b
        assert entry["rooms"]["b_context"] == evaluation[b]["context"]
        assert [entry["rooms"]["a_context"], entry["rooms"]["a_target"]] == [evaluation[a]["context"], evaluation[a]["target"]]
        _, w2c, frames = saved_cameras(transfer / "test_transfer", name)
        _, w2c_a, frames_a = saved_cameras(transfer / "test", a)
        _, w2c_b, frames_b = saved_cameras(transfer / "test", b)
        c2w, c2w_a, c2w_b = (np.linalg.inv(m) for m in (w2c, w2c_a, w2c_b))
        (i, j), (ia, ja), ta = evaluation[b]["context"], evaluation[a]["context"], evaluation[a]["target"]
        # B's frames where B's cameras put them; the moved ones at C_B0 C_A0^-1 C_At; A's as they were
        np.testing.assert_allclose(c2w[:2], c2w_b[[i, j]], atol=1e-12)
        np.testing.assert_allclose(c2w[2:5], c2w_b[i] @ np.linalg.inv(c2w_a[ia]) @ c2w_a[ta], atol=1e-9)
        np.testing.assert_allclose(c2w[5:], c2w_a[[ia, ja, *ta]], atol=1e-12)
        assert entry["transfer"] == {"context": [5, 6], "target": [7, 8, 9]} and entry["target"] == [2, 3, 4]
        for k, (split_frames, f) in enumerate([(frames_b, i), (frames_b, j)] + [(frames_a, f) for f in [ia, ja, *ta]]):
            assert np.array_equal(decoded(frames[[0, 1, 5, 6, 7, 8, 9][k]]["image_path"]),
                                  decoded(split_frames[f]["image_path"]))
        assert all(prepare.camera_clear(rooms[b], c[:3, 3]) for c in c2w[2:5])
    # rerun with the same settings: the split is left as it is
    before = mtimes(transfer / "test_transfer")
    prepare.make_synthetic(transfer, size=(W, H), frames=FRAMES, train_scenes=0, test_scenes=3, seed=SEED, workers=1)
    assert mtimes(transfer / "test_transfer") == before


def test_room_b_through_the_transfer_path_at_its_own_cameras_is_its_own_frames(transfer, tmp_path):
    evaluation = json.loads((transfer / "test" / "evaluation_index.json").read_text())
    name, k = "test_00001", 1
    room, c2w, fxfycxcy = prepare.random_scene(np.random.default_rng((SEED, 1, k)), FRAMES, W, H)
    b = (name, room, c2w, fxfycxcy, evaluation[name])
    (tmp_path / "metadata").mkdir()
    made, entry = prepare.transfer_pair(tmp_path, b, b, W, H)  # B along its own path: its own targets
    frames = json.loads((tmp_path / "metadata" / f"{made}.json").read_text())["frames"]
    _, _, truth = saved_cameras(transfer / "test", name)
    for f, t in zip(entry["target"], evaluation[name]["target"]):
        assert np.array_equal(decoded(frames[f]["image_path"]), decoded(truth[t]["image_path"]))
    far = c2w.copy()
    far[evaluation[name]["target"], 0, 3] += 100  # A's targets 100 m from its context view: carried, they leave B
    assert prepare.transfer_pair(tmp_path, (name, room, far, fxfycxcy, evaluation[name]), b, W, H) is None


def test_camera_clear_keeps_cameras_off_walls_and_objects():
    room, c2w, _ = prepare.random_scene(np.random.default_rng((SEED, 1, 0)), FRAMES, W, H)
    middle = np.array([(room.lo[0] + room.hi[0]) / 2, (room.lo[1] + room.hi[1]) / 2, 1.5])
    box, ball, radius = (room.box_lo[0] + room.box_hi[0]) / 2, room.ball_centre[0], room.ball_radius[0]
    near = [box, room.box_hi[0] + 0.3, ball, ball + [0, 0, radius + 0.3], middle * [0, 1, 1] + [room.lo[0] + 0.3, 0, 0],
            middle * [0, 1, 1] + [room.hi[0] + 1.0, 0, 0], middle * [1, 1, 0] + [0, 0, room.hi[2] - 0.3]]
    for point in near:  # inside a box or a ball, 0.3 m from one, 0.3 m from a wall or the ceiling, outside
        assert not prepare.camera_clear(room, point), point
    # the walk is kept 0.6 m from every object and 1.5 m from the walls: every camera of it is clear
    assert all(prepare.camera_clear(room, c[:3, 3]) for c in c2w)
