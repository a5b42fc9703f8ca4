"""The dataset registry: the fifteen Table 7 datasets, the two synthetic ones, name lookup."""

import pytest

from pmoe.data import DATASETS, SYNTHETIC, dataset_info, dataset_names
from pmoe.errors import DataError

# Table 7 of the paper, typed in once here to pin the registry.
TABLE7 = {
    "mvtec": ("MVTec AD", 15, 467, 1258), "visa": ("VisA", 12, 962, 1200),
    "mpdd": ("MPDD", 6, 176, 282), "btad": ("BTAD", 3, 451, 290), "sdd": ("SDD", 1, 181, 74),
    "dagm": ("DAGM", 10, 6996, 1054), "dtd": ("DTD-Synthetic", 12, 357, 947),
    "headct": ("HeadCT", 1, 100, 100), "brainmri": ("BrainMRI", 1, 98, 155),
    "br35h": ("Br35H", 1, 1500, 1500), "isic": ("ISIC", 1, 0, 379),
    "colondb": ("CVC-ColonDB", 1, 0, 380), "clinicdb": ("CVC-ClinicDB", 1, 0, 612),
    "kvasir": ("Kvasir", 1, 0, 1000), "endo": ("Endo", 1, 0, 200),
}


def test_registry_holds_exactly_table7():
    assert list(DATASETS) == list(TABLE7)
    for name, (title, n_classes, normal, anomalous) in TABLE7.items():
        info = DATASETS[name]
        assert (info.title, len(info.classes), info.normal, info.anomalous) == (title, n_classes, normal, anomalous)
        assert len(set(info.classes)) == len(info.classes)


def test_metric_kinds_follow_spec_section7():
    assert {n for n, i in DATASETS.items() if i.kind == "image"} == {"headct", "brainmri", "br35h"}
    assert {n for n, i in DATASETS.items() if i.kind == "pixel"} == {"isic", "colondb", "clinicdb", "kvasir", "endo"}
    for info in DATASETS.values():
        assert (info.kind == "pixel") == (info.normal == 0)
        assert info.domain == ("medical" if info.name in ("headct", "brainmri", "br35h", "isic", "colondb",
                                                          "clinicdb", "kvasir", "endo") else "industrial")


def test_class_lists_named_as_the_lead_asked():
    assert DATASETS["mvtec"].classes[:5] == ("carpet", "grid", "leather", "tile", "wood")
    assert "metal_nut" in DATASETS["mvtec"].classes
    assert DATASETS["visa"].classes[-1] == "pipe_fryum"
    assert DATASETS["dagm"].classes == tuple(f"Class{i}" for i in range(1, 11))
    assert DATASETS["btad"].classes == ("01", "02", "03")


def test_synthetic_sets_are_disjoint_and_outside_table7():
    a, b = SYNTHETIC["synthetic-a"], SYNTHETIC["synthetic-b"]
    assert not set(a.classes) & set(b.classes)
    assert a.synthetic and b.synthetic and not DATASETS["mvtec"].synthetic
    assert "synthetic-a" not in DATASETS
    assert dataset_names(include_synthetic=False) == list(DATASETS)


def test_lookup_is_case_insensitive_and_unknown_names_list_valid_ones():
    assert dataset_info(" MVTec ") is DATASETS["mvtec"]
    assert dataset_info("synthetic-b") is SYNTHETIC["synthetic-b"]
    with pytest.raises(DataError, match="valid names: mvtec, visa.*synthetic-b"):
        dataset_info("mvtec-ad")
