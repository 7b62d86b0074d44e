"""Pure sampling functions (no Ray, no decoder)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from dvfl.data import sampling as S


@pytest.mark.parametrize("n", [8, 9, 16, 17, 100, 301])
def test_tsn_train_one_frame_per_segment(n):
    T = 8
    for seed in range(20):
        idx = S.sample_clip_indices(n, T, "train", seed)
        assert idx.dtype == np.int32 and idx.shape == (T,)
        for s, f in enumerate(idx):
            assert (s * n) // T <= f < ((s + 1) * n) // T  # inside its own segment
        assert np.all(np.diff(idx) > 0)  # n >= T: strictly increasing


def test_train_views_are_deterministic_and_distinct():
    a = [S.tsn_train_indices(64, 8, S.view_rng(0, "vid_a", k)) for k in range(4)]
    b = [S.tsn_train_indices(64, 8, S.view_rng(0, "vid_a", k)) for k in range(4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x) for x in a}) == 4
    other_vid = S.tsn_train_indices(64, 8, S.view_rng(0, "vid_b", 0))
    other_seed = S.tsn_train_indices(64, 8, S.view_rng(1, "vid_a", 0))
    assert not np.array_equal(a[0], other_vid) and not np.array_equal(a[0], other_seed)


def test_train_sampling_covers_each_segment_uniformly():
    counts = np.zeros(32, int)
    for seed in range(4000):
        counts[S.tsn_train_indices(32, 8, seed)] += 1
    assert counts.min() > 800 and counts.max() < 1200  # 4 frames per segment, 1000 expected each


def test_uniform_clips():
    assert S.uniform_clip_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert S.uniform_clip_indices(80, 8, 0, 1).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    clips = [S.uniform_clip_indices(80, 8, k, 4) for k in range(4)]
    assert [c[0] for c in clips] == [1, 3, 6, 8]
    assert len({tuple(c) for c in clips}) == 4
    assert np.array_equal(S.sample_clip_indices(80, 8, "uniform", None, 2, 4), clips[2])
    with pytest.raises(ValueError):
        S.uniform_clip_indices(80, 8, 4, 4)


def test_short_video_repeats_frames():
    idx = S.uniform_clip_indices(3, 8)
    assert idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert S.tsn_train_indices(1, 8, 0).tolist() == [0] * 8
    with pytest.raises(ValueError):
        S.tsn_train_indices(0, 8, 0)
    with pytest.raises(ValueError):
        S.sample_clip_indices(10, 8, "center")


def test_plan_views_by_split():
    tr = S.plan_views(40, 8, "train", 3, "v", clips_per_video=3, eval_clips=2)
    assert [(v, k) for v, k, _ in tr] == [("train", 0), ("train", 1), ("train", 2)]
    un = S.plan_views(40, 8, "unlabeled", 3, "v", clips_per_video=2, eval_clips=2)
    assert [(v, k) for v, k, _ in un] == [("train", 0), ("train", 1)]
    te = S.plan_views(40, 8, "test", 3, "v", clips_per_video=3, eval_clips=2)
    assert [(v, k) for v, k, _ in te] == [("uniform", 0), ("uniform", 1)]
    assert np.array_equal(te[1][2], S.uniform_clip_indices(40, 8, 1, 2))
    assert S.clip_id("a/b", "train", 1) == "a/b|train1"


def test_resized_hw():
    assert S.resized_hw(240, 320, 128) == (128, 171)
    assert S.resized_hw(320, 240, 128) == (171, 128)
    assert S.resized_hw(32, 32, 32) == (32, 32)
    assert S.resized_hw(33, 47, 24) == (24, 34)
    assert S.resized_hw(240, 320, 0) == (240, 320)


def test_stable_seed_is_not_process_salted():
    # load sampling.py by path: importing the dvfl package would import torch (slow)
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('s', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.stable_seed('x', 1, 'vid'))")
    outs = set()
    for hs in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hs)
        outs.add(subprocess.run([sys.executable, "-c", code, S.__file__], env=env, capture_output=True,
                                text=True).stdout.strip())
    assert outs == {str(S.stable_seed("x", 1, "vid"))}


def test_teacher_and_student_pools_are_disjoint_balanced_and_nested():
    from dvfl.data.sampling import labelled_subset, pool_videos

    ids = [f"v{c}_{j}" for c in range(4) for j in range(20)]
    labels = [c for c in range(4) for _ in range(20)]
    teacher = pool_videos(ids, labels, 0.5, "teacher")
    students = pool_videos(ids, labels, 0.5, "student")
    assert not teacher & students and teacher | students == set(ids)
    for pool in (teacher, students):  # 10 of each class's 20 videos on each side
        assert sorted(sum(1 for v in pool if v.startswith(f"v{c}_")) for c in range(4)) == [10] * 4
    quarter = pool_videos(ids, labels, 0.5, "student", label_fraction=0.25)
    half = pool_videos(ids, labels, 0.5, "student", label_fraction=0.5)
    assert quarter < half < students and len(quarter) == 4 * round(0.25 * 10)
    # no teacher pool: the teacher gets everything, students' fractions are the old subsets
    assert pool_videos(ids, labels, 0.0, "teacher") is None
    assert pool_videos(ids, labels, 0.0, "student", 0.25) == labelled_subset(ids, labels, 0.25)
    # the data seed draws the students' subset (it was seed 0 whatever the run's seed); the teacher's
    # pool stays put, as the teacher is trained once for every seed
    assert pool_videos(ids, labels, 0.0, "student", 0.25, seed=3) == labelled_subset(ids, labels, 0.25, seed=3) \
        != labelled_subset(ids, labels, 0.25)
    assert pool_videos(ids, labels, 0.5, "teacher", seed=3) == teacher
    assert pool_videos(ids, labels, 0.5, "student", 0.25, seed=3) != quarter
    with pytest.raises(ValueError, match="teacher_pool"):
        pool_videos(ids, labels, 1.0, "teacher")
