"""Tracer identification: synonyms, codes, nuclides, conflicts, and the table checked against DICOM CID 4021."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node import tracers
from dicom_node.tracers import (
    NUCLIDES,
    TRACERS,
    canonical_tracer,
    canonical_tracer_name,
    identify_tracer,
    known_tracer_names,
    nuclide_from_half_life,
    suggest_tracer,
    tracer_family,
    tracer_matches,
)

REALDATA = Path(os.environ.get("PETNODE_REALDATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _require_realdata(sub: str) -> Path:
    path = REALDATA / sub
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real data {path} missing (CI must not skip)")
        pytest.skip(f"real data {path} not present")
    return path


def _code(value: str, scheme: str, meaning: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    if meaning:
        item.CodeMeaning = meaning
    return item


def _pet(
    text: str | None = None,
    code: Dataset | None = None,
    nuclide: Dataset | None = None,
    half_life: float | None = None,
) -> Dataset:
    ds = Dataset()
    ds.Modality = "PT"
    info = Dataset()
    if text is not None:
        info.Radiopharmaceutical = text
    if code is not None:
        info.RadiopharmaceuticalCodeSequence = Sequence([code])
    if nuclide is not None:
        info.RadionuclideCodeSequence = Sequence([nuclide])
    if half_life is not None:
        info.RadionuclideHalfLife = str(half_life)
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Names and synonyms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FDG", "FDG"),
        ("fdg", "FDG"),
        ("18F-FDG", "FDG"),
        ("F18-FDG", "FDG"),
        ("FDG -- fluorodeoxyglucose", "FDG"),
        ("Fluorodeoxyglucose F^18^", "FDG"),
        ("Fludeoxyglucose F 18", "FDG"),
        ("2-[18F]fluoro-2-deoxy-D-glucose", "FDG"),
        ("2-deoxy-2-[18F]fluoro-D-glucose", "FDG"),
        ("Ga68-PSMA-11", "PSMA-11"),
        ("68Ga-PSMA-HBED-CC", "PSMA-11"),
        ("Ga-68 gozetotide", "PSMA-11"),
        ("Illuccix", "PSMA-11"),
        ("68Ga-PSMA", "PSMA"),  # agent unknown: family only
        ("PSMA", "PSMA"),
        ("18F-DCFPyL", "DCFPyL"),
        ("Pylarify", "DCFPyL"),
        ("piflufolastat F 18", "DCFPyL"),
        ("[18F]PSMA-1007", "PSMA-1007"),
        ("rhPSMA-7.3", "rhPSMA-7.3"),
        ("Posluma", "rhPSMA-7.3"),
        ("Ga-68 PSMA-617", "PSMA-617"),
        ("PSMA I&T", "PSMA-I&T"),
        ("18F-PSMA-11", "AlF-PSMA-11"),  # PSMA-11 is a Ga-68 agent: the F-18 label is its AlF variant
        ("Ga-68 DOTATATE", "DOTATATE"),
        ("68Ga-DOTA-TATE", "DOTATATE"),
        ("NETSPOT", "DOTATATE"),
        ("Cu64 DOTATATE", "Cu-64 DOTATATE"),
        ("Detectnet", "Cu-64 DOTATATE"),
        ("Ga-68 DOTATOC", "DOTATOC"),
        ("edotreotide", "DOTATOC"),
        ("DOTA-NOC", "DOTANOC"),
        ("Amyvid", "florbetapir"),
        ("AV-45", "florbetapir"),
        ("Neuraceq", "florbetaben"),
        ("Vizamyl", "flutemetamol"),
        ("[11C]PiB", "PiB"),
        ("Pittsburgh compound B", "PiB"),
        ("AV-1451", "flortaucipir"),
        ("Tauvid", "flortaucipir"),
        ("18F-MK-6240", "MK-6240"),
        ("PI-2620", "PI-2620"),
        ("3'-deoxy-3'-[18F]fluorothymidine", "FLT"),
        ("FLT", "FLT"),
        ("6-[18F]fluoro-L-DOPA", "FDOPA"),
        ("18F-DOPA", "FDOPA"),
        ("F-DOPA", "FDOPA"),
        ("O-(2-[18F]fluoroethyl)-L-tyrosine", "FET"),
        ("FET", "FET"),
        ("18F-fluorocholine", "fluorocholine"),
        ("F18 choline", "fluorocholine"),  # family + nuclide narrows to the only F-18 member
        ("11C-choline", "C-11 choline"),
        ("choline", "choline"),
        ("18F-NaF", "NaF"),
        ("Sodium fluoride F^18^", "NaF"),
        ("16α-[18F]fluoro-17β-estradiol", "FES"),
        ("Cerianna", "FES"),
        ("68Ga-FAPI-04", "FAPI-04"),
        ("Ga-68 FAPI-4", "FAPI-04"),  # leading zeros do not matter
        ("FAPI-46", "FAPI-46"),
        ("FAPI", "FAPI"),
        ("Rb-82", "Rb-82"),
        ("82Rb", "Rb-82"),
        ("Rubidium chloride Rb^82^", "Rb-82"),
        ("Rubidium-82 chloride", "Rb-82"),
        ("13NH3", "NH3"),
        ("[13N]ammonia", "NH3"),
        ("[15O]H2O", "water"),
        ("Oxygen-water O^15^", "water"),
        ("Axumin", "fluciclovine"),
        ("anti-[18F]FACBC", "fluciclovine"),
        ("FMISO", "FMISO"),
        ("C-11 methionine", "methionine"),
        ("Zr-89 trastuzumab", "Zr-89 antibody"),
        ("Cu-64 trastuzumab", "Cu-64 antibody"),
        ("Flyrcado", "flurpiridaz"),
        ("C-11 choline", "C-11 choline"),  # canonical names are accepted as they are
        ("Cu-64 DOTATATE", "Cu-64 DOTATATE"),
    ],
)
def test_canonical_tracer_name(text: str, expected: str) -> None:
    assert canonical_tracer_name(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "xyz",
        "saline",
        "F-18",  # a nuclide alone does not name an F-18 agent
        "Ga-68",
        "FDG and PSMA",  # two unrelated tracers: refuse to guess
        "[11C]DOPA",  # FDOPA is an F-18 agent: the header contradicts itself
        "C-11 FDG",
    ],
)
def test_canonical_tracer_name_unknown_or_ambiguous(text: str) -> None:
    assert canonical_tracer_name(text) is None


def test_related_names_resolve_to_the_family() -> None:
    # Two agents of one family named together: the family is still right.
    assert canonical_tracer_name("DOTATATE / DOTATOC") == "SSTR"
    # An agent with a nuclide none of its variants has, but its family has: the family.
    assert canonical_tracer_name("[18F]AlF-PSMA-617") == "PSMA"


def test_every_name_and_synonym_maps_back_to_its_tracer() -> None:
    for tracer in TRACERS:
        assert canonical_tracer_name(tracer.name) == tracer.name
        for synonym in tracer.synonyms:
            assert canonical_tracer_name(synonym) == tracer.name, (tracer.name, synonym)


def test_table_names_are_unique_and_families_exist() -> None:
    names = [t.name.lower() for t in TRACERS]
    assert len(names) == len(set(names))
    families = {t.name for t in TRACERS if t.is_family}
    for tracer in TRACERS:
        assert tracer.family is None or tracer.family in families, tracer.name
        assert tracer.is_family or tracer.nuclides, f"{tracer.name} needs its nuclide(s)"
        for nuclide in tracer.nuclides:
            assert nuclide.lower() in {n.name.lower() for n in NUCLIDES}, (tracer.name, nuclide)
    assert known_tracer_names() == [t.name for t in TRACERS]
    # The families and agents the project asked for by name.
    for name in ("FDG", "PSMA", "PSMA-11", "DCFPyL", "PSMA-1007", "rhPSMA-7.3", "SSTR", "DOTATATE", "DOTATOC",
                 "DOTANOC", "amyloid", "florbetapir", "florbetaben", "flutemetamol", "PiB", "tau", "flortaucipir",
                 "FLT", "FDOPA", "FET", "choline", "NaF", "FES", "FAPI", "Rb-82", "NH3"):
        assert canonical_tracer_name(name) == name


def test_family_and_matching_semantics() -> None:
    assert tracer_family("PSMA-11") == "PSMA"
    assert tracer_family("PSMA") == "PSMA"
    assert tracer_family("FDG") is None
    assert tracer_family("no such tracer") is None
    assert tracer_matches("PSMA", "DCFPyL")  # family rule, agent found
    assert tracer_matches("psma", "PSMA-11")  # case-insensitive
    assert tracer_matches("PSMA-11", "PSMA-11")
    assert not tracer_matches("PSMA-11", "PSMA")  # agent rule, only the family known
    assert not tracer_matches("PSMA-11", "DCFPyL")
    assert not tracer_matches("FDG", None)
    assert not tracer_matches("SSTR", "FDG")


def test_suggestions_for_typos() -> None:
    assert suggest_tracer("FGD") == "FDG"
    assert suggest_tracer("florbetapar") == "florbetapir"
    assert suggest_tracer("qqqqqqqq") is None


# ---------------------------------------------------------------------------------------------------------------
# Nuclides


@pytest.mark.parametrize(
    ("half_life", "expected"),
    [
        (6586.2, "F-18"),
        (6588.0, "F-18"),  # GE rounding, as in the ACRIN headers
        (4062.6, "Ga-68"),
        (4057.7, "Ga-68"),  # older Ga-68 value
        (1221.8, "C-11"),
        (1223.4, "C-11"),
        (597.9, "N-13"),
        (580.4, "Cu-62"),  # 3 % from N-13: nearest wins
        (122.24, "O-15"),
        (76.38, "Rb-82"),
        (75.0, "Rb-82"),
        (45723.6, "Cu-64"),
        (282276.0, "Zr-89"),
        (1000.0, None),
        (0.0, None),
        (-5.0, None),
        (math.nan, None),
    ],
)
def test_nuclide_from_half_life(half_life: float, expected: str | None) -> None:
    assert nuclide_from_half_life(half_life) == expected


# ---------------------------------------------------------------------------------------------------------------
# From headers


def test_identify_by_sct_and_srt_codes() -> None:
    assert canonical_tracer(_pet(code=_code("35321007", "SCT", "Fluorodeoxyglucose F^18^"))) == "FDG"
    assert canonical_tracer(_pet(code=_code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^"))) == "FDG"
    assert canonical_tracer(_pet(code=_code("C-B1031", "SNM3"))) == "FDG"  # SNOMED v3 = SRT values
    assert canonical_tracer(_pet(code=_code("724025002", "SCT"))) == "DOTATATE"
    assert canonical_tracer(_pet(code=_code("C118961", "NCIt"))) == "PSMA-11"
    assert canonical_tracer(_pet(code=_code("126758", "DCM"))) == "PSMA-1007"
    assert canonical_tracer(_pet(code=_code("C-E0269", "SRT"))) == "florbetapir"
    assert canonical_tracer(_pet(code=_code("Y-X1743", "99SDM", "FDG -- fluorodeoxyglucose"))) == "FDG"


def test_identify_by_long_code_value_and_unknown_scheme() -> None:
    item = Dataset()
    item.LongCodeValue = "5811000122108"
    item.CodingSchemeDesignator = "SCT"
    assert canonical_tracer(_pet(code=item)) == "FDOPA"
    # A designator we do not know: the value is accepted when it is unambiguous across schemes.
    assert canonical_tracer(_pet(code=_code("C-B1031", "99LOCAL"))) == "FDG"
    # A known scheme with a value it does not have is not looked up elsewhere.
    assert canonical_tracer(_pet(code=_code("C-B1031", "SCT"))) is None


def test_identify_from_code_meaning_when_value_unknown() -> None:
    ds = _pet(code=_code("X-123", "99PRIVATE", "Ga-68 PSMA-11"))
    ident = identify_tracer(ds)
    assert ident.name == "PSMA-11"
    assert ident.nuclide == "Ga-68"
    assert "X-123" in ident.source


def test_identify_from_text_and_nuclide_code() -> None:
    ds = _pet("choline", nuclide=_code("C-105A1", "SRT", "^11^Carbon"))
    ident = identify_tracer(ds)
    assert ident.name == "C-11 choline"
    assert ident.nuclide == "C-11"
    assert "C-11" in ident.describe()


def test_half_life_decides_the_nuclide_when_nothing_else_does() -> None:
    assert canonical_tracer(_pet("Choline", half_life=1221.8)) == "C-11 choline"
    assert canonical_tracer(_pet("Choline", half_life=6586.2)) == "fluorocholine"
    assert canonical_tracer(_pet("DOTATATE", half_life=45723.6)) == "Cu-64 DOTATATE"
    assert canonical_tracer(_pet("DOTATATE", half_life=4062.6)) == "DOTATATE"


def test_rb82_from_the_nuclide_alone() -> None:
    assert canonical_tracer(_pet(nuclide=_code("C-159A2", "SRT", "^82^Rubidium"))) == "Rb-82"
    assert canonical_tracer(_pet(half_life=76.38)) == "Rb-82"
    # F-18 alone names no agent (e.g. the ACRIN FLT headers carry only the nuclide).
    ident = identify_tracer(_pet(nuclide=_code("C-111A1", "SNM3", "F^18^[^18^Fluorine]"), half_life=6586.2))
    assert ident.name is None
    assert ident.nuclide == "F-18"
    assert "does not identify the agent" in (ident.problem or "")


def test_code_and_text_agree_or_refine() -> None:
    ds = _pet("FDG", code=_code("C-B1031", "SRT"))
    ident = identify_tracer(ds)
    assert ident.name == "FDG"
    assert "and Radiopharmaceutical" in ident.source
    # The code names the family (fluorobenzothiazole class), the text the agent: keep the agent.
    assert canonical_tracer(_pet("Vizamyl", code=_code("423546004", "SCT"))) == "flutemetamol"
    # Text names only the family, the code the agent.
    assert canonical_tracer(_pet("Ga-68 PSMA", code=_code("C118961", "NCIt"))) == "PSMA-11"


def test_code_text_conflict_gives_none_with_the_reason() -> None:
    # A console that kept its default FDG code while the technologist typed the real tracer.
    ident = identify_tracer(_pet("Ga68 PSMA-11", code=_code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^")))
    assert ident.name is None
    assert "FDG" in (ident.problem or "") and "PSMA-11" in (ident.problem or "")
    assert "not recognised" in ident.describe()
    # Same nuclide, different agents.
    ident = identify_tracer(_pet("Florbetapir", code=_code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^")))
    assert ident.name is None
    assert "says FDG but Radiopharmaceutical 'Florbetapir' says florbetapir" in (ident.problem or "")


def test_missing_or_unknown_radiopharmaceutical() -> None:
    ds = Dataset()
    ds.Modality = "PT"
    assert identify_tracer(ds).name is None
    assert "no RadiopharmaceuticalInformationSequence" in (identify_tracer(ds).problem or "")
    ds.RadiopharmaceuticalInformationSequence = Sequence([])
    assert canonical_tracer(ds) is None
    ident = identify_tracer(_pet("Mystery-123"))
    assert ident.name is None
    assert "Mystery-123" in (ident.problem or "")
    assert canonical_tracer(_pet()) is None


def test_family_only_identification_is_described_as_such() -> None:
    ident = identify_tracer(_pet("Ga-68 PSMA"))
    assert ident.name == "PSMA"
    assert "family" in ident.describe()


# ---------------------------------------------------------------------------------------------------------------
# The table against the standard (pydicom's copy of PS3.16)


def _pydicom_cids() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """{cid: {(scheme, value): meaning}} for CID 4020/4021 and pydicom's SCT -> SRT map."""
    try:
        from pydicom.sr import _cid_dict, _concepts_dict, _snomed_dict
    except ImportError:  # pragma: no cover - private modules of pydicom 3
        pytest.skip("pydicom's CID tables are not importable in this version")
    out: dict[str, dict[str, str]] = {}
    for cid in (4020, 4021):
        table: dict[str, str] = {}
        for scheme, keywords in _cid_dict.cid_concepts[cid].items():
            for keyword in keywords:
                for value, (meaning, _) in _concepts_dict.concepts[scheme][keyword].items():
                    table[f"{scheme} {value}"] = meaning
        out[str(cid)] = table
    return out, dict(_snomed_dict.mapping["SCT"])


