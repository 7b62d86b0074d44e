"""The embedded synthetic dataset: real H.264/MP4 files, UCF101 layout, deterministic, motion-only classes."""
import dataclasses
import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_decord
from dvfl.data import synthetic as syn
from dvfl.data.adapters import ucf101, unlabeled

SMALL = dict(num_classes=4, train_per_class=3, test_per_class=2, unlabeled_videos=3, frames=12)


def _hashes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "videos")
    info = syn.generate(root, syn.SyntheticConfig(**SMALL), workers=1, log=None)
    return root, info


def test_layout_and_split_files(small_dataset):
    root, info = small_dataset
    assert info["videos"] == 4 * 5 + 3 and info["train"] == 12 and info["test"] == 8 and info["unlabeled"] == 3
    lines = open(os.path.join(root, "ucfTrainTestlist", "classInd.txt")).read().splitlines()
    assert lines == ["1 MoveRight", "2 MoveUp", "3 MoveLeft", "4 MoveDown"]
    train = open(os.path.join(root, "ucfTrainTestlist", "trainlist01.txt")).read().splitlines()
    test = open(os.path.join(root, "ucfTrainTestlist", "testlist01.txt")).read().splitlines()
    assert train[0] == "MoveRight/v_MoveRight_g08_c01.mp4 1"
    assert all(len(l.split()) == 1 for l in test)  # official format: path only
    assert all(1 <= int(l.split("_g")[1][:2]) <= 7 for l in test)      # UCF101 test groups
    assert all(8 <= int(l.split("_g")[1][:2]) <= 25 for l in train)
    m = ucf101(root, 1)
    assert not m.problems and len(m.entries) == 20
    assert {e.split for e in m.entries} == {"train", "test"}
    u = unlabeled(info["unlabeled_dir"])
    assert len(u.entries) == 3 and all(e.label is None and e.split == "unlabeled" for e in u.entries)
    truth = open(os.path.join(root, "unlabeled_pool_truth.csv")).read().splitlines()
    assert truth[0] == "path,label,class_name" and len(truth) == 4


@needs_decord
def test_files_are_real_h264_mp4(small_dataset):
    import av
    import decord

    root, _ = small_dataset
    p = os.path.join(root, "MoveUp", "v_MoveUp_g08_c01.mp4")
    with av.open(p) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264" and c.format.name.startswith("mov,mp4")
    vr = decord.VideoReader(p)
    assert len(vr) == 12 and vr[0].shape == (32, 32, 3) and abs(vr.get_avg_fps() - 8) < 1e-6


def test_generation_is_byte_identical_and_seeded(small_dataset, tmp_path):
    root, _ = small_dataset
    again = str(tmp_path / "again")
    syn.generate(again, syn.SyntheticConfig(**SMALL), workers=1, log=None)
    assert _hashes(root) == _hashes(again)
    other = str(tmp_path / "other")
    syn.generate(other, syn.SyntheticConfig(**dict(SMALL, seed=1)), workers=1, log=None)
    h1, h2 = _hashes(root), _hashes(other)
    videos = [k for k in h1 if k.endswith(".mp4")]
    assert sum(h1[k] != h2[k] for k in videos) == len(videos)


def test_generation_is_idempotent_and_refuses_other_config(small_dataset):
    root, _ = small_dataset
    before = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}
    info = syn.generate(root, syn.SyntheticConfig(**SMALL), workers=1, log=None)
    assert info["generated"] == 0
    # nothing rewritten: its lists and synthetic.json were replaced each time (an ingest beside the clips'
    # readers, a second command on one folder)
    assert {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(root).rglob("*")} == before
    with pytest.raises(ValueError, match="different configuration"):
        syn.generate(root, syn.SyntheticConfig(**dict(SMALL, seed=5)), workers=1, log=None)


