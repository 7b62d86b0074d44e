"""Every dataset adapter on its own layout (real encoded video files), including the problems
each must report instead of crashing; then each adapter's manifest through the real Ray ingest."""
import json
import os
import shutil
import struct
from collections import Counter
from dataclasses import replace

import pytest

from dvfl.data import adapters as A
from dvfl.data.ingest import IngestConfig, ingest
from dvfl.data.shards import read_clips_table

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module")
def src_video(tmp_path_factory, video_factory):
    d = tmp_path_factory.mktemp("src")
    return video_factory(str(d / "src.mp4"), n=10, h=24, w=32, fps=10)


def put(root, rel, src):
    """A copy of the MP4 ``src`` with its own content: a trailing ``free`` box holding ``rel`` (ingest
    refuses the same bytes under two ids)."""
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    shutil.copyfile(src, p)
    tag = rel.encode()
    with open(p, "ab") as f:
        f.write(struct.pack(">I", 8 + len(tag)) + b"free" + tag)
    return p


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def reasons(m):
    return sorted(p.reason for p in m.problems)


# ---------------------------------------------------------------------------------------
# layouts

def make_ucf101(root, src):
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
                "Archery/v_Archery_g09_c02.avi", "Archery/v_Archery_g02_c01.avi", "Archery/v_Archery_g03_c01.avi"):
        put(root, "UCF-101/" + rel, src)
    lst = os.path.join(root, "ucfTrainTestlist")
    write(os.path.join(lst, "classInd.txt"), "1 ApplyEyeMakeup\n2 Archery\n")
    write(os.path.join(lst, "trainlist01.txt"),
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g09_c02.avi 2\n"
          "Archery/v_Archery_g10_c01.avi 2\n"          # listed but missing
          "Archery/v_Archery_g11_c01.avi 7\n"          # label out of range
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g12_c01.avi 2\n")  # label does not match the folder
    write(os.path.join(lst, "testlist01.txt"),
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g02_c01.avi\n"
          "Basketball/v_Basketball_g01_c01.avi\n")     # unknown class
    write(os.path.join(lst, "trainlist02.txt"), "Archery/v_Archery_g02_c01.avi 2\n")
    write(os.path.join(lst, "testlist02.txt"), "Archery/v_Archery_g03_c01.avi\n")
    return A.ucf101(root, 1)


def make_hmdb51(root, src):
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "cartwheel/c.avi", "cartwheel/d.avi"):
        put(root, rel, src)
    sd = os.path.join(root, "testTrainMulti_7030_splits")
    write(os.path.join(sd, "brush_hair_test_split1.txt"), "a.avi 1\nb.avi 2\n")
    write(os.path.join(sd, "cartwheel_test_split1.txt"), "c.avi 1 \nd.avi 0\ne.avi 2\nf.avi 9\n")
    return A.hmdb51(root, 1)


def make_ucf50(root, src):
    for rel in ("Biking/v_Biking_g01_c01.avi", "Biking/v_Biking_g02_c01.avi", "Diving/v_Diving_g01_c03.avi",
                "Diving/v_Diving_g07_c01.avi", "Diving/notes_clip.avi"):
        put(root, rel, src)
    write(os.path.join(root, "Diving", "README.txt"), "not a video, ignored")
    return A.ucf50(root, test_group=1)


def make_kinetics(root, src):
    put(root, "train/abseiling/aaa_000010_000020.mp4", src)
    put(root, "train/zumba/bbb_000000_000010.mp4", src)
    put(root, "val/zumba/ccc_000005_000015.mp4", src)
    write(os.path.join(root, "annotations", "train.csv"),
          "label,youtube_id,time_start,time_end,split\nabseiling,aaa,10,20,train\nzumba,bbb,0,10,train\n"
          "zumba,missing1,0,10,train\n")
    write(os.path.join(root, "annotations", "validate.csv"),
          "label,youtube_id,time_start,time_end,split\nzumba,ccc,5,15,validate\n,ddd,0,10,validate\n")
    return A.kinetics(root)


def make_ssv2(root, src):
    for i in ("101", "102", "103"):
        put(root, f"20bn-something-something-v2/{i}.webm", src)
    write(os.path.join(root, "labels", "labels.json"),
          json.dumps({"Holding something": "0", "Putting something on something": "1"}))
    write(os.path.join(root, "labels", "train.json"), json.dumps([
        {"id": "101", "label": "holding a cup", "template": "Holding [something]", "placeholders": ["a cup"]},
        {"id": "102", "label": "x", "template": "Putting [something] on [something]", "placeholders": []},
        {"id": "104", "label": "x", "template": "Holding [something]", "placeholders": []},  # missing file
        {"id": "105", "label": "x", "template": "Spinning [something]", "placeholders": []}]))  # unknown class
    write(os.path.join(root, "labels", "validation.json"),
          json.dumps([{"id": "103", "label": "x", "template": "Holding [something]", "placeholders": []}]))
    return A.ssv2(root)


def make_dvfl_csv(root, src):
    for rel in ("Archery/v_Archery_g01_c01.avi", "Archery/v_Archery_g02_c01.avi", "Biking/v_Biking_g01_c01.avi"):
        put(root, rel, src)
    write(os.path.join(root, "train.csv"),
          "Archery/v_Archery_g01_c01.avi,0\nBiking/v_Biking_g01_c01.avi,1\nBiking/v_Biking_g05_c01.avi,1\n")
    write(os.path.join(root, "val.csv"), "Archery/v_Archery_g02_c01.avi,0\nArchery/x.avi,5\nno-label-line\n")
    return A.dvfl_csv(root, num_classes=2)


def make_folder(root, src):
    for rel in ("cats/a.mp4", "cats/sub/b.mkv", "dogs/c.webm", "dogs/d.avi", "dogs/notes.txt"):
        put(root, rel, src) if not rel.endswith(".txt") else write(os.path.join(root, rel), "x")
    return A.folder(root)


LAYOUTS = {"ucf101": make_ucf101, "hmdb51": make_hmdb51, "ucf50": make_ucf50, "kinetics": make_kinetics,
           "ssv2": make_ssv2, "dvfl-csv": make_dvfl_csv, "folder": make_folder}


# ---------------------------------------------------------------------------------------
# manifests

def test_ucf101(tmp_path, src_video):
    m = make_ucf101(str(tmp_path), src_video)
    assert m.classes == ["ApplyEyeMakeup", "Archery"] and m.root.endswith("UCF-101")
    got = {(e.video_id, e.label, e.class_name, e.split) for e in m.entries}
    assert got == {("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", 0, "ApplyEyeMakeup", "train"),
                   ("Archery/v_Archery_g09_c02", 1, "Archery", "train"),
                   ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 0, "ApplyEyeMakeup", "test"),
                   ("Archery/v_Archery_g02_c01", 1, "Archery", "test")}
    assert reasons(m) == ["label_mismatch", "label_out_of_range", "missing", "unknown_class"]
    assert m.num_inputs == 8
    m2 = A.ucf101(str(tmp_path), 2)
    assert [(e.split, e.video_id) for e in m2.entries] == [("train", "Archery/v_Archery_g02_c01"),
                                                          ("test", "Archery/v_Archery_g03_c01")]
    with pytest.raises(A.AdapterError, match="not found"):
        A.ucf101(str(tmp_path), 3)
    with pytest.raises(A.AdapterError, match="split"):
        A.ucf101(str(tmp_path), 4)


def test_list_files_naming_files_in_another_encoding_find_them(tmp_path, src_video):
    """A UCF101-format tree whose names are Latin-1 bytes (read as lone surrogates): list files
    were decoded with errors="replace", so every such video was rejected as "missing"; the folder
    adapter found it. Names are stored as printable text either way."""
    root = os.fsencode(tmp_path / "ds")
    lists = os.path.join(root, b"ucfTrainTestlist")
    os.makedirs(os.path.join(root, b"UCF-101", b"Caf\xe9"))
    os.makedirs(lists)
    for g in (b"01", b"02"):
        shutil.copy(src_video, os.path.join(root, b"UCF-101", b"Caf\xe9", b"v_caf\xe9_g%s_c01.avi" % g))
    for name, text in ((b"classInd.txt", b"1 Caf\xe9\n"), (b"trainlist01.txt", b"Caf\xe9/v_caf\xe9_g01_c01.avi 1\n"),
                       (b"testlist01.txt", b"Caf\xe9/v_caf\xe9_g02_c01.avi\n")):
        with open(os.path.join(lists, name), "wb") as f:
            f.write(text)
    m = A.ucf101(str(tmp_path / "ds"), 1)
    assert reasons(m) == [] and m.classes == ["Caf\\xe9"]
    assert {(e.video_id, e.split) for e in m.entries} == {("Caf\\xe9/v_caf\\xe9_g01_c01", "train"),
                                                          ("Caf\\xe9/v_caf\\xe9_g02_c01", "test")}
    assert all(os.path.isfile(e.path) for e in m.entries)


def test_hmdb51(tmp_path, src_video):
    m = make_hmdb51(str(tmp_path), src_video)
    assert m.classes == ["brush_hair", "cartwheel"]
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {
        ("brush_hair/a", 0, "train"), ("brush_hair/b", 0, "test"), ("cartwheel/c", 1, "train")}
    assert reasons(m) == ["bad_line", "missing"]
    assert m.excluded == 1  # id 0: not used by this split, not an input


def test_ucf50_leave_one_group_out(tmp_path, src_video):
    m = make_ucf50(str(tmp_path), src_video)
    assert m.classes == ["Biking", "Diving"]
    assert {(e.video_id, e.split) for e in m.entries} == {
        ("Biking/v_Biking_g01_c01", "test"), ("Biking/v_Biking_g02_c01", "train"),
        ("Diving/v_Diving_g01_c03", "test"), ("Diving/v_Diving_g07_c01", "train")}
    assert reasons(m) == ["bad_name"]
    m7 = A.ucf50(str(tmp_path), test_group=7)
    assert {e.video_id for e in m7.entries if e.split == "test"} == {"Diving/v_Diving_g07_c01"}