def test_tracer_codes_are_the_standards() -> None:
    cids, sct_to_srt = _pydicom_cids()
    cid4021 = cids["4021"]
    srt_to_sct = {srt: sct for sct, srt in sct_to_srt.items()}
    for tracer in TRACERS:
        codes = set(tracer.codes)
        for scheme, value in tracer.codes:
            if scheme == "99SDM":
                continue  # GE's legacy microglossary code, documented in tracers.py
            if scheme == "SRT":
                # The legacy code must be the SNOMED-RT twin of an SCT code this tracer also lists.
                assert ("SCT", srt_to_sct.get(value)) in codes, (tracer.name, value)
                continue
            assert f"{scheme} {value}" in cid4021, (tracer.name, scheme, value)


def test_every_cid4021_code_is_known() -> None:
    cids, _ = _pydicom_cids()
    ours = {f"{s} {v}" for t in TRACERS for s, v in t.codes}
    # Left out on purpose (see tracers.py): C-14 glutamine and I-131 CLR1404 are not PET tracers.
    missing = set(cids["4021"]) - ours - {"DCM 126710", "DCM 126716"}
    assert not missing, sorted(missing)


def test_zr89_antibody_codes_are_all_zirconium() -> None:
    cids, _ = _pydicom_cids()
    zr = next(t for t in TRACERS if t.name == "Zr-89 antibody")
    for scheme, value in zr.codes:
        assert "89^Zr" in cids["4021"][f"{scheme} {value}"], value