def test_a_changed_config_replaces_the_old_dataset_in_a_way_a_kill_cannot_break(tmp_path):
    """The old dataset was deleted in place (shutil.rmtree, synthetic.json among the first files to
    go): a delete cut short left a folder every later run refused to touch. It is now moved aside in
    one rename and deleted there; what a killed run left aside is deleted by the next one."""
    root = tmp_path / "videos"
    syn.generate(str(root), syn.SyntheticConfig(**SMALL), workers=1, log=None)
    left_aside = tmp_path / ".videos.deleting-999-1"  # a run killed after its rename
    shutil.copytree(root, left_aside)
    (left_aside / syn.INFO_FILE).unlink()
    info = syn.generate(str(root), syn.SyntheticConfig(**dict(SMALL, seed=5)), workers=1, overwrite=True, log=None)
    assert info["generated"] == info["videos"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]
    (root / syn.INFO_FILE).unlink()
    with pytest.raises(syn.VideoFolderError, match=r"refusing to delete .* but no generated dataset"):
        syn.generate(str(root), syn.SyntheticConfig(**SMALL), workers=1, overwrite=True, log=None)
    # nor generated into: its split lists replaced a real dataset's, and the synthetic.json it left
    # let a later --overwrite delete the whole folder
    lists = sorted(p.read_bytes() for p in (root / syn.LIST_DIR).iterdir())
    with pytest.raises(syn.VideoFolderError, match=r"refusing to generate into .* but no generated dataset"):
        syn.generate(str(root), syn.SyntheticConfig(**dict(SMALL, seed=7)), workers=1, log=None)
    assert sorted(p.read_bytes() for p in (root / syn.LIST_DIR).iterdir()) == lists
    assert not (root / syn.INFO_FILE).exists()
    shutil.rmtree(root)
    (root / ".git").mkdir(parents=True)  # another hidden file: someone's (a later --fresh deleted the folder)
    with pytest.raises(syn.VideoFolderError, match=r"refusing to generate into .* but no generated dataset"):
        syn.generate(str(root), syn.SyntheticConfig(**SMALL), workers=1, log=None)
    shutil.rmtree(root)
    root.mkdir()  # only a killed first run's temporary of its synthetic.json: generated into
    (root / f".{syn.INFO_FILE}.1a2b3c4d.tmp").write_text("{")
    syn.generate(str(root), syn.SyntheticConfig(**SMALL), workers=1, log=None)
    shutil.rmtree(root)
    linked = tmp_path / "linked"  # the rename moved the link, then rmtree refused it: a traceback
    linked.symlink_to(root)
    syn.generate(str(root), syn.SyntheticConfig(**SMALL), workers=1, log=None)
    with pytest.raises(syn.VideoFolderError, match="is a link to"):
        syn.generate(str(linked), syn.SyntheticConfig(**dict(SMALL, seed=5)), workers=1, overwrite=True, log=None)
    assert (root / syn.INFO_FILE).is_file()


def test_parallel_generation_matches_serial(tmp_path):
    cfg = syn.SyntheticConfig(num_classes=8, train_per_class=8, test_per_class=1, frames=8)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    syn.generate(a, cfg, workers=1, log=None)
    syn.generate(b, cfg, workers=2, log=None)  # 72 videos: uses the process pool
    assert _hashes(a) == _hashes(b)


@pytest.mark.parametrize("num_classes", [8, 4])
def test_class_is_the_direction_of_motion(num_classes):
    cfg = syn.SyntheticConfig(num_classes=num_classes, noise_std=0.0)
    for c in range(num_classes):
        for j in range(5):
            frames, tr = syn.render_video(cfg, c, np.random.default_rng(1000 * c + j), return_track=True)
            dy, dx = tr["velocity"]
            angle = math.degrees(math.atan2(-dy, dx)) % 360
            want = 360.0 * c / num_classes
            assert min(abs(angle - want), 360 - abs(angle - want)) <= cfg.angle_jitter_deg + 1e-6
            speed = math.hypot(dy, dx)
            assert cfg.speed[0] <= speed <= cfg.speed[1]
            # TSN clips of 8 of the 16 frames see ~2 frames per step: 2.4-4.4 px of motion
            assert 2.4 <= 2 * speed <= 4.4
            # bounded motion: the object is drawn where the track says, always wholly inside the
            # frame, and it moves along the class direction until it reaches a wall
            my, mx = np.nonzero(tr["mask"])
            pos = tr["positions"]
            room = 32 - tr["mask"].shape[0]
            assert pos.min() >= 0 and pos.max() <= room
            assert np.all(np.diff(pos, axis=0) * np.sign(np.rint([dy, dx]).astype(int)) >= 0)
            assert np.abs(pos[-1] - pos[0]).max() >= min(room, 10)
            for t in (0, 7, 15):
                py, px = pos[t]
                got = frames[t, my + py, mx + px].astype(float)
                assert np.abs(got - np.clip(tr["colour"], 0, 255)).max() <= 1.0