def test_kinetics(tmp_path, src_video):
    m = make_kinetics(str(tmp_path), src_video)
    assert m.classes == ["abseiling", "zumba"]
    # an id,name class file (as dvfl-csv takes it): every row was a class name, every video unknown_class
    cf = write(str(tmp_path / "meta" / "classes.csv"), "id,name\n1,zumba\n0,abseiling\n")
    assert A.kinetics(str(tmp_path), classes_file=cf).classes == ["abseiling", "zumba"]
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {
        ("aaa_000010_000020", 0, "train"), ("bbb_000000_000010", 1, "train"), ("ccc_000005_000015", 1, "val")}
    assert reasons(m) == ["missing", "unknown_class"]
    # a CSV whose name and rows do not say the split is refused, not trained on; a name that ends in it says it
    write(os.path.join(str(tmp_path), "annotations", "k400_extra.csv"),
          "label,youtube_id,time_start,time_end\nzumba,eee,0,10\n")
    with pytest.raises(A.AdapterError, match=r"k400_extra\.csv:2: split 'k400_extra' is not train, val or test"):
        A.kinetics(str(tmp_path))
    os.rename(os.path.join(str(tmp_path), "annotations", "k400_extra.csv"),
              os.path.join(str(tmp_path), "annotations", "k400_val.csv"))
    assert {p.split for p in A.kinetics(str(tmp_path)).problems if p.video_id == "eee_000000_000010"} == {"val"}
    m = A.kinetics(str(tmp_path), [("val", os.path.join(str(tmp_path), "annotations", "k400_val.csv"))])
    assert {e.split for e in m.entries} | {p.split for p in m.problems} == {"val"}
    # a file named by the YouTube id alone holds no segment times: refused, not sampled from end to end
    put(str(tmp_path), "val/zumba/fff.mp4", src_video)
    write(os.path.join(str(tmp_path), "annotations", "k400_val.csv"),
          "label,youtube_id,time_start,time_end,split\nzumba,fff,30,40,val\n")
    m = A.kinetics(str(tmp_path), [("val", os.path.join(str(tmp_path), "annotations", "k400_val.csv"))])
    assert not m.entries and reasons(m) == ["untrimmed"]
    assert m.problems[0].video_id == "fff_000030_000040" and m.problems[0].path.endswith("fff.mp4")
    assert "ffmpeg -ss 30 -to 40" in m.problems[0].detail
    # an infinite time is a bad line, not an OverflowError ending the whole ingest
    write(os.path.join(str(tmp_path), "annotations", "k400_val.csv"),
          "label,youtube_id,time_start,time_end,split\nzumba,eee,0,inf,val\n")
    assert "bad_line" in reasons(A.kinetics(str(tmp_path), [("val", os.path.join(str(tmp_path), "annotations",
                                                                                    "k400_val.csv"))]))


def test_a_macos_copy_s_appledouble_files_are_not_classes_videos_or_lists(tmp_path, src_video):
    """A dataset copied through a Mac onto exFAT or a share holds a "._<name>" beside every file:
    HMDB51 read "._brush_hair_test_split1.txt" as 51 more classes, UCF50 and folder datasets took
    "._v_X.avi" for videos (each one a reject), and a Kinetics "._train.csv" (not UTF-8) ended the
    command with a traceback. Hidden files and folders are the system's, not the dataset's."""
    root = str(tmp_path)
    make_hmdb51(os.path.join(root, "hmdb"), src_video)
    make_ucf50(os.path.join(root, "ucf50"), src_video)
    make_kinetics(os.path.join(root, "k400"), src_video)
    clean = {name: (m.classes, sorted((e.video_id, e.split) for e in m.entries), reasons(m))
             for name, m in (("hmdb", A.hmdb51(os.path.join(root, "hmdb"), 1)), ("ucf50", A.ucf50(os.path.join(root, "ucf50"), 1)),
                             ("k400", A.kinetics(os.path.join(root, "k400"))))}
    for dirpath, _, names in list(os.walk(root)):
        for n in names:
            with open(os.path.join(dirpath, "._" + n), "wb") as f:
                f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe")   # AppleDouble: not UTF-8
    os.makedirs(os.path.join(root, "ucf50", "Biking", ".AppleDouble"))
    put(os.path.join(root, "ucf50"), "Biking/.AppleDouble/v_Biking_g03_c01.avi", src_video)
    for name, m in (("hmdb", A.hmdb51(os.path.join(root, "hmdb"), 1)), ("ucf50", A.ucf50(os.path.join(root, "ucf50"), 1)),
                    ("k400", A.kinetics(os.path.join(root, "k400")))):
        assert (m.classes, sorted((e.video_id, e.split) for e in m.entries), reasons(m)) == clean[name], name
    # a CSV that is not UTF-8 (saved from a spreadsheet as cp1252) is an error naming it, not a traceback
    write(os.path.join(root, "k400", "annotations", "train.csv"), "")
    with open(os.path.join(root, "k400", "annotations", "train.csv"), "wb") as f:
        f.write("label,youtube_id,time_start,time_end,split\ncaf\u00e9,aaa,10,20,train\n".encode("cp1252"))
    with pytest.raises(A.AdapterError, match=r"train\.csv is not UTF-8 text .*save it as UTF-8"):
        A.kinetics(os.path.join(root, "k400"))


def test_the_cluster_path_check_names_a_dataset_s_own_video_folder_by_root(tmp_path, src_video):
    """UCF101 unpacks its videos to <root>/UCF-101: a node that could not see them was reported as
    "--unlabeled <root>/UCF-101 is not on node ..." when no --unlabeled was given."""
    import argparse

    from dvfl.commands.ingest import video_folders

    root = str(tmp_path)
    m = make_ucf101(root, src_video)
    pool = os.path.join(root, "pool")
    put(pool, "x.mp4", src_video)
    m.extend(A.unlabeled(pool))
    a = argparse.Namespace(root=root, videos_dir=None, unlabeled=pool)
    assert video_folders(m, a) == {"--root": os.path.join(root, "UCF-101"), "--unlabeled": pool}


def test_ssv2(tmp_path, src_video):
    m = make_ssv2(str(tmp_path), src_video)
    assert m.classes == ["Holding something", "Putting something on something"]
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {("101", 0, "train"), ("102", 1, "train"),
                                                                    ("103", 0, "val")}
    assert reasons(m) == ["missing", "unknown_class"]
    for bad in ('["Holding something"]', '{"Holding something": "zero"}', "{not json", '{"a": 0, "b": 0}'):
        write(os.path.join(str(tmp_path), "labels", "labels.json"), bad)
        with pytest.raises(A.AdapterError, match=r"labels\.json: "):
            A.ssv2(str(tmp_path))


def test_splits_data_root_does_not_list_are_refused_before_the_ingest(tmp_path, src_video):
    """SSv2 lists train and validation only (its test labels are not public): a config testing on
    "test" ingested every video, then failed on the clips' splits (a traceback); now refused first."""
    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import check_manifest_splits

    m = make_ssv2(str(tmp_path), src_video)
    cfg = load_config(None, [("data.dataset", "ssv2"), ("data.root", str(tmp_path)), ("data.flip", False),
                             ("teacher.views", ["center"]), ("data.test_split", "test")], check_paths=False)
    with pytest.raises(ConfigError, match=r"^ssv2 at data\.root .* lists the split\(s\) 'train', 'val'; "
                                          r"data\.test_split is 'test': set those fields"):
        check_manifest_splits(cfg, m)
    ucf = make_ucf101(str(tmp_path / "ucf"), src_video)  # train and test listed: nothing to refuse
    check_manifest_splits(load_config(None, [("data.dataset", "ucf101"), ("data.root", str(tmp_path / "ucf"))],
                                      check_paths=False), ucf)


def test_kinetics_is_not_ingested_by_a_run_from_its_csvs_own_split_column(tmp_path, src_video):
    """configs/kinetics400.yaml reports on validate.csv (ingested as test); a run that ingested
    Kinetics itself took each CSV's split column: validate.csv became val and a labelled test.csv
    the test split. A run now refuses to ingest it, naming the command that does it as documented."""
    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import ensure_clips

    make_kinetics(str(tmp_path / "k400"), src_video)
    cfg = load_config(os.path.join(REPO_CONFIGS, "kinetics400.yaml"), [("data.root", str(tmp_path / "k400")),
                                                          ("data.clips", str(tmp_path / "clips"))], check_paths=False)
    with pytest.raises(ConfigError, match=r"a run does not ingest Kinetics itself .*--annotations test=annotations/validate\.csv "
                                          r"--frames 8 --clips-per-video 2 --eval-clips 4 --short-side 256 --seed 0 --out "):
        ensure_clips(cfg, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "clips")
    # `dvfl teacher` / `dvfl cache` check data.clips as an input before any work: a bare "path does
    # not exist" named no ingest command there (README "Kinetics-400")
    with pytest.raises(ConfigError, match=r"data\.clips .*path does not exist.*a run does not ingest Kinetics itself"
                                          r".*--annotations test=annotations/validate\.csv"):
        load_config(os.path.join(REPO_CONFIGS, "kinetics400.yaml"), [("data.root", str(tmp_path / "k400")),
                                                                     ("data.clips", str(tmp_path / "clips"))])


def test_dvfl_csv(tmp_path, src_video):
    m = make_dvfl_csv(str(tmp_path), src_video)
    assert m.classes == ["Archery", "Biking"]  # named from the folders (one folder per label)
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {
        ("Archery/v_Archery_g01_c01", 0, "train"), ("Biking/v_Biking_g01_c01", 1, "train"),
        ("Archery/v_Archery_g02_c01", 0, "val")}
    assert reasons(m) == ["bad_line", "label_out_of_range", "missing"]
    m3 = A.dvfl_csv(str(tmp_path), annotations=[("train", os.path.join(str(tmp_path), "train.csv"))],
                    num_classes=3)
    assert m3.classes == ["class_000", "class_001", "class_002"]
    # the DVFL-Net repository's labels/*.csv ("id,name" header, "0,Archery" lines) as --classes: read as
    # one name per line it named label 0 "id,name", label 1 "0,Archery" (every video filed wrongly)
    for text in ("id,name\n1,Biking\n0,Archery\n", "0,Archery\n1,Biking\n", "Archery\nBiking\n",
                 "id,name,\n0,Archery,\n1,Biking,\n"):  # (its SSv2 file: a comma ends every line)
        write(os.path.join(str(tmp_path), "labels.csv"), text)
        m4 = A.dvfl_csv(str(tmp_path), annotations=[("train", os.path.join(str(tmp_path), "train.csv"))],
                        classes_file=os.path.join(str(tmp_path), "labels.csv"))
        assert m4.classes == ["Archery", "Biking"], text
    write(os.path.join(str(tmp_path), "labels.csv"), "id,name\n0,Archery\n2,Biking\n")
    with pytest.raises(A.AdapterError, match=r"labels.csv: class ids \[0, 2\]... are not 0..1, each once"):
        A.dvfl_csv(str(tmp_path), annotations=[("train", os.path.join(str(tmp_path), "train.csv"))],
                   classes_file=os.path.join(str(tmp_path), "labels.csv"))