def test_nuclide_codes_are_the_standards() -> None:
    cids, sct_to_srt = _pydicom_cids()
    for nuclide in NUCLIDES:
        codes = dict(nuclide.codes)
        for scheme, value in nuclide.codes:
            if scheme == "SRT":
                assert sct_to_srt.get(codes["SCT"]) == value, nuclide.name
            else:
                meaning = cids["4020"][f"{scheme} {value}"]
                assert meaning.startswith(f"^{nuclide.mass}^"), (nuclide.name, meaning)
                assert meaning.lower().endswith(nuclide.element), (nuclide.name, meaning)


def test_tokeniser_splits_nuclides_from_agents() -> None:
    tokens = tracers._tokenise("68Ga-PSMA-11")
    assert tokens.words == ("psma", "11")
    assert tokens.nuclides == ("Ga-68",)
    assert tracers._tokenise("Fluorodeoxyglucose F^18^").nuclides == ("F-18",)
    assert tracers._tokenise("FAPI-04").words == ("fapi", "4")


# ---------------------------------------------------------------------------------------------------------------
# Real headers


def test_real_ge_fdg_headers() -> None:
    folder = _require_realdata("ohif_acrin_nsclc_fdg_pet_042/PT_AC")
    path = next(p for p in sorted(folder.iterdir()) if p.is_file())
    ident = identify_tracer(pydicom.dcmread(path, stop_before_pixels=True))
    assert ident.name == "FDG"
    assert ident.nuclide == "F-18"