def test_wrap_motion_is_still_available():
    cfg = syn.SyntheticConfig(motion="wrap", noise_std=0.0)
    _, tr = syn.render_video(cfg, 0, np.random.default_rng(3), return_track=True)
    assert np.diff(tr["positions"][:, 1]).min() > 0 and tr["positions"][:, 1].max() > 32 - cfg.object_size[1]
    with pytest.raises(ValueError, match="motion"):
        syn.SyntheticConfig(motion="bounce").validate()


def _centroids(frames):
    """Per frame: the (y, x) centroid of what differs from the frame's median colour."""
    fr = frames.astype(float)
    w = np.abs(fr - np.median(fr, axis=(1, 2), keepdims=True)).sum(-1)
    ys, xs = np.mgrid[0:fr.shape[1], 0:fr.shape[2]]
    return np.stack([(w * ys).sum((1, 2)) / w.sum((1, 2)), (w * xs).sum((1, 2)) / w.sum((1, 2))], 1)


def test_single_frames_carry_no_class_information():
    """Appearance statistics of one frame taken at a random time are the same for every class:
    compare per-class means of simple frame features with their spread across videos."""
    cfg = syn.SyntheticConfig()
    feats = {c: [] for c in range(8)}
    rng = np.random.default_rng(0)
    for c in range(8):
        for j in range(40):
            video = syn.render_video(cfg, c, np.random.default_rng(10_000 + 100 * c + j))
            t = int(rng.integers(0, cfg.frames))
            fr = video[t].astype(float)
            feats[c].append([fr.mean(), fr.std(), *_centroids(video[t:t + 1])[0]])
    means = np.array([np.mean(feats[c], 0) for c in range(8)])
    spread = np.std(np.concatenate([feats[c] for c in range(8)]), 0)
    # class means differ by far less than the within-dataset spread (40 videos per class)
    assert np.all(means.std(0) < 0.35 * spread)


def test_only_the_order_of_frames_tells_opposite_directions_apart():
    """A bag of frames (order ignored) looks the same for opposite directions - a reversed
    MoveLeft video is a MoveRight video - while the displacement from first to last frame
    separates them: a temporal model is needed."""
    cfg = syn.SyntheticConfig()
    n = 200
    bag, disp = {}, {}
    for c in (0, 4):  # MoveRight, MoveLeft
        tracks = [syn.render_video(cfg, c, np.random.default_rng(20_000 + 1000 * c + j), return_track=True)[1]
                  ["positions"].astype(float) for j in range(n)]
        bag[c] = np.array([[*tr.mean(0), *tr.std(0)] for tr in tracks])  # order-invariant
        disp[c] = np.array([tr[-1, 1] - tr[0, 1] for tr in tracks])
    # the bag statistics agree within 4 standard errors (they would not if, e.g., right-movers
    # kept to the left half); the displacement's sign tells the class every time
    se = np.sqrt(bag[0].var(0) / n + bag[4].var(0) / n) + 1e-9
    assert np.all(np.abs(bag[0].mean(0) - bag[4].mean(0)) < 4 * se)
    assert disp[0].min() >= 4 and disp[4].max() <= -4


def test_plain_background_leaves_only_the_object_changing():
    """background="plain" (the embedded default): with no noise, every pixel the object never
    covers keeps one colour through the video; "textured" varies across the frame."""
    plain = syn.SyntheticConfig(background="plain", noise_std=0.0, speed=(2.5, 3.5))
    frames, tr = syn.render_video(plain, 3, np.random.default_rng(7), return_track=True)
    covered = np.zeros(frames.shape[1:3], bool)
    my, mx = np.nonzero(tr["mask"])
    for py, px in tr["positions"]:
        covered[my + py, mx + px] = True
    background = frames[:, ~covered].reshape(-1, 3)
    assert len(background) > 0 and np.ptp(background, axis=0).max() == 0
    textured, _ = syn.render_video(syn.SyntheticConfig(noise_std=0.0), 3, np.random.default_rng(7), return_track=True)
    assert np.ptp(textured[0].reshape(-1, 3), axis=0).max() > 10
    with pytest.raises(ValueError, match="background must be one of"):
        syn.SyntheticConfig(background="stripes").validate()


