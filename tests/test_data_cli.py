"""The 'pmoe manifest' and 'pmoe synthesize' commands, and the validation report they print."""

import pandas as pd
import pytest

from pmoe.cli import main
from pmoe.data import read_manifest, validate_manifest
from pmoe.data.twins import write_image, write_twin
from pmoe.errors import DataError


def test_manifest_command_writes_csv_and_reports_table7_diff(tmp_path, capsys):
    twin = write_twin("btad", tmp_path / "btad")
    out = tmp_path / "out" / "btad.csv"
    assert main(["manifest", "btad", "--root", str(twin.root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DIFFERS FROM Table 7" in text and "-445" in text and "-287" in text
    assert f"wrote {out} (9 rows)" in text
    frame = read_manifest(out)
    assert len(frame) == 9 and list(frame.columns[:5]) == ["image", "mask", "cls", "label", "defect"]


def test_strict_refuses_a_subset_and_writes_nothing(tmp_path, capsys):
    twin = write_twin("kvasir", tmp_path / "kvasir")
    out = tmp_path / "kvasir.csv"
    assert main(["manifest", "kvasir", "--root", str(twin.root), "--out", str(out), "--strict"]) == 2
    assert "because of --strict" in capsys.readouterr().err and not out.exists()


def test_unreadable_file_fails_the_command(tmp_path, capsys):
    twin = write_twin("colondb", tmp_path / "colondb")
    (twin.root / "images" / "2.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "colondb.csv"
    assert main(["manifest", "colondb", "--root", str(twin.root), "--out", str(out)]) == 2
    assert "images/2.png" in capsys.readouterr().err and not out.exists()
    assert main(["manifest", "colondb", "--root", str(twin.root), "--out", str(out), "--no-verify"]) == 0


def test_default_output_and_bad_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    twin = write_twin("headct", tmp_path / "headct")
    assert main(["manifest", "headct", "--root", str(twin.root)]) == 0
    assert (tmp_path / "data_manifests" / "headct.csv").is_file()
    assert main(["manifest", "nope", "--root", str(tmp_path)]) == 2
    assert "valid names" in capsys.readouterr().err


def test_raw_kolektorsdd_manifest_warns_it_is_not_comparable_with_table1(tmp_path, capsys):
    raw = write_twin("sdd", tmp_path / "raw").root
    assert main(["manifest", "sdd", "--root", str(raw), "--out", str(tmp_path / "raw.csv")]) == 0
    text = capsys.readouterr().out
    assert "warning: SDD at" in text and "NOT comparable with Table 1" in text
    assert "electrical commutators/test/" in text and "24 normal and 3 anomalous bands here; Table 7: 181 and 74" in text
    converted = write_twin("sdd", tmp_path / "converted", "converted").root
    assert main(["manifest", "sdd", "--root", str(converted), "--out", str(tmp_path / "converted.csv")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_synthesize_then_manifest(tmp_path, capsys):
    root = tmp_path / "b"
    argv = ["synthesize", "synthetic-b", "--root", str(root), "--seed", "2", "--image-size", "48",
            "--n-normal", "1", "--n-anomalous", "2"]
    assert main(argv) == 0
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["manifest", "synthetic-b", "--root", str(root), "--out", str(tmp_path / "b.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "b.csv")) == 12


def test_report_flags_inconsistent_rows():
    frame = pd.DataFrame({
        "image": ["a.png", "b.png", "b.png", "c.png"], "mask": ["", "", "", "m.png"],
        "cls": ["carpet", "carpet", "carpet", "unicorn"], "label": [0, 1, 1, 0],
        "defect": ["good", "cut", "cut", "good"],
    })
    report = validate_manifest("mvtec", frame)
    problems = "\n".join(report.problems)
    assert "b.png: anomalous sample without a mask" in problems
    assert "b.png: duplicate row" in problems
    assert "c.png: class not among the MVTec AD classes" in problems
    assert "c.png: normal sample with a mask" in problems
    assert "14 of 15 classes missing" in report.differences[0]
    with pytest.raises(DataError, match="failed validation"):
        report.check()
    image_only = validate_manifest("headct", pd.DataFrame({
        "image": ["x.png"], "mask": ["x_mask.png"], "cls": ["brain"], "label": [1], "defect": ["anomaly"]}))
    assert "has image labels only" in image_only.problems[0]


def test_corrupt_image_found_by_check_readable(tmp_path):
    from pmoe.data import check_readable, build_manifest

    twin = write_twin("isic", tmp_path / "isic")
    path = twin.root / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_0000001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    failures = check_readable(build_manifest("isic", twin.root), twin.root, progress=False)
    assert len(failures) == 1 and failures[0].startswith("ISBI2016_ISIC_Part1_Test_Data/ISIC_0000001.jpg: ")
    write_image(path)
    assert check_readable(build_manifest("isic", twin.root), twin.root, progress=False) == []
