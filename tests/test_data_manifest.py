"""Manifest builders: every layout's twin, the real fixtures, determinism and bad input."""

import shutil
import warnings

import pandas as pd
import pytest

from pmoe.data import COLUMNS, DataWarning, build_manifest, read_manifest, validate_manifest
from pmoe.data.twins import ALL_TWINS, write_image, write_mask, write_twin
from pmoe.errors import DataError
from pmoe.io import write_csv


def build_quietly(name, root):
    """build_manifest, returning the frame and the warning messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = build_manifest(name, root)
    return frame, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.parametrize("name,variant", ALL_TWINS, ids=[f"{n}-{v}" if v else n for n, v in ALL_TWINS])
def test_builder_reads_its_twin(tmp_path, name, variant):
    twin = write_twin(name, tmp_path / name, variant)
    frame, messages = build_quietly(name, twin.root)
    assert tuple(frame.columns) == COLUMNS
    assert ((frame["label"] == 0).sum(), (frame["label"] == 1).sum()) == (twin.normal, twin.anomalous)
    assert len(messages) == len(twin.warnings)
    for expected, message in zip(twin.warnings, messages):
        assert expected in message
    for path in frame["image"].tolist() + [m for m in frame["mask"] if m]:
        assert (twin.root / path).is_file() and "\\" not in path
    report = validate_manifest(name, frame)
    assert not report.problems, report.problems


def test_manifest_sort_order_and_pairing_by_name(tmp_path):
    twin = write_twin("colondb", tmp_path / "colondb")
    frame = build_manifest("colondb", twin.root)
    assert frame["image"].tolist() == ["images/1.png", "images/10.png", "images/2.png"]
    assert frame["mask"].tolist() == ["masks/1.png", "masks/10.png", "masks/2.png"]
    mvtec = build_manifest("mvtec", write_twin("mvtec", tmp_path / "mvtec").root)
    assert mvtec["cls"].drop_duplicates().tolist() == list(pd.unique(mvtec["cls"]))[:15]
    assert mvtec["cls"].iloc[0] == "carpet" and mvtec["cls"].iloc[-1] == "zipper"
    row = mvtec[mvtec["image"] == "bottle/test/crack/000.png"].iloc[0]
    assert (row["mask"], row["label"], row["defect"]) == ("bottle/ground_truth/crack/000_mask.png", 1, "crack")


def test_manifests_are_deterministic(tmp_path):
    paths = []
    for copy in ("one", "two"):
        twin = write_twin("sdd", tmp_path / copy / "sdd")
        paths.append(write_csv(build_quietly("sdd", twin.root)[0], tmp_path / f"{copy}.csv"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    again = write_csv(build_quietly("sdd", tmp_path / "one" / "sdd")[0], tmp_path / "again.csv")
    assert again.read_bytes() == paths[0].read_bytes()
    assert read_manifest(paths[0]).equals(build_quietly("sdd", tmp_path / "one" / "sdd")[0])


def test_sdd_raw_parts_are_cut_into_thirds_labelled_by_their_band(tmp_path):
    frame, _ = build_quietly("sdd", write_twin("sdd", tmp_path / "sdd").root)
    anomalous = frame[frame["label"] == 1]
    assert set(zip(anomalous["image"], anomalous["crop"])) == {
        ("kos01/Part1.jpg", "0/3"), ("kos02/Part0.jpg", "0/3"), ("kos02/Part0.jpg", "1/3")}
    assert (frame.loc[frame["label"] == 0, "mask"] == "").all()
    assert validate_manifest("sdd", frame).notes


def test_real_dagm_subset_with_labels_txt(real_fixtures):
    root = real_fixtures / "DAGM_KaggleUpload"
    with pytest.warns(DataWarning, match="9 of 10 classes missing"):
        frame = build_manifest("dagm", root)
    flags = {}
    for line in (root / "Class1/Test/Label/Labels.txt").read_text().splitlines()[1:]:
        fields = line.split()
        flags[f"Class1/Test/{fields[2]}"] = int(fields[1])
    assert dict(zip(frame["image"], frame["label"])) == flags
    assert len(frame) == 12 and frame["label"].sum() == 4
    assert all(m.endswith("_label.PNG") for m in frame.loc[frame["label"] == 1, "mask"])
    report = validate_manifest("dagm", frame)
    assert not report.problems and any("9 of 10 classes missing" in d for d in report.differences)


def test_real_kvasir_subset(real_fixtures):
    frame = build_manifest("kvasir", real_fixtures / "Kvasir-SEG")
    assert len(frame) == 5 and (frame["label"] == 1).all()
    assert (frame["image"].str.replace("images/", "") == frame["mask"].str.replace("masks/", "")).all()


def test_visa_skeleton_from_the_real_split_gives_table7(real_fixtures, tmp_path):
    split = real_fixtures / "VisA" / "split_csv" / "1cls.csv"
    (tmp_path / "split_csv").mkdir()
    shutil.copy(split, tmp_path / "split_csv" / "1cls.csv")
    test = pd.read_csv(split, dtype=str, keep_default_na=False).query("split == 'test'")
    for path in test["image"].tolist() + [m for m in test["mask"] if m]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    frame = build_manifest("visa", tmp_path)
    assert ((frame["label"] == 0).sum(), (frame["label"] == 1).sum()) == (962, 1200)
    assert frame["cls"].nunique() == 12
    report = validate_manifest("visa", frame)
    assert report.ok and "matches Table 7" in report.text()
    (tmp_path / test["image"].iloc[0]).unlink()
    (tmp_path / test["mask"].iloc[-1]).unlink()
    with pytest.raises(DataError, match=r"2 files listed in split_csv/1cls.csv but missing(.|\n)*candle/Data"):
        build_manifest("visa", tmp_path)


def test_wrong_root_and_wrong_name(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected the dataset folder"):
        build_manifest("mvtec", tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset 'mvtec_ad'"):
        build_manifest("mvtec_ad", tmp_path)
    write_twin("mvtec", tmp_path / "download" / "mvtec_anomaly_detection")
    suggestion = r"It holds: mvtec_anomaly_detection/(.|\n)*Did you mean --root .*download/mvtec_anomaly_detection"
    with pytest.raises(DataError, match=suggestion):
        build_manifest("mvtec", tmp_path / "download")
    with pytest.raises(DataError, match="does not have the Kvasir layout"):
        build_manifest("kvasir", tmp_path / "download" / "mvtec_anomaly_detection")


def test_missing_ground_truth_lists_every_image(tmp_path):
    root = write_twin("mvtec", tmp_path / "mvtec").root
    shutil.rmtree(root / "bottle" / "ground_truth")
    shutil.rmtree(root / "cable" / "ground_truth" / "crack")
    with pytest.raises(DataError) as error:
        build_manifest("mvtec", root)
    message = str(error.value)
    for path in ("bottle/test/crack/000.png", "bottle/test/scratch/000.png", "cable/test/crack/000.png"):
        assert path in message
    assert "3 problem(s) with its files" in message and "mask folder bottle/ground_truth/crack/ is missing" in message


def test_unpaired_masks_and_images_are_all_listed(tmp_path):
    root = write_twin("kvasir", tmp_path / "kvasir").root
    write_mask(root / "masks" / "orphan.jpg")
    write_image(root / "images" / "lonely.jpg")
    (root / "images" / "notes.zip").write_text("x")
    with pytest.raises(DataError) as error, pytest.warns(DataWarning, match="notes.zip"):
        build_manifest("kvasir", root)
    assert "masks/orphan.jpg" in str(error.value) and "images/lonely.jpg" in str(error.value)


def test_long_listings_are_capped_with_a_count(tmp_path):
    root = write_twin("colondb", tmp_path / "colondb").root
    for index in range(30):
        write_mask(root / "masks" / f"extra{index:02d}.png")
    with pytest.raises(DataError, match=r"30 masks without an image(.|\n)*\.\.\. and 10 more"):
        build_manifest("colondb", root)


def test_dagm_flags_must_agree_with_label_folder(tmp_path):
    root = write_twin("dagm", tmp_path / "dagm").root
    write_mask(root / "Class3" / "Test" / "Label" / "0001_label.PNG")
    with pytest.raises(DataError, match=r"disagrees with the Label/ folder(.|\n)*Class3/Test/0001.PNG"):
        build_manifest("dagm", root)


def test_extra_files_warn_and_junk_is_silent(tmp_path):
    root = write_twin("br35h", tmp_path / "br35h").root
    (root / "yes" / "Thumbs.db").write_text("junk")
    (root / "yes" / "scan.dcm").write_text("?")
    (root / "extra").mkdir()
    frame, messages = build_quietly("br35h", root)
    assert len(frame) == 5
    assert any("yes/scan.dcm" in m for m in messages) and any("extra/" in m for m in messages)
    assert not any("Thumbs.db" in m or "pred" in m for m in messages)


def test_read_manifest_rejects_bad_files(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image,mask,cls,label\na.png,,x,0\n")
    with pytest.raises(DataError, match="lacks column.*defect"):
        read_manifest(path)
    path.write_text("image,mask,cls,label,defect\na.png,,x,2\n")
    with pytest.raises(DataError, match="label must be 0 or 1"):
        read_manifest(path)
    path.write_text("image,mask,cls,label,defect\na.png,,x,0,good\n")
    assert read_manifest(path)["crop"].tolist() == [""]
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


def test_endo_image_folder_may_have_any_name(tmp_path):
    root = write_twin("endo", tmp_path / "endo").root
    (root / "images").rename(root / "EndoTect_2020_test_images")
    frame = build_manifest("endo", root)
    assert frame["image"].str.startswith("EndoTect_2020_test_images/").all() and len(frame) == 3
    (root / "second").mkdir()
    with pytest.raises(DataError, match="does not have the Endo layout"):
        build_manifest("endo", root)


def test_headct_labels_and_brainmri_folders_are_checked(tmp_path):
    root = write_twin("headct", tmp_path / "headct").root
    (root / "labels.csv").write_text("id, hemorrhage\n0, 0\n1, maybe\n")
    with pytest.raises(DataError, match=r"rows \[3\] are not '<integer id>, <0 or 1>'"):
        build_manifest("headct", root)
    (root / "labels.csv").write_text("id, hemorrhage\n0, 0\n1, 1\n9, 1\n")
    with pytest.raises(DataError, match=r"ids of labels.csv without an image:\n    9(.|\n)*without a row"):
        build_manifest("headct", root)
    brain = write_twin("brainmri", tmp_path / "brainmri").root
    shutil.rmtree(brain / "brain_tumor_dataset" / "no")
    with pytest.raises(DataError, match="missing folders.*\n    brain_tumor_dataset/no/"), \
            pytest.warns(DataWarning):
        build_manifest("brainmri", brain)