def test_folder(tmp_path, src_video):
    m = make_folder(str(tmp_path), src_video)
    assert m.classes == ["cats", "dogs"]
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {
        ("cats/a", 0, "train"), ("cats/sub/b", 0, "train"), ("dogs/c", 1, "train"), ("dogs/d", 1, "train")}
    # split dirs
    root2 = str(tmp_path / "split")
    for rel in ("train/a/1.mp4", "train/b/2.mp4", "test/a/3.mp4", "val/b/4.mp4"):
        put(root2, rel, src_video)
    m2 = A.folder(root2)
    assert {(e.video_id, e.split, e.class_name) for e in m2.entries} == {
        ("train/a/1", "train", "a"), ("train/b/2", "train", "b"), ("test/a/3", "test", "a"), ("val/b/4", "val", "b")}
    # deterministic hash split
    root3 = str(tmp_path / "many")
    for i in range(60):
        put(root3, f"c{i % 2}/v{i}.mp4", src_video)
    m3 = A.folder(root3, test_fraction=0.3)
    s1 = {e.video_id: e.split for e in m3.entries}
    s2 = {e.video_id: e.split for e in A.folder(root3, test_fraction=0.3).entries}
    # split rule 2: round(0.3 x 30) of each class's 30 videos (each its own recording), whatever --seed
    assert s1 == s2 and m3.source["split_rule"] == 2
    assert sorted(v for v, split in s1.items() if split == "test") == [
        "c0/v18", "c0/v32", "c0/v36", "c0/v44", "c0/v48", "c0/v52", "c0/v56", "c0/v58", "c0/v8",
        "c1/v11", "c1/v15", "c1/v19", "c1/v29", "c1/v3", "c1/v47", "c1/v49", "c1/v57", "c1/v59"]
    # rule 1's draw (every ingest before session 52 with the default --seed 0), kept for the ingests it made;
    # --seed (the views') never moved it: with --seed 1, 9 of these 12 test videos were train, so a teacher
    # trained before was tested on its own videos
    assert sorted(v for v, split in m3.earlier_splits.items() if split == "test") == [
        "c0/v22", "c0/v52", "c0/v58", "c0/v6", "c0/v8", "c1/v1", "c1/v19", "c1/v21", "c1/v27", "c1/v29", "c1/v3",
        "c1/v55"]


def test_a_class_is_a_folder_holding_a_video_and_a_dataset_needs_two(tmp_path, src_video):
    """train/Jump/notes.txt passed the "no training video teaches it" check (a folder of that name was
    there) and test/Jump's videos were scored against a class nothing taught; a folder of notes or
    stills, or an empty one, was a class; my_videos/all/<class>/ (--root one level too high) was one
    class, every model 100 % and a KD loss of 0; a root of no video file started Ray to write nothing,
    and left a plan that refused the corrected rerun."""
    split = str(tmp_path / "split")
    for rel in ("train/Run/a.mp4", "train/Walk/b.mp4", "test/Jump/c.mp4", "test/Run/d.mp4"):
        put(split, rel, src_video)
    write(os.path.join(split, "train", "Jump", "notes.txt"), "x")
    with pytest.raises(A.AdapterError, match=r"class folder test/'Jump' has videos but \S+/train/Jump holds no video "
                                             r"file \(looked for \.mp4, .*\.vob\): no training video teaches it"):
        A.folder(split)
    flat = str(tmp_path / "flat")
    for rel in ("cats/a.mp4", "dogs/sub/b.mp4"):
        put(flat, rel, src_video)
    write(os.path.join(flat, "birds", "notes.txt"), "x")
    write(os.path.join(flat, "stills", "x.jpg"), "x")
    os.makedirs(os.path.join(flat, "empty"))
    m = A.folder(flat)
    assert m.classes == ["cats", "dogs"] and {e.label for e in m.entries} == {0, 1}
    assert m.notes == ["3 class folder(s) hold no video file and are not classes (birds, empty, stills; looked for "
                       + ", ".join(A._d.VIDEO_EXTENSIONS) + ")"]
    # an empty test/ folder of a class train/ teaches: that class's missing test videos, not a non-class
    split2 = str(tmp_path / "split2")
    for rel in ("train/Jump/1.mp4", "train/Run/2.mp4", "test/Run/3.mp4"):
        put(split2, rel, src_video)
    os.makedirs(os.path.join(split2, "test", "Jump"))
    m = A.folder(split2)
    assert m.classes == ["Jump", "Run"] and m.notes == [
        "1 split folder(s) of a class hold no video file (test/Jump): that split says nothing of those classes"], m.notes
    high = str(tmp_path / "my_videos")
    for rel in ("all/cats/a.mp4", "all/dogs/b.mp4"):
        put(high, rel, src_video)
    with pytest.raises(A.AdapterError, match=r"one class \('all'\); a classifier needs at least 2: is --root one level "
                                             r"too high\? found one folder 'all', holding the folders 'cats', 'dogs': "
                                             r"--root \S+/my_videos/all"):
        A.folder(high)
    nothing = str(tmp_path / "nothing")
    write(os.path.join(nothing, "cats", "a.jpg"), "x")
    with pytest.raises(A.AdapterError, match=r"nothing: no video file in a class folder \(looked for \.mp4, "):
        A.folder(nothing)


def test_asf_3g2_and_f4v_files_are_videos_listed_and_decoded(tmp_path):
    """Containers the decoder reads (ASF, 3GPP2 and Flash MP4: CONTAINERS' asf and mp4) were not
    video files by their extension: a folder of them was no dataset, each skipped without a word."""
    from conftest import make_videos
    from dvfl.data import decode as D

    specs = [("a/x.asf", dict(codec="wmv2")), ("b/y.3g2", dict(codec="mpeg4")), ("b/z.f4v", dict(codec="libx264"))]
    make_videos([(str(tmp_path / p), dict(n=10, h=32, w=32, seed=i, **kw)) for i, (p, kw) in enumerate(specs)])
    m = A.folder(str(tmp_path))
    assert sorted(e.video_id for e in m.entries) == ["a/x", "b/y", "b/z"] and not m.problems
    for e in m.entries:
        res = D.decode_video({"path": e.path, "video_id": e.video_id, "split": "train", "frames": 4,
                              "clips_per_video": 1, "eval_clips": 1, "seed": 0, "short_side": 16, "min_frames": 4})
        assert res["ok"] and res["src_num_frames"] == 10 and res["views"][0][3].shape == (4, 16, 16, 3), (e.path, res)


def test_a_fraction_split_names_the_classes_it_drew_no_video_of(tmp_path, src_video):
    """--test-fraction drew video by video: a class of a few videos could get no test video (or no
    training one), without a word. Whole recordings are drawn per class now, and a class keeps one
    for training: a class of one video has no test video, said in a note."""
    root = str(tmp_path)
    for i in range(20):
        put(root, f"big/v{i}.mp4", src_video)
    put(root, "small/only.mp4", src_video)
    m = A.folder(root, test_fraction=0.3)
    assert Counter((e.class_name, e.split) for e in m.entries) == {("big", "test"): 6, ("big", "train"): 14,
                                                                   ("small", "train"): 1}
    assert m.notes == ["1 class(es) drew no test video (small): --test-fraction/--val-fraction draw whole recordings "
                       "per class (rec7_001, rec7_002 or rec7/001, rec7/002 stay together, and a class keeps one for "
                       "training), too few here, and the test score says nothing of them; add videos to those "
                       "classes, or give the splits as root/{train,val,test}/<class>/"]
    assert A.folder(root).notes == []  # no fraction: every video trains


def test_a_fraction_split_keeps_the_cuts_of_one_recording_on_one_side_and_every_class_in_each_split(tmp_path,
                                                                                                     src_video):
    """--test-fraction 0.25 --val-fraction 0.25 drew video by video: cuts of one recording (rec3_001,
    rec3_002, or rec3/001) fell in both train and test, and the test score flattered the model; a
    class could draw no test video. Now each class gives a quarter of its recordings, whole, to each."""
    root = str(tmp_path)
    for c in ("jump", "run"):
        for r in range(8):
            for k in range(3):
                put(root, f"{c}/rec{r}_{k:03d}.mp4" if c == "jump" else f"{c}/rec{r}/{k:03d}.mp4", src_video)
    m = A.folder(root, test_fraction=0.25, val_fraction=0.25)
    recording = {e.video_id: e.video_id.rsplit("_", 1)[0] if e.class_name == "jump" else e.video_id.rsplit("/", 1)[0]
                 for e in m.entries}
    sides = {}
    for e in m.entries:
        sides.setdefault(recording[e.video_id], set()).add(e.split)
    assert all(len(s) == 1 for s in sides.values()), sides
    assert Counter((e.class_name, e.split) for e in m.entries) == {
        (c, s): n for c in ("jump", "run") for s, n in (("train", 12), ("val", 6), ("test", 6))}
    # rule 1's video-by-video draw split recordings (what an earlier ingest of this folder holds)
    assert any(len({m.earlier_splits[v] for v in recording if recording[v] == r}) > 1 for r in sides)


def test_a_video_beside_the_class_folders_is_a_reject_not_left_out_unreported(tmp_path, src_video):
    """root/loose.mp4 was neither an input nor a reject: "written + rejected = inputs" held without it."""
    root = str(tmp_path / "flat")
    for rel in ("cats/a.mp4", "dogs/b.mp4", "loose.mp4", "notes.txt"):
        put(root, rel, src_video)
    m = A.folder(root)
    assert {e.video_id for e in m.entries} == {"cats/a", "dogs/b"}
    assert [(p.reason, p.video_id, p.split) for p in m.problems] == [("no_class", "loose", "train")]
    assert "not inside a class folder" in m.problems[0].detail
    # outside the fingerprint: an ingest made before such files were listed is still this dataset's
    from dvfl.data.ingest import compute_fingerprint, file_identity

    identities = {e.video_id: file_identity(e.path) for e in m.entries}
    listed = compute_fingerprint(m, {}, identities)
    m.problems = []
    assert compute_fingerprint(m, {}, identities) == listed
    root2 = str(tmp_path / "split")
    for rel in ("train/a/1.mp4", "train/b/5.mp4", "test/a/2.mp4", "train/3.mp4", "4.mov"):
        put(root2, rel, src_video)
    assert sorted((p.video_id, p.split) for p in A.folder(root2).problems) == [("4", "train"), ("train/3", "train")]


def test_a_class_folder_named_like_a_split_is_refused_not_read_as_the_split(tmp_path, src_video):
    # root/{bus,car,train}: read as one split folder holding no classes; every video vanished unreported
    for rel in ("bus/1.mp4", "car/2.mp4", "train/3.mp4"):
        put(str(tmp_path), rel, src_video)
    with pytest.raises(A.AdapterError, match=r"has split folders \(train\) and other folders \(bus, car\)"):
        A.folder(str(tmp_path))