def test_real_flt_header_without_a_name_is_not_guessed() -> None:
    # The ACRIN-FLT slices carry only the F-18 nuclide: FLT cannot be told from FDG, so no tracer.
    folder = _require_realdata("suyashkumar_dicom_acrin_flt_breast")
    ident = identify_tracer(pydicom.dcmread(folder / "1.dcm", stop_before_pixels=True))
    assert ident.name is None
    assert ident.nuclide == "F-18"


def test_nuclide_contradicting_the_named_agent_gives_none() -> None:
    ident = identify_tracer(_pet("FDG", nuclide=_code("C-131A3", "SRT", "^68^Gallium")))
    assert ident.name is None
    assert "not made with Ga-68" in (ident.problem or "")
    ident = identify_tracer(_pet("FDG and PSMA"))
    assert ident.name is None
    assert "unrelated" in (ident.problem or "")


@pytest.mark.parametrize(
    ("text", "nuclides", "words"),
    [
        ("Tc-99m MDP", ("Tc-99m",), ("mdp",)),
        ("99mTc-MAA", ("Tc-99m",), ("maa",)),
        ("[18F]FDG", ("F-18",), ("fdg",)),
        ("Fluorine-18", ("F-18",), ()),
        ("^18^Fluorine", ("F-18",), ()),
        ("Gallium 68 / F 18", ("Ga-68", "F-18"), ()),
        ("PSMA I&T", (), ("psma", "i", "t")),  # a lone symbol without a mass is a word
        ("FAPI-74", (), ("fapi", "74")),  # 74 is no mass of anything here
    ],
)
def test_tokeniser_nuclides(text: str, nuclides: tuple[str, ...], words: tuple[str, ...]) -> None:
    tokens = tracers._tokenise(text)
    assert tokens.nuclides == nuclides
    assert tokens.words == words


@pytest.mark.parametrize(
    "text",
    [
        "Lu-177 PSMA-617",  # post-therapy SPECT: not a PET agent
        "177Lu-DOTATATE",
        "Tc-99m EDTA",
        "Thallous chloride Tl-201",  # "chloride" alone must not make Rb-82
        "Ga-68 chloride",
    ],
)
def test_single_photon_and_therapy_labels_are_not_pet_agents(text: str) -> None:
    assert canonical_tracer_name(text) is None