def test_stop_motion_keeps_the_class_direction_until_the_wall():
    """motion="stop" (the embedded default): the object starts inside the frame, moves in the
    video's direction and stops at the first wall, so the net displacement a clip sees points
    within a few degrees of the class direction ("bounded" slides along walls and turns)."""
    cfg = syn.SyntheticConfig(motion="stop", background="plain", speed=(2.5, 3.5), noise_std=0.0,
                              angle_jitter_deg=20.0)
    for c in range(8):
        for j in range(6):
            _, tr = syn.render_video(cfg, c, np.random.default_rng([c, j]), return_track=True)
            pos, (dy, dx) = tr["positions"], tr["velocity"]
            room = 32 - tr["mask"].shape[0]
            assert pos.min() >= 0 and pos.max() <= room
            steps = np.diff(pos, axis=0)
            moving = np.abs(steps).sum(axis=1) > 0
            # it moves first and then stays: no wait at a start wall, no restart after stopping
            stopped = np.flatnonzero(~moving)
            assert moving[0] and (len(stopped) == 0 or not moving[stopped[0]:].any())
            ny, nx = pos[-1] - pos[0]
            err = abs((math.degrees(math.atan2(-ny, nx) - math.atan2(-dy, dx)) + 180) % 360 - 180)
            assert err <= 4.0 and math.hypot(ny, nx) >= 15


def test_label_noise_refiles_training_videos_under_wrong_classes_and_never_test_videos(tmp_path):
    """label_noise only moves training videos to another class's folder and split line (their
    content is the clean dataset's, byte for byte); the truth file names each one's real class."""
    cfg = syn.SyntheticConfig(**dict(SMALL, train_per_class=12, test_per_class=2, label_noise=0.5))
    clean = syn.SyntheticConfig(**dict(SMALL, train_per_class=12, test_per_class=2))
    noisy_root, clean_root = str(tmp_path / "noisy"), str(tmp_path / "clean")
    syn.generate(noisy_root, cfg, workers=1, log=None)
    syn.generate(clean_root, clean, workers=1, log=None)
    by_hash = {h: p for p, h in _hashes(clean_root).items() if p.endswith(".mp4")}
    noisy = {p: h for p, h in _hashes(noisy_root).items() if p.endswith(".mp4")}
    assert sorted(noisy.values()) == sorted(by_hash)  # the same videos, filed differently
    names = syn.class_names(4)
    truth = {row.split(",")[0]: int(row.split(",")[1])
             for row in open(os.path.join(noisy_root, syn.TRAIN_TRUTH)).read().splitlines()[1:]}
    assert len(truth) == 4 * 12
    m = ucf101(noisy_root, split=1)
    train = {os.path.relpath(e.path, noisy_root): e.label for e in m.entries if e.split == "train"}
    test = {os.path.relpath(e.path, noisy_root): e.label for e in m.entries if e.split == "test"}
    assert set(train) == set(truth) and len(test) == 4 * 2
    wrong = 0
    for rel, label in train.items():
        true_folder = by_hash[noisy[rel]].split("/")[0]
        assert names[truth[rel]] == true_folder  # the truth file is right about the content
        assert rel.split("/")[0] == names[label]  # folder and split line agree
        wrong += label != truth[rel]
    assert 0.3 < wrong / len(train) < 0.7
    for rel, label in test.items():  # the test set is curated: every video under its own class
        assert by_hash[noisy[rel]].split("/")[0] == names[label]
    assert "label_noise" not in syn.SyntheticConfig(**SMALL).as_dict()  # old datasets keep their identity