def test_split_folders_are_known_by_their_meaning_and_underscore_folders_are_classes(tmp_path, src_video):
    """root/Train/<class>, root/Test/<class> (or training/, testing/) were read as two classes named
    after the splits, every video labelled by its split; a class folder named _other was skipped
    without a word (neither an input nor a reject)."""
    root = str(tmp_path / "caps")
    for rel in ("Train/run/1.mp4", "Train/_other/2.mp4", "Testing/run/3.mp4", "Testing/_other/4.mp4",
                "Train/__MACOSX/5.mp4", "Train/.cache/6.mp4"):
        put(root, rel, src_video)
    m = A.folder(root)
    assert m.classes == ["_other", "run"]
    assert {(e.video_id, e.split, e.class_name) for e in m.entries} == {
        ("Train/run/1", "train", "run"), ("Train/_other/2", "train", "_other"),
        ("Testing/run/3", "test", "run"), ("Testing/_other/4", "test", "_other")}
    root = str(tmp_path / "twice")
    for rel in ("train/a/1.mp4", "Training/a/2.mp4"):
        put(root, rel, src_video)
    with pytest.raises(A.AdapterError, match=r"more than one folder is the train split \(Training, train\)"):
        A.folder(root)


def test_listed_videos_transcoded_or_renamed_by_case_or_unicode_form_are_found(tmp_path, src_video):
    """UCF101 transcoded to .mp4 (a common speed-up) while the official lists name .avi, a file saved
    as .AVI, a list typed in NFC beside files a Mac wrote in NFD: every such video was 'listed but no
    such file'. The one video beside it with the listed name up to those is taken, under the list's
    id; two candidates are not guessed between."""
    root = str(tmp_path / "ucf")
    cafe_nfd = "Cafe\u0301"
    for rel in ("UCF-101/Run/v_Run_g01_c01.mp4", "UCF-101/Run/v_Run_g02_c01.AVI", f"UCF-101/Run/v_{cafe_nfd}_g03_c01.avi",
                "UCF-101/Run/v_Run_g04_c01.mp4", "UCF-101/Run/v_Run_g04_c01.mkv", "UCF-101/Run/._v_Run_g05_c01.mp4"):
        put(root, rel, src_video)
    lst = os.path.join(root, "ucfTrainTestlist")
    write(os.path.join(lst, "classInd.txt"), "1 Run\n")
    write(os.path.join(lst, "trainlist01.txt"), "Run/v_Run_g01_c01.avi 1\nRun/v_Run_g02_c01.avi 1\n"
          "Run/v_Caf\u00e9_g03_c01.avi 1\nRun/v_Run_g04_c01.avi 1\nRun/v_Run_g05_c01.avi 1\n")
    write(os.path.join(lst, "testlist01.txt"), "")
    m = A.ucf101(root, 1)
    assert {e.video_id: os.path.basename(e.path) for e in m.entries} == {
        "Run/v_Run_g01_c01": "v_Run_g01_c01.mp4", "Run/v_Run_g02_c01": "v_Run_g02_c01.AVI",
        "Run/v_Caf\u00e9_g03_c01": f"v_{cafe_nfd}_g03_c01.avi"}
    assert sorted((p.reason, p.video_id) for p in m.problems) == [
        ("missing", "Run/v_Run_g04_c01"), ("missing", "Run/v_Run_g05_c01")]  # two candidates; a Mac's ._ copy
    # an unlabelled list naming a.avi (gone, a.mp4 taken for it) and a.mp4 itself: one video, not two
    pool = str(tmp_path / "pool")
    put(pool, "v/a.mp4", src_video)
    put(pool, "v/b.webm", src_video)
    write(os.path.join(pool, "list.txt"), "v/a.avi\nv/a.mp4\nv/b.avi\n")
    m = A.unlabeled(os.path.join(pool, "list.txt"))
    inputs = m.num_inputs
    m.dedupe()
    assert [(e.video_id, os.path.basename(e.path)) for e in m.entries] == [
        ("unlabeled/v/a.avi", "a.mp4"), ("unlabeled/v/b", "b.webm")]
    assert [(p.reason, p.video_id) for p in m.problems] == [("duplicate", "unlabeled/v/a.mp4")]
    assert m.num_inputs == inputs == 3


def test_a_nas_or_windows_drives_own_folders_are_neither_classes_nor_videos(tmp_path, src_video):
    """A Synology share's @eaDir (with .mp4 previews inside) and #recycle, an NTFS/exFAT drive's
    $RECYCLE.BIN and System Volume Information became classes (label 0 shifted every real label)
    or their files videos of the class they sat in."""
    root = str(tmp_path / "nas")
    for rel in ("Run/1.mp4", "Walk/2.mp4", "Run/@eaDir/1.mp4/SYNOPHOTO_FILM_M.mp4", "@eaDir/x.mp4",
                "#recycle/Run/3.mp4", "$RECYCLE.BIN/S-1-5/4.mp4", "System Volume Information/5.mp4"):
        put(root, rel, src_video)
    m = A.folder(root)
    assert m.classes == ["Run", "Walk"]
    assert sorted(e.video_id for e in m.entries) == ["Run/1", "Walk/2"] and not m.problems
    split_root = str(tmp_path / "split")
    for rel in ("train/Run/1.mp4", "test/Run/2.mp4", "train/Walk/3.mp4", "@eaDir/train/x.mp4", "train/@eaDir/y.mp4"):
        put(split_root, rel, src_video)
    m = A.folder(split_root)
    assert m.classes == ["Run", "Walk"] and sorted(e.video_id for e in m.entries) == [
        "test/Run/2", "train/Run/1", "train/Walk/3"]


def test_two_videos_differing_only_by_extension_are_two_inputs(tmp_path, src_video):
    """run/a.avi and run/a.mp4 both had the id run/a: the second was rejected as a duplicate ("also
    listed") though it is another video; the unlabelled pool already kept the extension there."""
    root = str(tmp_path / "ds")
    for rel in ("run/a.avi", "run/a.mp4", "run/b.mp4", "walk/a.MP4"):
        put(root, rel, src_video)
    m = A.folder(root)
    assert [e.video_id for e in m.entries] == ["run/a.avi", "run/a.mp4", "run/b", "walk/a"] and not m.problems
    root = str(tmp_path / "ucf50")
    for rel in ("Biking/v_Biking_g01_c01.avi", "Biking/v_Biking_g01_c01.mp4", "Diving/v_Diving_g02_c01.avi"):
        put(root, rel, src_video)
    m = A.ucf50(root, 1)
    assert [e.video_id for e in m.entries] == ["Biking/v_Biking_g01_c01.avi", "Biking/v_Biking_g01_c01.mp4",
                                               "Diving/v_Diving_g02_c01"] and not m.problems


def test_a_folder_the_ingest_cannot_read_is_refused_not_skipped(src_video):
    """os.walk skips a folder it cannot list: its videos were neither inputs nor rejects and the
    ingest said written + rejected = inputs. A listed file under such a folder is unreadable, not missing."""
    import subprocess
    import sys

    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="dvfl-test-unreadable-"))  # pytest's own temp folders are root's only
    root = str(base / "ds")
    for rel in ("run/a.mp4", "run/private/b.mp4", "walk/c.mp4"):
        put(root, rel, src_video)
    write(os.path.join(root, "list.csv"), "run/private/b.mp4,0\nwalk/c.mp4,1\n")
    for d in (base, base / "ds", base / "ds" / "run", base / "ds" / "walk"):
        os.chmod(d, 0o755)
    os.chmod(os.path.join(root, "list.csv"), 0o644)
    os.chmod(os.path.join(root, "run", "private"), 0o000)
    code = ("import sys; from dvfl.data import adapters as A\n"
            "try:\n    A.folder(sys.argv[1])\nexcept A.AdapterError as e:\n    print('refused:', e)\n"
            "m = A.dvfl_csv(sys.argv[1], annotations=[('train', sys.argv[1] + '/list.csv')], num_classes=2)\n"
            "print('problems:', [(p.reason, p.video_id) for p in m.problems])\n")
    # root reads any folder: there the check runs as the unprivileged user nobody (util-linux's setpriv)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    try:
        r = subprocess.run([*as_nobody, sys.executable, "-c", code, root], capture_output=True, text=True,
                           timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        os.chmod(os.path.join(root, "run", "private"), 0o755)
        shutil.rmtree(base)
    assert r.returncode == 0, r.stderr
    assert f"refused: cannot read the folder {root}/run/private: Permission denied" in r.stdout
    assert "problems: [('unreadable', 'run/private/b')]" in r.stdout
    # a volume's own lost+found (root's, mode 700) is not part of the dataset
    base = Path(tempfile.mkdtemp(prefix="dvfl-test-unreadable-"))
    try:
        put(str(base), "run/a.mp4", src_video)
        put(str(base), "walk/c.mp4", src_video)
        (base / "lost+found").mkdir(mode=0o700)
        for d in (base, base / "run", base / "walk"):
            os.chmod(d, 0o755)
        r = subprocess.run([*as_nobody, sys.executable, "-c", "import sys; from dvfl.data import adapters as A\n"
                            "print(A.folder(sys.argv[1]).classes)", str(base)], capture_output=True, text=True,
                           timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        shutil.rmtree(base)
    assert r.returncode == 0 and r.stdout.strip() == "['run', 'walk']", r.stderr


def test_hmdb51_classes_are_numbered_in_the_order_of_their_names(tmp_path, src_video):
    # by list-file name, climb_stairs_test_split1.txt sorted before climb_test_split1.txt: labels 5/6
    # (and kick_ball/kick, sword_exercise/sword) were swapped against the folder and CSV adapters
    for cls in ("climb_stairs", "climb", "kick_ball", "kick"):
        put(str(tmp_path), f"{cls}/{cls}_v.avi", src_video)
        write(os.path.join(str(tmp_path), "testTrainMulti_7030_splits", f"{cls}_test_split1.txt"), f"{cls}_v.avi 1\n")
    m = A.hmdb51(str(tmp_path), 1)
    assert m.classes == sorted(["climb_stairs", "climb", "kick_ball", "kick"]) == ["climb", "climb_stairs", "kick",
                                                                                  "kick_ball"]
    assert {e.class_name: e.label for e in m.entries} == {"climb": 0, "climb_stairs": 1, "kick": 2, "kick_ball": 3}


def test_a_class_folder_linked_into_the_dataset_is_refused(tmp_path, src_video):
    """A class folder that is a link to the root (or to another class) filed every video under it
    as well, and the real copies were then dropped as duplicates: the labels came out wrong."""
    for name, target in (("loop", "."), ("alias", "run")):
        root = tmp_path / name
        put(str(root), "run/a.mp4", src_video)
        put(str(root), "walk/b.mp4", src_video)
        os.symlink(os.path.abspath(str(root / target)), str(root / name))
        with pytest.raises(A.AdapterError, match=f"class folder .*{name} is a link to .*inside the dataset"):
            A.folder(str(root))
    # UCF50 too (one video was filed under both classes, in the same split: no duplicate check saw it)
    ucf = tmp_path / "ucf50"
    put(str(ucf), "Biking/v_Biking_g01_c01.avi", src_video)
    os.symlink("Biking", str(ucf / "Bike"))
    with pytest.raises(A.AdapterError, match=r"class folder .*Bike is a link to .*Biking, inside the dataset"):
        A.ucf50(str(ucf))
    elsewhere = tmp_path / "elsewhere"
    put(str(elsewhere), "x.mp4", src_video)
    root = tmp_path / "outside"
    put(str(root), "run/a.mp4", src_video)
    os.symlink(str(elsewhere), str(root / "jump"))  # elsewhere: each video refused as outside_root
    m = A.folder(str(root))
    assert [e.video_id for e in m.entries] == ["run/a"] and [p.reason for p in m.problems] == ["outside_root"]


def test_unlabeled_dir_and_list(tmp_path, src_video):
    d = str(tmp_path / "pool")
    put(d, "x/1.mp4", src_video)
    put(d, "2.webm", src_video)
    write(os.path.join(d, "readme.txt"), "not a video")
    m = A.unlabeled(d)
    assert [(e.video_id, e.label, e.class_name, e.split) for e in m.entries] == [
        ("unlabeled/2", None, None, "unlabeled"), ("unlabeled/x/1", None, None, "unlabeled")]
    put(str(tmp_path), "#3.mp4", src_video)  # a list has no comments: a '#' line is a path
    lst = write(str(tmp_path / "list.txt"), f"pool/x/1.mp4\n#3.mp4\n{d}/2.webm\npool/nope.mp4\n")
    m2 = A.unlabeled(lst)
    assert [e.video_id for e in m2.entries] == ["unlabeled/pool/x/1", "unlabeled/#3", "unlabeled/pool/2"]
    assert reasons(m2) == ["missing"]
    assert A.unlabeled(write(str(tmp_path / "pool" / "up.txt"), "../pool/x/1.mp4\n")).entries  # still inside
    with pytest.raises(A.AdapterError):
        A.unlabeled(str(tmp_path / "nothing"))
    # a folder or list of no video (a wrong folder): the pool was silently empty, and the student
    # "with unlabelled clips" trained without any
    (tmp_path / "docs").mkdir()
    write(str(tmp_path / "docs" / "notes.txt"), "pool/x/1.mp4\n")
    with pytest.raises(A.AdapterError, match=r"--unlabeled .*/docs: no video files in it \(looked for \.mp4, \.avi"):
        A.unlabeled(str(tmp_path / "docs"))
    with pytest.raises(A.AdapterError, match=r"--unlabeled .*/empty\.txt: lists no video"):
        A.unlabeled(write(str(tmp_path / "empty.txt"), "\n"))
    # a list made by `find` elsewhere (absolute paths outside its folder): the ingest "succeeded" with no pool
    (tmp_path / "lists").mkdir()
    with pytest.raises(A.AdapterError, match=r"--unlabeled .*/lists/found\.txt: none of its 1 videos can be taken "
                                             r"\(e\.g\. outside_root: .*\); the pool's root is .*/lists"):
        A.unlabeled(write(str(tmp_path / "lists" / "found.txt"), f"{d}/2.webm\n"))


def test_different_unlabelled_videos_never_share_an_id(tmp_path, src_video):
    """Two pools with a 0001.mp4 each, and x.mp4 next to x.avi: every video keeps an id of its own
    (none rejected as a duplicate); the same file listed twice is still one video."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    put(a, "0001.mp4", src_video)
    put(a, "x.mp4", src_video)
    put(a, "x.avi", src_video)
    put(b, "0001.mp4", src_video)
    m = A.unlabeled(a)
    m.extend(A.unlabeled(b, pool=1))
    m.dedupe()
    assert sorted(e.video_id for e in m.entries) == [
        "unlabeled/0001", "unlabeled/pool1/0001", "unlabeled/x.avi", "unlabeled/x.mp4"]
    assert reasons(m) == []
    twice = A.unlabeled(write(str(tmp_path / "a" / "list.txt"), "0001.mp4\n0001.mp4\n"))
    twice.dedupe()
    assert [e.video_id for e in twice.entries] == ["unlabeled/0001"] and reasons(twice) == ["duplicate"]


def test_entries_outside_the_root_are_rejected(tmp_path, src_video):
    """``../``, absolute paths and symlinks that leave a source's root become ``outside_root``
    problems (the file outside exists: without the check it would be ingested)."""
    root, elsewhere = tmp_path / "ds", tmp_path / "elsewhere"
    secret = put(str(elsewhere), "A/secret.avi", src_video)
    put(str(root), "A/ok.avi", src_video)
    os.makedirs(root / "B")
    os.symlink(secret, root / "B" / "link.avi")
    os.symlink(str(elsewhere / "A"), root / "C")               # a symlinked folder
    put(str(root), "A/inside_link_target.avi", src_video)
    os.symlink(str(root / "A" / "inside_link_target.avi"), root / "B" / "inside.avi")  # stays inside: fine
    write(str(root / "train.csv"), f"A/ok.avi,0\nA/../../elsewhere/A/secret.avi,0\n{secret},1\nB/link.avi,1\n"
                                   "C/secret.avi,0\nB/inside.avi,1\n")
    m = A.dvfl_csv(str(root), num_classes=2)
    assert sorted(e.video_id for e in m.entries) == ["A/ok", "B/inside"]
    assert reasons(m) == ["outside_root"] * 4
    assert all("outside the root" in p.detail and str(elsewhere) in p.detail for p in m.problems)
    # the unlabelled pool's root: its folder (symlinks out of it refused) or the list's folder
    pool = tmp_path / "pool"
    put(str(pool), "u.mp4", src_video)
    os.symlink(secret, pool / "link.mp4")
    mp = A.unlabeled(str(pool))
    assert [e.video_id for e in mp.entries] == ["unlabeled/u"] and reasons(mp) == ["outside_root"]
    lst = write(str(pool / "list.txt"), f"u.mp4\n{secret}\n../elsewhere/A/secret.avi\n{pool}/u.mp4\n")
    ml = A.unlabeled(lst)
    assert [e.video_id for e in ml.entries] == ["unlabeled/u", "unlabeled/u"]
    assert reasons(ml) == ["outside_root"] * 2


def test_a_linked_sub_folder_is_read_inside_its_class_folder_and_a_reject_outside_it(tmp_path, src_video):
    """os.walk does not enter linked folders: the videos of one below a class folder or in a pool were
    neither inputs nor rejects. One that stays inside its class folder is read (once: a link back up
    does not loop); one that leaves it (another disk, another class's folder, whose videos would be
    filed under two labels) is one linked_folder reject, left out of the fingerprint (an earlier
    ingest of the same files keeps its own). Kinetics rows under such a link say so."""
    from dvfl.data.ingest import compute_fingerprint

    root, elsewhere = tmp_path / "ds", tmp_path / "elsewhere"
    put(str(elsewhere), "more/b.mp4", src_video)
    put(str(root), "cat/a.mp4", src_video)
    put(str(root), "cat/inner/c.mp4", src_video)
    put(str(root), "dog/d.mp4", src_video)
    os.symlink(str(elsewhere / "more"), root / "cat" / "linked")
    os.symlink("../dog", root / "cat" / "dogs")
    os.symlink("..", root / "cat" / "up")
    os.symlink("inner", root / "cat" / "again")
    put(str(root), "cat/2024/batch1/e.mp4", src_video)
    os.symlink("2024/batch1", root / "cat" / "latest")  # a shortcut above the folder it names
    m = A.folder(str(root))
    assert sorted((e.video_id, e.class_name) for e in m.entries) == [
        ("cat/2024/batch1/e", "cat"), ("cat/a", "cat"), ("cat/inner/c", "cat"), ("dog/d", "dog")]  # (each under its
    # own name, whatever links to it: an id, and with it a --test-fraction draw, does not move with a shortcut)
    assert [(p.reason, p.video_id) for p in m.problems] == [("linked_folder", "cat/dogs"), ("linked_folder", "cat/linked"),
                                                            ("linked_folder", "cat/up")]
    assert "another part of the dataset" in m.problems[0].detail
    assert f"a link to the folder {elsewhere / 'more'}, outside the root" in m.problems[1].detail
    params = {"frames": 8}
    ids = {e.video_id: (1, "x") for e in m.entries}
    without = A.Manifest(m.dataset, m.root, m.classes, entries=list(m.entries), problems=[])
    assert compute_fingerprint(m, params, ids) == compute_fingerprint(without, params, ids)
    mp = A.unlabeled(str(root / "cat"))
    assert sorted(e.video_id for e in mp.entries) == ["unlabeled/2024/batch1/e", "unlabeled/a", "unlabeled/inner/c"]
    assert [(p.reason, p.video_id) for p in mp.problems] == [("linked_folder", "unlabeled/dogs"),
                                                            ("linked_folder", "unlabeled/linked"),
                                                            ("linked_folder", "unlabeled/up")]
    # Kinetics: train/ linked from another disk; the rows stay `missing`, saying where to look
    k = tmp_path / "k400"
    put(str(elsewhere), "k_train/zumba/aaa_000010_000020.mp4", src_video)
    os.makedirs(k)
    os.symlink(str(elsewhere / "k_train"), k / "train")
    csv_path = write(str(k / "train.csv"), "label,youtube_id,time_start,time_end\nzumba,aaa,10,20\n")
    mk = A.kinetics(str(k), [(None, csv_path)])
    assert not mk.entries and reasons(mk) == ["missing"] and "pass --videos-dir" in mk.problems[0].detail


def test_hmdb51_reads_videos_whose_names_start_with_a_hash(tmp_path, src_video):
    """HMDB51 split files have no comments: ``#20_Rhythm_clap_...`` (a real clap video) is an entry,
    and so is a ``#`` path in a dvfl-csv list."""
    root = str(tmp_path)
    for rel in ("clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", "clap/Hand_Clapping_clap_f_cm_np1_fr_med_0.avi"):
        put(root, rel, src_video)
    write(os.path.join(root, "testTrainMulti_7030_splits", "clap_test_split1.txt"),
          "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 2 \nHand_Clapping_clap_f_cm_np1_fr_med_0.avi 1 \n")
    m = A.hmdb51(root, 1)
    assert {(e.video_id, e.split) for e in m.entries} == {("clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0", "test"),
                                                          ("clap/Hand_Clapping_clap_f_cm_np1_fr_med_0", "train")}
    assert m.num_inputs == 2 and not m.problems
    lst = write(os.path.join(root, "train.csv"), "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi,0\n")
    assert [e.video_id for e in A.dvfl_csv(root, [("train", lst)]).entries] == [
        "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0"]


def test_dotdot_after_a_symlink_decodes_the_checked_file(tmp_path, src_video):
    """``link/../../etc/v.mp4`` with ``link -> sub/deeper``: the kernel reads ``<root>/etc/v.mp4`` (inside,
    so the check passes) while ``abspath`` makes it ``<root>/../etc/v.mp4``, a file outside the root.
    The entry must open the file that was checked, never the outside one."""
    root = tmp_path / "ds"
    os.makedirs(root / "sub" / "deeper")
    os.symlink("sub/deeper", root / "link")
    inside = put(str(root), "etc/v.mp4", src_video)
    outside = put(str(tmp_path), "etc/v.mp4", src_video)
    assert os.path.abspath(str(root / "link/../../etc/v.mp4")) == outside  # the layout does what it says
    write(str(root / "train.csv"), "link/../../etc/v.mp4,0\n")
    ml = A.unlabeled(write(str(root / "list.txt"), "link/../../etc/v.mp4\n"))
    for m in (A.dvfl_csv(str(root), num_classes=1), ml):
        assert len(m.entries) == 1 and not m.problems
        path = m.entries[0].path
        assert os.path.samefile(path, inside) and not os.path.samefile(path, outside)
        assert os.path.commonpath([path, str(root)]) == str(root)  # stored under the root, as text too
    os.remove(inside)  # only the outside file is left: not ingested either
    m = A.dvfl_csv(str(root), num_classes=1)
    assert not m.entries and reasons(m) == ["missing"]


def make_official_ssv2(root, src):
    """SSv2 as it is downloaded: ``something-something-v2-*.json`` files, written with a UTF-8 BOM."""
    for i in ("101", "103", "105"):
        put(root, f"20bn-something-something-v2/{i}.webm", src)
    lab = os.path.join(root, "labels")

    def dump(name, obj):
        os.makedirs(lab, exist_ok=True)
        with open(os.path.join(lab, name), "w", encoding="utf-8-sig") as f:
            json.dump(obj, f)
        return os.path.join(lab, name)

    dump("something-something-v2-labels.json", {"Holding something": "0", "Putting something on something": "1"})
    dump("something-something-v2-train.json", [{"id": "101", "template": "Holding [something]"}])
    dump("something-something-v2-validation.json", [{"id": "103", "template": "Putting [something] on [something]"}])
    dump("something-something-v2-test.json", [{"id": "105", "template": "Holding [something]"}])
    return lab


def test_ssv2_official_file_names_with_a_bom(tmp_path, src_video):
    root = str(tmp_path)
    lab = make_official_ssv2(root, src_video)
    m = A.ssv2(root)  # found by their official names, BOM and all
    assert {(e.video_id, e.label, e.split) for e in m.entries} == {("101", 0, "train"), ("103", 1, "val")}
    # given without SPLIT=: the split is the name's last part, not the whole stem
    m = A.ssv2(root, [(None, os.path.join(lab, f"something-something-v2-{n}.json"))
                      for n in ("train", "validation", "test")])
    assert {(e.video_id, e.split) for e in m.entries} == {("101", "train"), ("103", "val"), ("105", "test")}


def test_a_file_name_that_says_no_split_is_refused(tmp_path, src_video):
    root = str(tmp_path)
    lab = make_official_ssv2(root, src_video)
    odd = os.path.join(lab, "something-something-v2-extra.json")
    shutil.copyfile(os.path.join(lab, "something-something-v2-train.json"), odd)
    with pytest.raises(A.AdapterError, match=r"something-something-v2-extra\.json: the file name .* does not say "
                                             r"the split: name it train, val/validation or test"):
        A.ssv2(root, [(None, odd)])
    assert {e.split for e in A.ssv2(root, [("train", odd)]).entries} == {"train"}  # SPLIT= still decides
    put(root, "A/a.avi", src_video)
    put(root, "A/b.avi", src_video)
    write(os.path.join(root, "lists", "ucf101_train.csv"), "A/a.avi,0\n")
    write(os.path.join(root, "lists", "ucf101-val.csv"), "A/b.avi,0\n")
    write(os.path.join(root, "lists", "trainlist01.csv"), "A/a.avi,0\n")
    m = A.dvfl_csv(root, [(None, os.path.join(root, "lists", n)) for n in ("ucf101_train.csv", "ucf101-val.csv")])
    assert {(e.video_id, e.split) for e in m.entries} == {("A/a", "train"), ("A/b", "val")}
    with pytest.raises(A.AdapterError, match=r"trainlist01\.csv: the file name .* SPLIT="):
        A.dvfl_csv(root, [(None, os.path.join(root, "lists", "trainlist01.csv"))])


def test_malformed_ssv2_annotations_are_adapter_errors(tmp_path, src_video):
    root = str(tmp_path)
    lab = make_official_ssv2(root, src_video)
    train = os.path.join(lab, "something-something-v2-train.json")
    for bad, message in (('[{"id": "101", "template": ', "not a readable JSON file"),
                         ('{"id": "101"}', "expected a JSON list"), (b"[\xff\xfe]", "not a readable JSON file")):
        with open(train, "wb") as f:
            f.write(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(A.AdapterError, match=r"something-something-v2-train\.json: " + message):
            A.ssv2(root)
    write(train, '[{"id": "101", "template": "Holding [something]"}, "junk"]')  # one bad item: one rejected input
    m = A.ssv2(root)
    assert [e.video_id for e in m.entries if e.split == "train"] == ["101"] and reasons(m) == ["bad_line"]


def test_a_list_in_utf16_or_a_csv_with_a_quote_left_open_is_an_adapter_error(tmp_path, src_video):
    """Both ended the ingest in a traceback (`ValueError: embedded null byte`, `_csv.Error: field
    larger than field limit`), not the one-line error of a malformed list."""
    put(str(tmp_path), "pool/u.mp4", src_video)
    lst = tmp_path / "pool" / "list.txt"
    lst.write_text("u.mp4\n", encoding="utf-16")
    with pytest.raises(A.AdapterError, match=r"list\.txt holds NUL bytes: not UTF-8 text"):
        A.unlabeled(str(lst))
    open_quote = '"A/a.avi,0\n' + "x" * 200_000 + "\n"
    write(str(tmp_path / "train.csv"), "A/a.avi,0\n" + open_quote)
    with pytest.raises(A.AdapterError, match=r"train\.csv: field larger than field limit .* \(a quote left open\?\)"):
        A.dvfl_csv(str(tmp_path), annotations=[("train", str(tmp_path / "train.csv"))])
    write(str(tmp_path / "k.csv"), "label,youtube_id,time_start,time_end,split\n" + open_quote)
    with pytest.raises(A.AdapterError, match=r"k\.csv: field larger than field limit"):
        A.kinetics(str(tmp_path), [("train", str(tmp_path / "k.csv"))])


def test_an_id_listed_in_train_and_test_keeps_the_test_copy(tmp_path, src_video):
    """The same-id rule keeps what the same-bytes rule (ingest) keeps: the evaluation copy; the rejected
    copy says which split's copy was kept."""
    root = str(tmp_path)
    put(root, "UCF-101/Archery/v_Archery_g01_c01.avi", src_video)
    put(root, "UCF-101/Archery/v_Archery_g02_c01.avi", src_video)
    lst = os.path.join(root, "ucfTrainTestlist")
    write(os.path.join(lst, "classInd.txt"), "1 Archery\n")
    write(os.path.join(lst, "trainlist01.txt"), "Archery/v_Archery_g01_c01.avi 1\nArchery/v_Archery_g02_c01.avi 1\n"
                                                "Archery/v_Archery_g02_c01.avi 1\n")
    write(os.path.join(lst, "testlist01.txt"), "Archery/v_Archery_g01_c01.avi\n")
    write(os.path.join(lst, "vallist01.txt"), "Archery/v_Archery_g01_c01.avi\n")
    m = A.ucf101(root, 1)
    m.dedupe()
    assert [(e.video_id, e.split) for e in m.entries] == [("Archery/v_Archery_g02_c01", "train"),
                                                          ("Archery/v_Archery_g01_c01", "test")]
    got = sorted((p.video_id, p.split, p.detail.rsplit("; ", 1)[-1]) for p in m.problems)
    assert got == [("Archery/v_Archery_g01_c01", "train", "the test copy is kept"),
                   ("Archery/v_Archery_g01_c01", "val", "the test copy is kept"),
                   ("Archery/v_Archery_g02_c01", "train", "the train copy is kept")]
    assert all(p.reason == "duplicate" for p in m.problems) and m.num_inputs == 5


def test_build_manifest_dispatch_and_dedupe(tmp_path, src_video):
    make_folder(str(tmp_path), src_video)
    m = A.build_manifest("folder", str(tmp_path))
    m.extend(A.build_manifest("folder", str(tmp_path)))
    m.dedupe()
    assert len(m.entries) == 4 and reasons(m) == ["duplicate"] * 4
    with pytest.raises(A.AdapterError):
        A.build_manifest("nope", str(tmp_path))


# ---------------------------------------------------------------------------------------
# every adapter through the real Ray pipeline

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_adapter_ingests_for_real(name, tmp_path, src_video, ray_local):
    m = LAYOUTS[name](str(tmp_path / "data"), src_video)
    m.extend(A.unlabeled(os.path.dirname(src_video)))
    n_inputs = m.num_inputs
    s = ingest(m, IngestConfig(out=str(tmp_path / "out"), frames=4, clips_per_video=2, short_side=16,
                               timeout_per_file=60), log=None)
    assert s["accounting_ok"] and s["written_videos"] + s["rejected"] == n_inputs
    t = read_clips_table(str(tmp_path / "out"))
    by_video = {}
    for r in t.select(["video_id", "label", "class_name", "split", "view", "height", "width"]).to_pylist():
        by_video.setdefault(r["video_id"], []).append(r)
    assert len(by_video) == s["written_videos"]
    for e in m.entries:
        rows = by_video[e.video_id]
        assert all(r["label"] == e.label and r["class_name"] == e.class_name and r["split"] == e.split for r in rows)
        assert len(rows) == (2 if e.split in ("train", "unlabeled") else 1)
        assert all((r["height"], r["width"]) == (16, 21) for r in rows)  # 24x32 source, short side 16
    rej = [json.loads(l) for l in open(tmp_path / "out" / "rejects.jsonl")]
    assert sorted(r["reason"] for r in rej) == reasons(m)


def test_an_ingest_of_the_earlier_video_by_video_draw_is_kept_and_fresh_draws_recordings(tmp_path, src_video,
                                                                                         ray_local):
    """Split rule 2 moved test videos of folders ingested before it: the same ingest command, rerun,
    was refused ("a different fingerprint"), and its teacher and cache stood on the old draw. The
    earlier draw is kept where the output holds it; --fresh (a new ingest) draws whole recordings."""
    root, out = str(tmp_path / "videos"), str(tmp_path / "out")
    for c in ("jump", "run"):
        for r in range(4):
            for k in range(2):
                put(root, f"{c}/rec{r}_{k}.mp4", src_video)
    # a copy of one video's bytes (rejected as duplicate_content) and a link out of the root (a reject whose
    # split is in the fingerprint): the rerun raised KeyError, then failed to recognise the earlier draw
    shutil.copy(os.path.join(root, "jump", "rec0_0.mp4"), os.path.join(root, "jump", "rec0_0 (2).mp4"))
    os.symlink(src_video, os.path.join(root, "run", "linked.mp4"))  # (rule 1 drew it for test, rule 2 for train)
    cfg = IngestConfig(out=out, frames=4, clips_per_video=1, short_side=16, timeout_per_file=60)

    def splits():
        t = read_clips_table(out, columns=["video_id", "split"])
        return dict(zip(t.column("video_id").to_pylist(), t.column("split").to_pylist()))

    earlier = A.folder(root, test_fraction=0.25)  # what an ingest before split rule 2 wrote
    assert [(p.video_id, p.split, earlier.earlier_splits[p.video_id]) for p in earlier.problems] == [
        ("run/linked", "train", "test")]
    for e in earlier.entries + earlier.problems:
        e.split = earlier.earlier_splits[e.video_id]
    earlier.earlier_splits, earlier.source = {}, {k: v for k, v in earlier.source.items() if k != "split_rule"}
    ingest(earlier, cfg, log=None)
    assert splits() == {e.video_id: e.split for e in earlier.entries}
    logged = []
    s = ingest(A.folder(root, test_fraction=0.25), cfg, log=logged.append)
    assert s["videos_decoded_this_run"] == 0 and splits() == {e.video_id: e.split for e in earlier.entries}
    assert any(ln.startswith(f"[ingest] note: {out} holds these videos with the test/val videos an earlier version drew "
                             "video by video") for ln in logged), logged
    now = A.folder(root, test_fraction=0.25)
    assert {e.video_id: e.split for e in now.entries} != splits()  # (else this test shows nothing)
    ingest(now, replace(cfg, overwrite=True), log=None)
    assert splits() == {e.video_id: e.split for e in now.entries}
    assert json.load(open(os.path.join(out, "dataset.json")))["source"]["split_rule"] == 2


# ---------------------------------------------------------------------------------------
# the DVFL-Net repository's own CSV lists, as its users have them (issue 17)

def test_dvfl_csv_as_the_dvfl_net_repository_writes_it(tmp_path, src_video):
    """DVFL-Net's csv_writer.py writes a "Video Path,Directory Number" header and paths like
    hmdb51/train/<class>/<video>.avi: the header was refused ("no path column") and, without it,
    every class was named class_NNN (the first folder is the dataset's for every label)."""
    root = str(tmp_path)
    rows = {"train": ["Video Path,Directory Number"], "val": ["Video Path,Directory Number"]}
    for i, name in enumerate(("brush_hair", "cartwheel", "catch")):
        for split in rows:
            rel = f"hmdb51/{split}/{name}/{name}_{split}_0.avi"
            put(root, rel, src_video)
            rows[split].append(f"{rel},{i + 2}")
    for split, lines in rows.items():
        write(os.path.join(root, "lists", f"{split}.csv"), "\n".join(lines) + "\n")
    m = A.dvfl_csv(root)
    assert m.classes == ["brush_hair", "cartwheel", "catch"] and not m.problems
    assert {(e.class_name, e.label, e.split) for e in m.entries} == {
        (n, i, s) for i, n in enumerate(m.classes) for s in ("train", "val")}


def test_dvfl_csv_lists_numbered_one_by_one_are_refused_naming_the_folder(tmp_path, src_video):
    """csv_writer.py run on train/ and on val/ numbers each folder in os.walk order, which differs
    between the two: climb was label 3 in train and 2 in val. The folder names, one label each in
    either list, said so; the adapter fell back to class_NNN names and every val video of the two
    classes carried the other's label, without a word."""
    root = str(tmp_path)
    numbering = {"train": {"brush_hair": 2, "climb": 3}, "val": {"climb": 2, "brush_hair": 3}}
    for split, labels in numbering.items():
        lines = ["Video Path,Directory Number"]
        for name, label in labels.items():
            rel = f"hmdb51/{split}/{name}/{name}_{split}_0.avi"
            put(root, rel, src_video)
            lines.append(f"{rel},{label}")
        write(os.path.join(root, "lists", f"{split}.csv"), "\n".join(lines) + "\n")
    with pytest.raises(A.AdapterError, match=r"the lists number the classes differently: folder 'climb' is "
                                             r"label 3 at train\.csv:3 but label 2 at val\.csv:2"):
        A.dvfl_csv(root)
    # one numbering in both lists: the folders name the classes
    write(os.path.join(root, "lists", "val.csv"), "Video Path,Directory Number\n"
          "hmdb51/val/brush_hair/brush_hair_val_0.avi,2\nhmdb51/val/climb/climb_val_0.avi,3\n")
    assert A.dvfl_csv(root).classes == ["brush_hair", "climb"]


def test_dvfl_csv_with_a_header_and_labels_from_2_gives_51_classes(tmp_path, src_video):
    """HMDB51 lists whose labels run 2..52 behind a header row: 51 classes numbered 0..50 in label
    order, the header is not a video, and the class names come from the CSV's own column."""
    root = str(tmp_path)
    names = [f"action{i:02d}" for i in range(51)]
    train, val = ["path,label,class_name"], ["path,label,class_name"]
    for i, name in enumerate(names):
        for n, rows in (("a", train), ("b", val)):
            put(root, f"{name}/{name}_{n}_0.avi", src_video)
            rows.append(f"{name}/{name}_{n}_0.avi,{i + 2},{name}")
    write(os.path.join(root, "lists", "train.csv"), "\n".join(train) + "\n")
    write(os.path.join(root, "lists", "val.csv"), "\n".join(val) + "\n")
    m = A.dvfl_csv(root)
    assert len(m.classes) == 51 and m.classes == names
    assert not m.problems and len(m.entries) == 102
    assert {(e.video_id, e.label, e.class_name) for e in m.entries if e.split == "val"} == {
        (f"{n}/{n}_b_0", i, n) for i, n in enumerate(names)}
    assert m.source["labels"] == {"as_written": [2, 52], "classes": 51, "renumbered": True}
    # the same lists without header or names (the repository's own form): still 51 classes, named from the folders
    write(os.path.join(root, "lists", "train.csv"), "".join(f"{r.rsplit(',', 1)[0]}\n" for r in train[1:]))
    write(os.path.join(root, "lists", "val.csv"), "".join(f"{r.rsplit(',', 1)[0]}\n" for r in val[1:]))
    m2 = A.dvfl_csv(root)
    assert m2.classes == names and sorted((e.video_id, e.label) for e in m2.entries) == sorted(
        (e.video_id, e.label) for e in m.entries)
    # a header in another column order, found by name
    write(os.path.join(root, "lists", "val.csv"), "label,video\n" + "".join(
        f"{i + 2},{n}/{n}_b_0.avi\n" for i, n in enumerate(names)))
    assert A.dvfl_csv(root).classes == names


def test_dvfl_csv_refuses_inconsistent_lists_naming_the_field(tmp_path, src_video):
    root = str(tmp_path)
    for rel in ("A/a.avi", "B/b.avi", "C/c.avi"):
        put(root, rel, src_video)
    cases = [
        ("video_name,class_idx\nA/a.avi,0\n", None, r"train\.csv:1: the header row \['video_name', 'class_idx'\] "
                                                    r"has no a path column"),
        ("path,label,class_name\nA/a.avi,3,Apple\nB/b.avi,3,Banana\n", None,
         r"train\.csv:3: class_name 'Banana' for label 3, but train\.csv:2 names label 3 'Apple'"),
        ("A/a.avi,0,Same\nB/b.avi,1,Same\n", None, r"class_name: two labels share one class name"),
        ("A/a.avi,4\nB/b.avi,5\nC/c.avi,9\n", "2", r"label vs classes\.txt: the lists use 3 distinct labels \(4\.\.9\)"),
    ]
    for text, classes, message in cases:
        write(os.path.join(root, "train.csv"), text)
        cf = write(os.path.join(root, "classes.txt"), "x\ny\n") if classes else None
        with pytest.raises(A.AdapterError, match=message):
            A.dvfl_csv(root, annotations=[("train", os.path.join(root, "train.csv"))], classes_file=cf)
    # 1-based lists whose top label is unused, beside a class list: the lists' own names must agree (every
    # video was filed under the next class, the class_name column ignored)
    write(os.path.join(root, "train.csv"), "A/a.avi,1,A\nB/b.avi,2,B\n")
    cf = write(os.path.join(root, "classes.txt"), "A\nB\nC\n")
    with pytest.raises(A.AdapterError, match=r"train\.csv:1: class_name 'A' for label 1, but label 1 is 'B' in "
                                             r"classes\.txt"):
        A.dvfl_csv(root, annotations=[("train", os.path.join(root, "train.csv"))], classes_file=cf)
    write(os.path.join(root, "train.csv"), "A/a.avi,0,A\nB/b.avi,1,B\n")
    m = A.dvfl_csv(root, annotations=[("train", os.path.join(root, "train.csv"))], classes_file=cf)
    assert [(e.video_id, e.label, e.class_name) for e in m.entries] == [("A/a", 0, "A"), ("B/b", 1, "B")]
    # --num-classes that matches neither reading of labels 4..9
    write(os.path.join(root, "train.csv"), "A/a.avi,4\nB/b.avi,5\nC/c.avi,9\n")
    with pytest.raises(A.AdapterError, match=r"\(--num-classes says 2 classes\)"):
        A.dvfl_csv(root, annotations=[("train", os.path.join(root, "train.csv"))], num_classes=2)


@pytest.mark.parametrize("spellings", [("Run", "run"), ("Caf\u00e9", "Cafe\u0301")])
def test_class_folders_spelt_two_ways_across_split_folders_are_refused(tmp_path, src_video, spellings):
    """train/Run and test/run (or Café in NFC and NFD, a Mac's copy): two classes, every test
    video's label one no training video had, without a word."""
    put(str(tmp_path), f"train/{spellings[0]}/a.mp4", src_video)
    put(str(tmp_path), f"test/{spellings[1]}/b.mp4", src_video)
    with pytest.raises(A.AdapterError, match="differ only in letter case or Unicode normalisation"):
        A.folder(str(tmp_path))
    # split folders give the splits: fractions were ignored, and recorded in dataset.json as if applied
    with pytest.raises(A.AdapterError, match=r"has split folders \(test, train\): they give the splits"):
        A.folder(str(tmp_path), test_fraction=0.2)


def test_annotations_that_would_file_videos_under_other_classes_or_splits_are_refused(tmp_path, src_video):
    """Each was accepted without a word: DVFL-Net's csv_writer.py numbers class folders in walk order,
    its labels/*.csv names them sorted (every video under another class); a class-names file with a
    one-column header (every label shifted by one); Kinetics `train=all.csv` (held-out rows trained on);
    a test/ class folder spelt with a trailing space or a typo (a class no training video teaches);
    SSv2's unlabelled test.json (found after the whole training split was decoded)."""
    root = str(tmp_path / "csv")
    for rel in ("train/YoYo/a.avi", "train/ApplyEyeMakeup/b.avi", "train/Biking/c.avi"):
        put(root, rel, src_video)
    lists = write(os.path.join(root, "train.csv"), "train/YoYo/a.avi,0\ntrain/ApplyEyeMakeup/b.avi,1\n"
                                                   "train/Biking/c.avi,2\n")
    names = write(os.path.join(root, "labels.csv"), "id,name\n0,ApplyEyeMakeup\n1,Biking\n2,YoYo\n")
    with pytest.raises(A.AdapterError, match=r"train\.csv:1: a video of folder 'YoYo' has the label of class "
                                             r"'ApplyEyeMakeup' \(class 0 of the class list\): number the lists as labels\.csv"):
        A.dvfl_csv(root, annotations=[("train", lists)], classes_file=names)
    write(lists, "train/ApplyEyeMakeup/b.avi,0\ntrain/Biking/c.avi,1\ntrain/YoYo/a.avi,2\n")
    m = A.dvfl_csv(root, annotations=[("train", lists)], classes_file=names)
    assert {(e.video_id.split("/")[1], e.class_name) for e in m.entries} == {
        ("ApplyEyeMakeup", "ApplyEyeMakeup"), ("Biking", "Biking"), ("YoYo", "YoYo")}
    # folders that are not class names (participants), numbered per list: a class-name column is the numbering
    people = str(tmp_path / "people")
    for rel in ("P01/a.avi", "P02/b.avi", "P02/c.avi"):
        put(people, rel, src_video)
    tr = write(os.path.join(people, "train.csv"), "P01/a.avi,0,open\nP02/b.avi,1,close\n")
    te = write(os.path.join(people, "test.csv"), "P02/c.avi,0,open\n")
    assert A.dvfl_csv(people, annotations=[("train", tr), ("test", te)]).classes == ["open", "close"]
    # lists numbered per split folder, beside a class file spelt in another case: still refused
    write(lists, "train/YoYo/a.avi,0\ntrain/ApplyEyeMakeup/b.avi,1\ntrain/Biking/c.avi,2\n")
    shuffled = write(os.path.join(root, "test.csv"), "train/Biking/c.avi,0\ntrain/YoYo/a.avi,1\n")
    lower = write(os.path.join(root, "lower.txt"), "applyeyemakeup\nbiking\nyoyo\n")
    with pytest.raises(A.AdapterError, match="number the classes differently|has the label of class"):
        A.dvfl_csv(root, annotations=[("train", lists), ("test", shuffled)], classes_file=lower)
    write(lists, "train/ApplyEyeMakeup/b.avi,0\ntrain/Biking/c.avi,1\ntrain/YoYo/a.avi,2\n")
    one_column = write(os.path.join(root, "names.txt"), "name\nApplyEyeMakeup\nBiking\nYoYo\n")
    assert A.dvfl_csv(root, annotations=[("train", lists)], classes_file=one_column).classes == [
        "ApplyEyeMakeup", "Biking", "YoYo"]

    k400 = str(tmp_path / "k400")
    make_kinetics(k400, src_video)
    combined = write(os.path.join(k400, "all.csv"), "label,youtube_id,time_start,time_end,split\n"
                                                    "zumba,bbb,0,10,train\nzumba,ccc,5,15,val\n")
    with pytest.raises(A.AdapterError, match=r"all\.csv:3: a val video \(its split column\) given as the train split"):
        A.kinetics(k400, [("train", combined)])
    held_out = write(os.path.join(k400, "val_from_train.csv"), "label,youtube_id,time_start,time_end,split\n"
                                                                "abseiling,aaa,10,20,train\n")  # training rows held out
    assert {(e.video_id, e.split) for e in A.kinetics(k400, [("val", held_out)]).entries} == {("aaa_000010_000020", "val")}
    # ... but not rows a train file lists too (a combined file as val=: dedupe kept the held-out copies, training emptied)
    train = os.path.join(k400, "annotations", "train.csv")
    with pytest.raises(A.AdapterError, match=r"val_from_train\.csv:2: a training video \(its split column\) given as "
                                             r"the val split is in a train file too"):
        A.kinetics(k400, [("train", train), ("val", held_out)])
    assert {e.split for e in A.kinetics(k400, [("test", write(combined, "label,youtube_id,time_start,time_end,split\n"
                                                                        "zumba,ccc,5,15,val\n"))]).entries} <= {"test"}

    for typo in ("Walking ", "Walkng"):
        folder = tmp_path / f"folder{len(typo)}"
        put(str(folder), "train/Walking/a.mp4", src_video)
        put(str(folder), f"test/{typo}/b.mp4", src_video)
        with pytest.raises(A.AdapterError, match="Unicode normalisation, or spaces at an end" if typo.endswith(" ")
                           else r"class folder test/'Walkng' has no train/ folder"):
            A.folder(str(folder))
    only_test = tmp_path / "only_test"  # an evaluation-only ingest: no training split to compare with
    put(str(only_test), "test/Walking/b.mp4", src_video)
    put(str(only_test), "test/Running/c.mp4", src_video)
    assert A.folder(str(only_test)).classes == ["Running", "Walking"]

    ssv2_root = str(tmp_path / "ssv2")
    make_ssv2(ssv2_root, src_video)
    unlabelled = write(os.path.join(ssv2_root, "test.json"), '[{"id": "1"}, {"id": "2"}]')
    with pytest.raises(A.AdapterError, match=r"test\.json has no labels \(SSv2's test\.json is unlabelled\)"):
        A.ssv2(ssv2_root, [("test", unlabelled)])


def test_a_run_without_a_datasets_lists_is_told_its_own_fix_not_the_ingest_flag(tmp_path):
    """`dvfl distill` on a dvfl-csv root without train/val/test.csv was told "use --annotations", a flag
    only the ingest command has: the lists' place, or the ingest command to run, instead."""
    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import ready_clips

    cfg = load_config(None, [("data", {"dataset": "dvfl-csv", "root": str(tmp_path)}),
                             ("output_dir", str(tmp_path / "run"))], check_paths=False)
    with pytest.raises(ConfigError) as refused:
        ready_clips(cfg, log=None)
    assert str(refused.value) == (
        f"data.root: no train.csv/val.csv/test.csv under {tmp_path}: give the lists there, or ingest the clips yourself, "
        f"with this config's settings: `dvfl ingest --dataset dvfl-csv --root {tmp_path} --annotations train=FILE "
        "--annotations test=FILE --frames 8 --clips-per-video 1 --eval-clips 1 --short-side 32 --seed 0 --out "
        f"{tmp_path / 'run' / 'clips'}`, and give data.clips={tmp_path / 'run' / 'clips'}")
    assert not (tmp_path / "run").exists()
    # a bucket: the lists there were "not found" (the adapters read local folders only)
    cfg = load_config(None, [("data", {"dataset": "ucf101", "root": "s3://bucket/UCF101"}),
                             ("output_dir", str(tmp_path / "run"))], check_paths=False)
    with pytest.raises(ConfigError, match=r"^data\.root: s3://bucket/UCF101: the videos are read from a local or "
                                          r"mounted folder, not a URI"):
        ready_clips(cfg, log=None)


def test_a_dataset_of_one_class_is_refused_by_every_adapter(tmp_path, src_video):
    """A folder root of one class was refused ("a classifier needs at least 2"); UCF50 with one class
    folder, Kinetics annotations naming one label and dvfl-csv lists of one label were ingested, and
    every model trained on them scored 100 %. A class list of two, one of them without videos (a
    subset to evaluate), still builds."""
    ucf50 = str(tmp_path / "ucf50")
    put(ucf50, "Biking/v_Biking_g01_c01.avi", src_video)
    put(ucf50, "Biking/v_Biking_g02_c01.avi", src_video)
    with pytest.raises(A.AdapterError, match=r"ucf50 found 1 class \('Biking'\); a classifier needs at least 2 .*"
                                             r"check the class folders"):
        A.build_manifest("ucf50", ucf50)
    k400 = str(tmp_path / "k400")
    put(k400, "train/zumba/bbb_000000_000010.mp4", src_video)
    write(os.path.join(k400, "annotations", "train.csv"),
          "label,youtube_id,time_start,time_end,split\nzumba,bbb,0,10,train\n")
    with pytest.raises(A.AdapterError, match=r"kinetics found 1 class \('zumba'\); .*labels in the annotations"):
        A.build_manifest("kinetics", k400, annotations=[("train", os.path.join(k400, "annotations", "train.csv"))])
    csv = str(tmp_path / "csv")
    put(csv, "Archery/v_Archery_g01_c01.avi", src_video)
    write(os.path.join(csv, "train.csv"), "Archery/v_Archery_g01_c01.avi,0\n")
    with pytest.raises(A.AdapterError, match=r"dvfl-csv found 1 class \('Archery'\)"):
        A.build_manifest("dvfl-csv", csv, annotations=[("train", os.path.join(csv, "train.csv"))])
    m = A.build_manifest("dvfl-csv", csv, annotations=[("train", os.path.join(csv, "train.csv"))], num_classes=2)
    assert len(m.classes) == 2 and [e.label for e in m.entries] == [0]


def test_a_fraction_split_names_a_recording_too_large_to_draw_whole(tmp_path, src_video):
    """A class recorded once (one folder of cuts): drawn whole, its only recording would leave
    training, so its cuts are split between training and test, and a note says so (the test score
    then flatters the model)."""
    root = str(tmp_path)
    for k in range(6):
        put(root, f"A/rec1/{k:03d}.mp4", src_video)
    for r in range(5):
        put(root, f"B/rec{r}/000.mp4", src_video)
    m = A.folder(root, test_fraction=0.2)
    assert Counter((e.class_name, e.split) for e in m.entries) == {("A", "test"): 1, ("A", "train"): 5,
                                                                   ("B", "test"): 1, ("B", "train"): 4}
    assert m.notes == ["--test-fraction: 1 name(s) too large to hold out whole (rec1; in 1 class(es)) have videos in "
                       "both training and test: if those are cuts of one recording, the test score flatters the "
                       "model; give the splits as root/{train,val,test}/<class>/ folders of whole recordings"]