@needs_decord
def test_luma_contrast_keeps_the_object_bright_against_the_background_through_the_codec(tmp_path):
    """yuv420p halves colour resolution: an object that differs from the background mostly in hue
    reaches the model smeared. ``luma_contrast`` puts a brightness gap between them that survives
    H.264 (measured on the decoded frames), and leaves datasets without it as they were."""
    import decord

    def decoded_gaps(cfg):
        gaps = []
        for k in range(16):
            frames, tr = syn.render_video(cfg, k % 8, np.random.default_rng(100 + k), return_track=True)
            path = str(tmp_path / f"v{k}.mp4")
            syn.encode_mp4(frames, path, cfg.fps, cfg.crf)
            first = decord.VideoReader(path)[0].asnumpy().astype(np.float64) @ syn._LUMA
            obj = np.zeros(first.shape, bool)
            my, mx = np.nonzero(tr["mask"])
            obj[my + tr["positions"][0][0], mx + tr["positions"][0][1]] = True
            gaps.append(abs(np.median(first[obj]) - np.median(first[~obj])))
        return np.array(gaps)

    base = dict(background="plain", noise_std=3.0, speed=(2.5, 3.5), motion="stop")
    bright = decoded_gaps(syn.SyntheticConfig(**base, luma_contrast=90.0))
    plain = decoded_gaps(syn.SyntheticConfig(**base))
    assert bright.min() >= 75, bright
    assert (plain < 30).sum() >= 3, plain  # without it, objects nearly as bright as the background
    assert "luma_contrast" not in syn.SyntheticConfig(**base).as_dict()  # fingerprints of older datasets kept
    assert syn.SyntheticConfig(**base, luma_contrast=90.0).as_dict()["luma_contrast"] == 90.0
    with pytest.raises(ValueError, match="luma_contrast must be in"):
        syn.SyntheticConfig(luma_contrast=200.0).validate()


def test_val_split_holds_checked_videos_of_their_own(tmp_path):
    """val_per_class: a 'val' split (vallist01.txt, read by the ucf101 adapter) whose videos are
    filed under their true class even with label_noise, and whose files are neither training nor
    test videos; without it the dataset, its list files and its identity are as before."""
    cfg = syn.SyntheticConfig(**dict(SMALL, train_per_class=6, val_per_class=3, label_noise=0.5))
    root = str(tmp_path / "with_val")
    info = syn.generate(root, cfg, workers=1, log=None)
    assert (info["train"], info["val"], info["test"]) == (4 * 6, 4 * 3, 4 * 2)
    m = ucf101(root, split=1)
    by_split = {}
    for e in m.entries:
        by_split.setdefault(e.split, {})[os.path.relpath(e.path, root)] = e.label
    assert not m.problems and set(by_split) == {"train", "val", "test"} and len(by_split["val"]) == 4 * 3
    assert not set(by_split["val"]) & (set(by_split["train"]) | set(by_split["test"]))
    names = syn.class_names(4)
    hashes = _hashes(root)
    # checked: each one's content is its folder's class (drawn again as that class, the same bytes)
    seeds = {job.rel: job.seed for job in syn._plan(cfg)[0]}
    redraw = tmp_path / "redraw"
    for rel, label in by_split["val"].items():
        assert rel.split("/")[0] == names[label]
        syn._make_one((dataclasses.asdict(cfg), str(redraw), syn._Job(rel, names.index(rel.split("/")[0]), seeds[rel])))
        assert hashlib.sha256((redraw / rel).read_bytes()).hexdigest() == hashes[rel], rel
    assert len({hashes[r] for r in by_split["val"]}) == 4 * 3  # distinct videos, not copies
    assert not {hashes[r] for r in by_split["val"]} & {hashes[r] for r in by_split["train"]}
    # the training and test videos are those of the same config without a val split
    plain = str(tmp_path / "plain")
    syn.generate(plain, syn.SyntheticConfig(**dict(SMALL, train_per_class=6, label_noise=0.5)), workers=1, log=None)
    plain_hashes = _hashes(plain)
    assert {r: h for r, h in hashes.items() if r in by_split["train"] or r in by_split["test"]} == \
        {r: h for r, h in plain_hashes.items() if r.endswith(".mp4") and not r.startswith(syn.UNLABELED_DIR)}
    assert not os.path.exists(os.path.join(plain, syn.LIST_DIR, syn.VAL_LIST))
    assert {e.split for e in ucf101(plain, split=1).entries} == {"train", "test"}
    assert "val_per_class" not in syn.SyntheticConfig(**SMALL).as_dict()  # old datasets keep their identity

