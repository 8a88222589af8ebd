"""Which PET tracer a series shows, from its radiopharmaceutical attributes, with synonyms and codes.

Scanners describe the tracer in three places of the first item of the Radiopharmaceutical Information Sequence
(0054,0016): a free-text ``Radiopharmaceutical`` (0018,0031) typed or picked at the console ("FDG",
"18F-FDG", "Ga68-PSMA-11", "Fluorodeoxyglucose F^18^"), a ``RadiopharmaceuticalCodeSequence`` (0054,0304) and
a ``RadionuclideCodeSequence`` (0054,0300), plus ``RadionuclideHalfLife`` (0018,1075). This module turns them
into one canonical name from the table below, so routing rules can say ``tracer: [PSMA]`` and match
"Ga-68 gozetotide", "68Ga-PSMA-11", "Illuccix" and code NCIt C118961 alike.

Names form a two-level tree: a *family* ("PSMA", "SSTR", "amyloid", "tau", "choline", "FAPI", "hypoxia",
"antibody", ...) groups *agents* ("PSMA-11", "DCFPyL", "DOTATATE", "florbetapir", ...). A rule naming a family
matches every agent in it; a rule naming an agent matches that agent only. When the header only says "PSMA",
the series is identified as the family, which matches family rules but not agent rules.

Code values are taken from DICOM PS3.16 CID 4021 "PET Radiopharmaceutical" and CID 4020 "PET Radionuclide"
as shipped in pydicom 3 (``pydicom/sr/_cid_dict.py``), with the legacy SNOMED-RT (``SRT``) equivalents from
pydicom's SNOMED mapping (``pydicom/sr/_snomed_dict.py``): current objects carry ``SCT`` codes, older scanners
``SRT`` (e.g. FDG: SCT 35321007 = SRT C-B1031). Agents without a code in CID 4021 (rhPSMA-7.3, DOTANOC,
FAPI, ...) are recognised by name only. ``tests/dicom_node/test_tracers.py`` checks every code here against
pydicom's copy of the standard.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "NUCLIDES",
    "TRACERS",
    "TRACER_ATTRIBUTES",
    "Nuclide",
    "Tracer",
    "TracerIdentification",
    "canonical_tracer",
    "canonical_tracer_name",
    "identify_tracer",
    "known_tracer_names",
    "nuclide_from_half_life",
    "suggest_tracer",
    "tracer_family",
    "tracer_matches",
]

#: The DICOM attributes ``identify_tracer`` reads (dotted paths into the first sequence item).
TRACER_ATTRIBUTES: tuple[str, ...] = (
    "RadiopharmaceuticalInformationSequence.Radiopharmaceutical",
    "RadiopharmaceuticalInformationSequence.RadiopharmaceuticalCodeSequence.CodeValue",
    "RadiopharmaceuticalInformationSequence.RadiopharmaceuticalCodeSequence.CodingSchemeDesignator",
    "RadiopharmaceuticalInformationSequence.RadiopharmaceuticalCodeSequence.CodeMeaning",
    "RadiopharmaceuticalInformationSequence.RadionuclideCodeSequence.CodeValue",
    "RadiopharmaceuticalInformationSequence.RadionuclideCodeSequence.CodeMeaning",
    "RadiopharmaceuticalInformationSequence.RadionuclideHalfLife",
)


# --------------------------------------------------------------------------------------------------------------
# Radionuclides


@dataclass(frozen=True)
class Nuclide:
    """A positron emitter (or PET calibration source) as named in headers.

    ``half_life_s`` is the NNDC/DDEP value; headers round it differently (Ga-68 4062.6 s or 4057.7 s), so
    ``nuclide_from_half_life`` matches within a tolerance.
    """

    name: str  # canonical, e.g. "F-18"
    symbol: str  # element symbol, lower case
    element: str  # element name, lower case
    mass: str  # mass number as written ("18", "94m")
    half_life_s: float | None
    codes: tuple[tuple[str, str], ...] = ()  # (coding scheme, code value), CID 4020


NUCLIDES: tuple[Nuclide, ...] = (
    # Codes: CID 4020 "PET Radionuclide" (SCT) and their SRT equivalents.
    Nuclide("F-18", "f", "fluorine", "18", 6586.2, (("SCT", "77004003"), ("SRT", "C-111A1"))),
    Nuclide("Ga-68", "ga", "gallium", "68", 4062.6, (("SCT", "35337001"), ("SRT", "C-131A3"))),
    Nuclide("C-11", "c", "carbon", "11", 1221.8, (("SCT", "40565003"), ("SRT", "C-105A1"))),
    Nuclide("N-13", "n", "nitrogen", "13", 597.9, (("SCT", "21576001"), ("SRT", "C-107A1"))),
    Nuclide("O-15", "o", "oxygen", "15", 122.24, (("SCT", "129504001"), ("SRT", "C-B1038"))),
    Nuclide("Rb-82", "rb", "rubidium", "82", 75.45, (("SCT", "79197006"), ("SRT", "C-159A2"))),
    Nuclide("Cu-64", "cu", "copper", "64", 45723.6, (("SCT", "3932008"), ("SRT", "C-127A2"))),
    Nuclide("Cu-62", "cu", "copper", "62", 580.4, (("SCT", "422934004"), ("SRT", "C-127A5"))),
    Nuclide("Cu-61", "cu", "copper", "61", 12020.4, (("SCT", "71425003"), ("SRT", "C-127A1"))),
    Nuclide("Cu-60", "cu", "copper", "60", 1422.0, (("SCT", "425364008"), ("SRT", "C-127A4"))),
    Nuclide("Zr-89", "zr", "zirconium", "89", 282276.0, (("SCT", "63360001"), ("SRT", "C-168A4"))),
    Nuclide("I-124", "i", "iodine", "124", 360806.0, (("SCT", "40937006"), ("SRT", "C-114A5"))),
    Nuclide("Sc-44", "sc", "scandium", "44", 14551.0, (("DCM", "126600"),)),
    Nuclide("Y-86", "y", "yttrium", "86", 53064.0, (("SCT", "10738001"), ("SRT", "C-162A3"))),
    Nuclide("Y-90", "y", "yttrium", "90", 230580.0, (("SCT", "14691008"), ("SRT", "C-162A7"))),
    Nuclide("Br-76", "br", "bromine", "76", 58320.0, (("SCT", "79523006"), ("SRT", "C-113A2"))),
    Nuclide("Tc-94m", "tc", "technetium", "94m", 3120.0, (("SCT", "424079002"), ("SRT", "C-163AA"))),
    Nuclide("Ge-68", "ge", "germanium", "68", 2.3410e7, (("SCT", "53315004"), ("SRT", "C-128A2"))),
    Nuclide("Na-22", "na", "sodium", "22", 8.2108e7, (("SCT", "71633006"), ("SRT", "C-155A1"))),
    # Single-photon and therapy nuclides, recognised in text only so that "Lu-177 PSMA-617" or "Tc-99m EDTA"
    # reads as a contradiction instead of a PET agent. No half-life: Ga-67 (3.26 d) sits 0.2 % from Zr-89.
    *(
        Nuclide(name, symbol, element, mass, None)
        for name, symbol, element, mass in (
            ("Tc-99m", "tc", "technetium", "99m"), ("In-111", "in", "indium", "111"),
            ("I-123", "i", "iodine", "123"), ("I-125", "i", "iodine", "125"), ("I-131", "i", "iodine", "131"),
            ("Tl-201", "tl", "thallium", "201"), ("Ga-67", "ga", "gallium", "67"),
            ("Lu-177", "lu", "lutetium", "177"), ("Sm-153", "sm", "samarium", "153"),
            ("Ho-166", "ho", "holmium", "166"), ("Ra-223", "ra", "radium", "223"),
            ("Ac-225", "ac", "actinium", "225"), ("Cr-51", "cr", "chromium", "51"), ("Xe-133", "xe", "xenon", "133"),
        )
    ),
)

_NUCLIDE_BY_NAME = {n.name.lower(): n for n in NUCLIDES}
_NUCLIDE_BY_CODE = {(scheme, value): n.name for n in NUCLIDES for scheme, value in n.codes}
# ("f", "18") and ("fluorine", "18") -> "F-18": how a nuclide appears in tokenised text.
_NUCLIDE_BY_PAIR = {(word, n.mass): n.name for n in NUCLIDES for word in (n.symbol, n.element)}
_ELEMENT_WORDS = frozenset(word for word, _ in _NUCLIDE_BY_PAIR)
_HALF_LIFE_TOLERANCE = 0.02  # relative; Cu-62 (580 s) and N-13 (598 s) are 3 % apart, nearest wins


def nuclide_from_half_life(half_life_s: float) -> str | None:
    """Return the nuclide whose half-life is nearest ``half_life_s`` within 2 %, else None."""
    if not half_life_s > 0:  # also rejects NaN
        return None
    best = min(
        (n for n in NUCLIDES if n.half_life_s),
        key=lambda n: abs(half_life_s / n.half_life_s - 1.0),  # type: ignore[operator]
    )
    assert best.half_life_s is not None
    return best.name if abs(half_life_s / best.half_life_s - 1.0) <= _HALF_LIFE_TOLERANCE else None


# --------------------------------------------------------------------------------------------------------------
# Tracers


@dataclass(frozen=True)
class Tracer:
    """One row of the synonyms table: an agent, or a family of agents (``is_family``).

    ``nuclides`` lists the labels the agent is made with (empty for families); a header naming the agent with
    another nuclide is resolved through ``variant_of`` (Cu-64 DOTATATE for "DOTATATE" + Cu-64) or else falls
    back to the family. ``nuclide_only`` agents are recognised from the nuclide alone (only Rb-82 chloride is
    imaged with Rb-82).
    """

    name: str
    description: str
    family: str | None = None
    nuclides: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    codes: tuple[tuple[str, str], ...] = ()  # (coding scheme, code value) of the radiopharmaceutical
    variant_of: tuple[str, ...] = ()
    nuclide_only: bool = False
    is_family: bool = False


def _family(name: str, description: str, synonyms: Sequence[str] = (), codes: Sequence[tuple[str, str]] = ()) -> Tracer:
    return Tracer(name, description, synonyms=tuple(synonyms), codes=tuple(codes), is_family=True)


_F18, _GA68, _C11, _CU64 = ("F-18",), ("Ga-68",), ("C-11",), ("Cu-64",)

TRACERS: tuple[Tracer, ...] = (
    # ---- glucose metabolism
    Tracer(
        "FDG", "2-[18F]fluoro-2-deoxy-D-glucose", nuclides=_F18,
        synonyms=("fluorodeoxyglucose", "fludeoxyglucose", "fluoro-deoxy-glucose", "fluoro deoxyglucose",
                  "fluoro-2-deoxy-D-glucose", "fluoro-2-deoxyglucose", "deoxy-2-fluoro-D-glucose",
                  "2-deoxy-2-fluoroglucose", "fluoro-D-glucose"),
        # 99SDM Y-X1743 "FDG -- fluorodeoxyglucose": SNOMED DICOM Microglossary code written by GE Discovery
        # consoles (seen in the ACRIN-NSCLC-FDG-PET and TCIA soft-tissue-sarcoma headers in shared/data).
        codes=(("SCT", "35321007"), ("SRT", "C-B1031"), ("99SDM", "Y-X1743")),
    ),
    # ---- prostate-specific membrane antigen
    _family("PSMA", "PSMA ligands", ("prostate specific membrane antigen", "prostate-specific membrane antigen")),
    Tracer(
        "PSMA-11", "[68Ga]Ga-PSMA-11 (gozetotide, PSMA-HBED-CC)", "PSMA", _GA68,
        ("PSMA11", "gozetotide", "Illuccix", "Locametz", "PSMA-HBED-CC", "HBED-CC", "PSMA HBED"),
        (("NCIt", "C118961"),),
    ),
    Tracer(
        "AlF-PSMA-11", "[18F]AlF-PSMA-11", "PSMA", _F18, ("Al18F-PSMA-11", "AlF PSMA 11"),
        variant_of=("PSMA-11",),
    ),
    Tracer("PSMA-617", "[68Ga]Ga-PSMA-617 (vipivotide tetraxetan)", "PSMA", _GA68,
           ("PSMA617", "vipivotide tetraxetan", "vipivotide"), (("DCM", "126759"),)),
    Tracer("PSMA-I&T", "[68Ga]Ga-PSMA-I&T (zadavotide guraxetan)", "PSMA", _GA68,
           ("PSMA I&T", "PSMA-I and T", "PSMA imaging and therapy", "zadavotide guraxetan", "zadavotide")),
    Tracer("DCFPyL", "[18F]DCFPyL (piflufolastat)", "PSMA", _F18,
           ("piflufolastat", "Pylarify", "PyL", "PSMA-PyL"), (("NCIt", "C116352"),)),
    Tracer("PSMA-1007", "[18F]PSMA-1007", "PSMA", _F18, ("PSMA1007", "Radelumin"), (("DCM", "126758"),)),
    Tracer("rhPSMA-7.3", "[18F]rhPSMA-7.3 (flotufolastat)", "PSMA", _F18,
           ("rhPSMA 7.3", "rhPSMA", "flotufolastat", "Posluma")),
    Tracer("DCFBC", "[18F]DCFBC", "PSMA", _F18, (), (("NCIt", "C96234"),)),
    # ---- somatostatin receptor
    _family("SSTR", "somatostatin receptor ligands",
            ("somatostatin receptor", "somatostatin", "DOTA", "DOTA peptide", "octreotide analogue")),
    Tracer(
        "DOTATATE", "[68Ga]Ga-DOTA-TATE (oxodotreotide)", "SSTR", _GA68,
        ("DOTA-TATE", "DOTA TATE", "DOTA-Tyr3-octreotate", "DOTA-octreotate", "oxodotreotide", "NETSPOT"),
        (("SCT", "724025002"),),
    ),
    Tracer("Cu-64 DOTATATE", "[64Cu]Cu-DOTA-TATE (copper Cu 64 dotatate)", "SSTR", _CU64,
           ("Detectnet", "copper dotatate"), variant_of=("DOTATATE",)),
    Tracer(
        "DOTATOC", "[68Ga]Ga-DOTA-TOC (edotreotide)", "SSTR", _GA68,
        ("DOTA-TOC", "DOTA TOC", "edotreotide", "DOTA-Tyr3-octreotide", "SomaKit TOC"),
        (("UMLS", "C2713594"),),
    ),
    Tracer("DOTANOC", "[68Ga]Ga-DOTA-NOC", "SSTR", _GA68, ("DOTA-NOC", "DOTA NOC", "DOTA-1-Nal3-octreotide")),
    Tracer("NODAGA-JR11", "[68Ga]Ga-NODAGA-JR11 (satoreotide trizoxetan), SSTR antagonist", "SSTR", _GA68,
           ("JR11", "satoreotide trizoxetan", "satoreotide", "OPS202")),
    # ---- amyloid
    _family("amyloid", "beta-amyloid ligands", ("beta-amyloid", "beta amyloid", "amyloid beta", "amyloid-beta"),
            # "Fluorobenzothiazole F^18^" names the thioflavin-T class (PiB, flutemetamol), not one agent.
            (("SCT", "423546004"), ("SRT", "C-B07E4"))),
    Tracer("florbetapir", "[18F]florbetapir", "amyloid", _F18, ("Amyvid", "AV-45", "AV45"),
           (("SCT", "456995000"), ("SRT", "C-E0269"))),
    Tracer("florbetaben", "[18F]florbetaben", "amyloid", _F18, ("Neuraceq", "BAY 94-9172", "AV-1"),
           (("SCT", "712736002"), ("SRT", "C-D6858"))),
    Tracer("flutemetamol", "[18F]flutemetamol", "amyloid", _F18, ("Vizamyl", "GE-067", "3'-F-PiB"),
           (("SCT", "456997008"), ("SRT", "C-E0267"))),
    Tracer("PiB", "[11C]Pittsburgh compound B", "amyloid", _C11,
           ("Pittsburgh compound B", "Pittsburgh compound-B", "PIB-_C11"), (("DCM", "126500"),)),
    Tracer("NAV4694", "[18F]NAV4694 (flutafuranol)", "amyloid", _F18, ("flutafuranol", "AZD4694", "NAV-4694")),
    # ---- tau
    _family("tau", "tau ligands", ("tau protein", "tau PET")),
    Tracer("flortaucipir", "[18F]flortaucipir (AV-1451, T807)", "tau", _F18,
           ("Tauvid", "AV-1451", "AV1451", "T807", "T-807"),
           (("SCT", "879808000"), ("DCM", "126502"))),
    Tracer("MK-6240", "[18F]MK-6240 (florquinitau)", "tau", _F18, ("MK6240", "florquinitau"),
           (("UMLS", "C4506764"),)),
    Tracer("PI-2620", "[18F]PI-2620", "tau", _F18, ("PI2620",)),
    Tracer("RO-948", "[18F]RO-948 (RO6958948)", "tau", _F18, ("RO948", "RO6958948"), (("DCM", "126757"),)),
    Tracer("PM-PBB3", "[18F]PM-PBB3 (APN-1607, florzolotau)", "tau", _F18, ("APN-1607", "florzolotau")),
    Tracer("THK5351", "[18F]THK5351", "tau", _F18, ("THK-5351",), (("UMLS", "C4279748"),)),
    Tracer("THK5317", "[18F]THK5317", "tau", _F18, ("THK-5317",), (("UMLS", "C4550127"),)),
    Tracer("RO-963", "[11C]RO6924963", "tau", _C11, ("RO963", "RO6924963"), (("DCM", "126719"),)),
    Tracer("RO-643", "[11C]RO6931643", "tau", _C11, ("RO643", "RO6931643"), (("DCM", "126720"),)),
    # ---- proliferation, amino acids, dopamine, bone, receptors
    Tracer("FLT", "3'-deoxy-3'-[18F]fluorothymidine", nuclides=_F18,
           synonyms=("fluorothymidine", "fluoro-thymidine", "alovudine", "thymidine"),
           codes=(("SCT", "129502002"), ("SRT", "C-B1036"))),
    Tracer("FDOPA", "6-[18F]fluoro-L-DOPA", nuclides=_F18,
           synonyms=("F-DOPA", "fluorodopa", "fluoro-dopa", "fluoro-L-dopa", "L-DOPA", "DOPA"),
           codes=(("SCT", "5811000122108"), ("SRT", "C-E0241"))),
    Tracer("FET", "O-(2-[18F]fluoroethyl)-L-tyrosine", nuclides=_F18,
           synonyms=("fluoroethyltyrosine", "fluorethyltyrosin", "fluorethyltyrosine", "fluoroethyl-L-tyrosine",
                     "fluoroethyl tyrosine"),
           codes=(("SCT", "424708001"), ("SRT", "C-B07E0"))),
    Tracer("methionine", "L-[methyl-11C]methionine", nuclides=_C11, synonyms=("MET", "L-methionine"),
           codes=(("SCT", "129510001"), ("SRT", "C-B103E"))),
    Tracer("fluciclovine", "anti-1-amino-3-[18F]fluorocyclobutane-1-carboxylic acid", nuclides=_F18,
           synonyms=("FACBC", "anti-FACBC", "Axumin"), codes=(("SCT", "457000009"), ("SRT", "C-E026A"))),
    Tracer("NaF", "[18F]sodium fluoride", nuclides=_F18, synonyms=("sodium fluoride", "fluoride"),
           codes=(("SCT", "129501009"), ("SRT", "C-B1032"))),
    Tracer("FES", "16alpha-[18F]fluoro-17beta-estradiol", nuclides=_F18,
           synonyms=("fluoroestradiol", "fluoro-estradiol", "fluoro-17beta-estradiol", "fluoro-17-estradiol",
                     "16alpha-fluoroestradiol", "Cerianna", "estradiol"),
           codes=(("SCT", "926372005"),)),
    Tracer("FDHT", "16beta-[18F]fluoro-5alpha-dihydrotestosterone", nuclides=_F18,
           synonyms=("fluorodihydrotestosterone", "fluoro-5alpha-dihydrotestosterone", "dihydrotestosterone")),
    Tracer("pentixafor", "[68Ga]Ga-pentixafor (CXCR4)", nuclides=_GA68, synonyms=("CXCR4",)),
    Tracer("fluciclatide", "[18F]fluciclatide (integrin)", nuclides=_F18, synonyms=("AH111585",),
           codes=(("SCT", "456999006"), ("SRT", "C-E0265"))),
    # ---- membrane and lipid metabolism
    _family("choline", "radiolabelled choline", ("choline",)),
    Tracer("fluorocholine", "[18F]fluoromethylcholine", "choline", _F18,
           ("fluoromethylcholine", "fluoro-methyl-choline", "FCH", "FCho", "FMCH"),
           (("SCT", "456992002"), ("SRT", "C-E0273"))),
    Tracer("C-11 choline", "[11C]choline", "choline", _C11, (), (("DCM", "126703"),)),
    Tracer("acetate", "[11C]acetate", nuclides=_C11, codes=(("SCT", "129513004"), ("SRT", "C-B1043"))),
    Tracer("palmitate", "[11C]palmitate", nuclides=_C11, codes=(("SCT", "129514005"), ("SRT", "C-B1044"))),
    # ---- fibroblast activation protein
    _family("FAPI", "fibroblast activation protein inhibitors",
            ("fibroblast activation protein inhibitor", "fibroblast activation protein")),
    Tracer("FAPI-04", "[68Ga]Ga-FAPI-04", "FAPI", _GA68, ("FAPI04", "FAPI-4")),
    Tracer("FAPI-46", "[68Ga]Ga-FAPI-46", "FAPI", _GA68, ("FAPI46",)),
    Tracer("FAPI-74", "[18F]AlF-FAPI-74 or [68Ga]Ga-FAPI-74", "FAPI", ("F-18", "Ga-68"), ("FAPI74",)),
    Tracer("FAPI-2286", "[68Ga]Ga-FAPI-2286", "FAPI", _GA68, ("FAPI2286",)),
    # ---- myocardial perfusion
    Tracer("Rb-82", "[82Rb]rubidium chloride", nuclides=("Rb-82",),
           synonyms=("rubidium", "rubidium chloride", "RbCl", "Cardiogen", "Cardiogen-82", "Ruby-Fill", "RubyFill"),
           codes=(("SCT", "129503007"), ("SRT", "C-B1037")), nuclide_only=True),
    Tracer("NH3", "[13N]ammonia", nuclides=("N-13",), synonyms=("ammonia",),
           codes=(("SCT", "129508003"), ("SRT", "C-B103C"))),
    Tracer("water", "[15O]water", nuclides=("O-15",), synonyms=("H2O", "oxygen-water", "H2 15O"),
           codes=(("SCT", "129505000"), ("SRT", "C-B1039"))),
    Tracer("flurpiridaz", "[18F]flurpiridaz", nuclides=_F18, synonyms=("Flyrcado", "BMS-747158"),
           codes=(("DCM", "126718"),)),
    # ---- hypoxia
    _family("hypoxia", "hypoxia tracers", ("hypoxia",)),
    Tracer("FMISO", "[18F]fluoromisonidazole", "hypoxia", _F18, ("fluoromisonidazole", "misonidazole"),
           (("SCT", "422598008"), ("SRT", "C-B07E1"))),
    Tracer("FAZA", "[18F]fluoroazomycin arabinoside", "hypoxia", _F18,
           ("fluoroazomycin arabinoside", "fluoroazomycin-arabinoside")),
    Tracer("FETA", "[18F]fluoroetanidazole", "hypoxia", _F18, ("fluoroetanidazole",), (("UMLS", "C1541539"),)),
    Tracer("Cu-ATSM", "[64Cu]Cu-ATSM (also 60Cu, 61Cu, 62Cu)", "hypoxia", ("Cu-64", "Cu-60", "Cu-61", "Cu-62"),
           ("ATSM",),
           (("SCT", "422855001"), ("SRT", "C-B07DB"), ("DCM", "126700"), ("DCM", "126701"), ("DCM", "126702"))),
    Tracer("Cu-PTSM", "[62Cu]Cu-PTSM", nuclides=("Cu-62",), synonyms=("PTSM",),
           codes=(("SCT", "422789008"), ("SRT", "C-B07E7"))),
    # ---- neuro receptors and transporters
    Tracer("raclopride", "[11C]raclopride", nuclides=_C11, codes=(("SCT", "129512009"), ("SRT", "C-B1042"))),
    Tracer("flumazenil", "[11C]- or [18F]flumazenil", nuclides=("C-11", "F-18"),
           codes=(("SCT", "423543007"), ("SRT", "C-B07DE"), ("SCT", "422975006"), ("SRT", "C-B07DF"))),
    Tracer("fallypride", "[11C]- or [18F]fallypride", nuclides=("C-11", "F-18"),
           codes=(("DCM", "126704"), ("DCM", "126705"))),
    Tracer("FP-DTBZ", "[18F]fluoropropyl-dihydrotetrabenazine (AV-133)", nuclides=_F18,
           synonyms=("AV-133", "florbenazine", "fluoropropyl-dihydrotetrabenazine", "DTBZ"),
           codes=(("UMLS", "C2934038"),)),
    Tracer("UCB-J", "[11C]UCB-J (SV2A)", nuclides=_C11, synonyms=("UCBJ",), codes=(("UMLS", "C4506788"),)),
    Tracer("PK11195", "[11C]PK11195 (TSPO)", nuclides=_C11, synonyms=("PK-11195",), codes=(("UMLS", "C1609883"),)),
    Tracer("DPA-714", "[18F]DPA-714 (TSPO)", nuclides=_F18, synonyms=("DPA714",), codes=(("DCM", "126766"),)),
    Tracer("DPA-713", "[11C]DPA-713 (TSPO)", nuclides=_C11, synonyms=("DPA713",), codes=(("DCM", "126765"),)),
    Tracer("spiperone", "[18F]spiperone", nuclides=_F18, codes=(("SCT", "129499001"), ("SRT", "C-B1033"))),
    Tracer("mespiperone", "[11C]mespiperone", nuclides=_C11, codes=(("SCT", "424789007"), ("SRT", "C-B07E5"))),
    Tracer("carfentanil", "[11C]carfentanil", nuclides=_C11, codes=(("SCT", "129511002"), ("SRT", "C-B103F"))),
    Tracer("flubatine", "[18F]flubatine", nuclides=_F18, codes=(("DCM", "126503"),)),
    Tracer("nifene", "[18F]nifene", nuclides=_F18, codes=(("DCM", "126714"),)),
    Tracer("FLB 457", "[11C]FLB 457", nuclides=_C11, synonyms=("FLB457",), codes=(("DCM", "126706"),)),
    Tracer("fluorotriopride", "[18F]fluorotriopride", nuclides=_F18, codes=(("DCM", "126707"),)),
    Tracer("ISO-1", "[18F]ISO-1 (sigma-2 receptor)", nuclides=_F18, synonyms=("ISO1",), codes=(("UMLS", "C2981788"),)),
    Tracer("2FA", "2-[18F]fluoro-A-85380", nuclides=_F18, synonyms=("2-FA", "fluoro-A-85380"),
           codes=(("DCM", "126713"),)),
    # ---- other CID 4021 agents
    # 126710 "Glutamine C^14^" is in CID 4021 too but C-14 is no positron emitter: left out on purpose.
    Tracer("glutamine", "[18F]- or [11C]glutamine", nuclides=("F-18", "C-11"),
           codes=(("DCM", "126711"), ("DCM", "126709"))),
    Tracer("glutamate", "[13N]glutamate", nuclides=("N-13",), codes=(("SCT", "129509006"), ("SRT", "C-B103D"))),
    Tracer("sarcosine", "[11C]sarcosine", nuclides=_C11, codes=(("NCIt", "C122684"),)),
    Tracer("fluorouracil", "5-[18F]fluorouracil", nuclides=_F18, synonyms=("5-FU",),
           codes=(("SCT", "425236000"), ("SRT", "C-B07E3"))),
    Tracer("fluoromethane", "[18F]fluoromethane", nuclides=_F18, codes=(("SCT", "422763008"), ("SRT", "C-B07E2"))),
    Tracer("sodium iodide I-124", "[124I]sodium iodide", nuclides=("I-124",), synonyms=("sodium iodide",),
           codes=(("SCT", "422980002"), ("SRT", "C-B07E8"))),
    # 126716 "CLR1404 I^131^" is left out: I-131 is imaged by SPECT.
    Tracer("CLR1404", "[124I]CLR1404", nuclides=("I-124",), codes=(("DCM", "126715"),)),
    Tracer("Ga-68 EDTA", "[68Ga]Ga-EDTA", nuclides=_GA68, synonyms=("EDTA",),
           codes=(("SCT", "423498000"), ("SRT", "C-B07DD"))),
    Tracer("O-15 oxygen", "[15O]oxygen gas", nuclides=("O-15",), synonyms=("oxygen", "O2"),
           codes=(("SCT", "129504001"), ("SRT", "C-B1038"))),
    Tracer("O-15 carbon monoxide", "[15O]carbon monoxide", nuclides=("O-15",), synonyms=("carbon monoxide",),
           codes=(("SCT", "129506004"), ("SRT", "C-B103A"))),
    Tracer("C-11 carbon monoxide", "[11C]carbon monoxide", nuclides=_C11,
           codes=(("SCT", "129515006"), ("SRT", "C-B1045")), variant_of=("O-15 carbon monoxide",)),
    Tracer("O-15 carbon dioxide", "[15O]carbon dioxide", nuclides=("O-15",), synonyms=("carbon dioxide", "CO2"),
           codes=(("SCT", "129507008"), ("SRT", "C-B103B"))),
    Tracer("O-15 butanol", "[15O]butanol", nuclides=("O-15",), synonyms=("butanol",),
           codes=(("SCT", "422540000"), ("SRT", "C-B07DC"))),
    # ---- immuno-PET: antibodies and other labelled biologics
    _family("antibody", "radiolabelled antibodies and biologics (immuno-PET)",
            ("monoclonal antibody", "antibody", "mAb", "immunoPET", "immuno-PET")),
    Tracer(
        "Zr-89 antibody", "89Zr-labelled antibodies, fragments and biologics (CID 4021 lists ~50)", "antibody",
        ("Zr-89",),
        ("trastuzumab", "bevacizumab", "cetuximab", "panitumumab", "rituximab", "girentuximab", "J591",
         "huJ591", "fresolimumab", "brentuximab", "nanocolloidal albumin"),
        tuple(("DCM", str(v)) for v in (
            *range(126511, 126520 + 1),  # "Monoclonal Antibody ^89^Zr", trastuzumab, cetuximab ... Df-CD45
            *range(126721, 126742 + 1),  # obinituzimab, benralizumab ... ranibizumab ^89^Zr
            *range(126746, 126756 + 1),  # cMAb U36 ... nanocolloidal albumin, anti-B220, RO5323441, RO542908
            *range(126760, 126763 + 1),  # Df-FK, Df-FK-PEG(3), Df-[FK](2), Df-[FK](2)-3PEG(4) ^89^Zr
        )),
    ),
    Tracer("Cu-64 antibody", "64Cu-labelled antibodies", "antibody", _CU64, (), (("DCM", "126510"),),
           variant_of=("Zr-89 antibody",)),
    Tracer("I-124 antibody", "124I-labelled antibodies", "antibody", ("I-124",), (),
           (("SCT", "423249007"), ("SRT", "C-114AA")), variant_of=("Zr-89 antibody",)),
    # ---- sources seen in PET headers (QC and calibration scans)
    Tracer("Ge-68", "68Ge/68Ga calibration source", nuclides=("Ge-68",), synonyms=("germanium",),
           codes=(("SCT", "53315004"), ("SRT", "C-128A2")), nuclide_only=True),
    Tracer("Na-22", "22Na point source", nuclides=("Na-22",),
           codes=(("SCT", "71633006"), ("SRT", "C-155A1")), nuclide_only=True),
)

# Coding schemes as seen in the wild, mapped onto the ones used in the table. SNM3 (SNOMED v3) codes use the
# same values as SRT ("C-B1031"); some exporters write "SNOMED" or "SNOMED-CT" for SCT. 99SDM (the old SNOMED
# DICOM Microglossary) shares the SRT values for nuclides ("C-111A1") and has a few codes of its own.
_SCHEME_ALIASES = {
    "SRT": "SRT", "SNM3": "SRT", "SNOMED-RT": "SRT", "99SDM": "99SDM",
    "SCT": "SCT", "SNOMED": "SCT", "SNOMED-CT": "SCT", "SNOMEDCT": "SCT", "SNOMED CT": "SCT",
    "DCM": "DCM", "NCIT": "NCIt", "NCI": "NCIt", "UMLS": "UMLS",
}


# --------------------------------------------------------------------------------------------------------------
# Text normalisation

_GREEK = {"α": "alpha", "β": "beta", "γ": "gamma"}
_WORD_RE = re.compile(r"[a-z]+|[0-9]+")


# Words that name no agent: "Rubidium-82 chloride injection" leaves only these once the nuclide is taken out.
_GENERIC_WORDS = frozenset({"chloride", "injection", "inj", "usp", "generator", "eluate", "elution", "pet"})


@dataclass(frozen=True)
class _Tokens:
    words: tuple[str, ...]  # agent tokens, nuclide mentions removed
    nuclides: tuple[str, ...]  # nuclides mentioned, in order


def _tokenise(text: str) -> _Tokens:
    """Split ``text`` into lower-case word and number tokens and pull out nuclide mentions.

    "68Ga-PSMA-11" -> words (psma, 11), nuclides (Ga-68); "Fluorodeoxyglucose F^18^" -> (fluorodeoxyglucose),
    (F-18). Letters and digits are split ("FAPI46" -> fapi, 46) and numbers lose leading zeros ("FAPI-04" ==
    "FAPI-4"), so spelling variants meet on the same tokens.
    """
    lowered = "".join(_GREEK.get(ch, ch) for ch in unicodedata.normalize("NFKC", text).casefold())
    lowered = unicodedata.normalize("NFKD", lowered).encode("ascii", "ignore").decode("ascii")
    raw: list[str] = []
    for token in _WORD_RE.findall(lowered):
        if token.isdigit():
            raw.append(str(int(token)))
        elif raw and raw[-1].isdigit() and token[0] == "m" and token[1:] in _ELEMENT_WORDS:
            raw += ["m", token[1:]]  # "99mTc" -> 99 m tc
        else:
            raw.append(token)
    words: list[str] = []
    nuclides: list[str] = []
    i = 0
    while i < len(raw):
        found = _nuclide_at(raw, i)
        if found is not None:
            nuclides.append(found[0])
            i += found[1]
            continue
        words.append(raw[i])
        i += 1
    return _Tokens(tuple(words), tuple(nuclides))


def _nuclide_at(raw: Sequence[str], i: int) -> tuple[str, int] | None:
    """The nuclide written at ``raw[i:]`` and how many tokens it takes, or None.

    Accepts symbol or element name before or after the mass, with an optional metastable "m":
    "f 18", "fluorine 18", "18 f", "tc 99 m", "99 m tc".
    """
    def mass_at(j: int) -> tuple[str, int] | None:
        if j >= len(raw) or not raw[j].isdigit():
            return None
        if j + 1 < len(raw) and raw[j + 1] == "m":
            return raw[j] + "m", 2
        return raw[j], 1

    after = mass_at(i + 1)  # symbol first
    if after is not None:
        for mass, used in ((after[0], after[1]), (after[0].rstrip("m"), 1)):
            name = _NUCLIDE_BY_PAIR.get((raw[i], mass))
            if name is not None:
                return name, 1 + used
    before = mass_at(i)  # mass first
    if before is not None and i + before[1] < len(raw):
        name = _NUCLIDE_BY_PAIR.get((raw[i + before[1]], before[0]))
        if name is not None:
            return name, before[1] + 1
    return None


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


@dataclass(frozen=True)
class _Index:
    by_name: dict[str, Tracer]
    by_code: dict[tuple[str, str], str]
    phrases: tuple[tuple[tuple[str, ...], str], ...]  # (tokens, tracer name), longest first
    display: tuple[str, ...]  # every name and synonym as written, for did-you-mean
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _index() -> _Index:
    by_name: dict[str, Tracer] = {}
    by_code: dict[tuple[str, str], str] = {}
    phrases: dict[tuple[str, ...], str] = {}
    display: list[str] = []
    members: dict[str, list[str]] = {}
    for tracer in TRACERS:
        key = tracer.name.lower()
        if key in by_name:
            raise AssertionError(f"tracer table: duplicate name {tracer.name!r}")
        by_name[key] = tracer
        if tracer.family:
            members.setdefault(tracer.family, []).append(tracer.name)
        for code in tracer.codes:
            if code in by_code:
                raise AssertionError(f"tracer table: code {code} used by {by_code[code]!r} and {tracer.name!r}")
            by_code[code] = tracer.name
        for text in (tracer.name, *tracer.synonyms):
            display.append(text)
            words = _tokenise(text).words
            if not words:
                continue  # "Rb-82", "Ge-68": only a nuclide; handled by ``nuclide_only``
            owner = phrases.setdefault(words, tracer.name)
            if owner != tracer.name:
                # A name that differs from a relative's only by its nuclide ("Cu-64 DOTATATE", "C-11 choline")
                # is reached through ``_with_nuclide``; any other clash is a bug in the table.
                if text == tracer.name and (owner == tracer.family or owner in tracer.variant_of):
                    continue
                raise AssertionError(f"tracer table: {text!r} of {tracer.name!r} already means {owner!r}")
    for tracer in TRACERS:
        for ref in (tracer.family, *tracer.variant_of):
            if ref is not None and ref.lower() not in by_name:
                raise AssertionError(f"tracer table: {tracer.name!r} refers to unknown {ref!r}")
    ordered = tuple(sorted(phrases.items(), key=lambda item: (-len(item[0]), -len("".join(item[0])))))
    return _Index(by_name, by_code, ordered, tuple(display), {k: tuple(v) for k, v in members.items()})


def _tracer(name: str) -> Tracer:
    return _index().by_name[name.lower()]


# --------------------------------------------------------------------------------------------------------------
# Resolution


def tracer_family(name: str) -> str | None:
    """Return the family of canonical tracer ``name`` (the name itself for a family), or None if it has none."""
    tracer = _index().by_name.get(name.lower())
    if tracer is None:
        return None
    return tracer.name if tracer.is_family else tracer.family


def tracer_matches(wanted: str, found: str | None) -> bool:
    """True when identified tracer ``found`` satisfies a rule asking for canonical ``wanted``.

    An agent satisfies its own name and its family's; a family (header said only "PSMA") satisfies the family
    only, because the agent is unknown.
    """
    if found is None:
        return False
    if wanted.lower() == found.lower():
        return True
    family = tracer_family(found)
    return family is not None and family.lower() == wanted.lower()


def _family_has_nuclide(family: str, nuclide: str) -> bool:
    return any(nuclide in _tracer(m).nuclides for m in _index().members.get(family, ()))


def _with_nuclide(name: str, nuclide: str | None) -> str | None:
    """Refine or check a tracer identified from a name or code against the nuclide the header names.

    A family narrows to its only member made with that nuclide ("choline" + C-11 -> "C-11 choline"); an agent
    made with another nuclide becomes its declared variant ("DOTATATE" + Cu-64 -> "Cu-64 DOTATATE"), else its
    family when the family has agents with that nuclide, else None (the header contradicts itself).
    """
    tracer = _tracer(name)
    if nuclide is None:
        return tracer.name
    if tracer.is_family:
        candidates = [m for m in _index().members.get(tracer.name, ()) if nuclide in _tracer(m).nuclides]
        return candidates[0] if len(candidates) == 1 else tracer.name
    if not tracer.nuclides or nuclide in tracer.nuclides:
        return tracer.name
    for other in TRACERS:
        if tracer.name in other.variant_of and nuclide in other.nuclides:
            return other.name
    if tracer.family is not None and _family_has_nuclide(tracer.family, nuclide):
        return tracer.family
    return None


def _common_family(names: Iterable[str]) -> str | None:
    families = {tracer_family(n) for n in names}
    return families.pop() if len(families) == 1 else None


def _from_tokens(tokens: _Tokens, nuclide: str | None) -> tuple[str | None, str | None]:
    """Identify the tracer in tokenised text: the longest known phrase wins; equally long rivals must agree.

    Returns (name, problem): ``(None, None)`` when nothing in the text is known, ``(None, why)`` when what is
    known contradicts the nuclide or names unrelated tracers.
    """
    best: list[str] = []
    best_len = 0
    for phrase, name in _index().phrases:
        if len(phrase) < best_len:
            break
        if _contains(tokens.words, phrase):
            best.append(name)
            best_len = len(phrase)
    if not best:
        if nuclide is not None and set(tokens.words) <= _GENERIC_WORDS:
            for tracer in TRACERS:
                if tracer.nuclide_only and nuclide in tracer.nuclides:
                    return tracer.name, None
        return None, None
    resolved = {r for r in (_with_nuclide(n, nuclide) for n in best) if r is not None}
    if len(resolved) == 1:
        return resolved.pop(), None
    common = _common_family(resolved) if resolved else None
    if common is not None:
        return common, None
    if not resolved:
        return None, f"names {' and '.join(best)}, which is not made with {nuclide}"
    return None, f"names unrelated tracers {' and '.join(sorted(resolved))}"


def canonical_tracer_name(text: str) -> str | None:
    """Return the canonical tracer or family name for ``text`` (a name, synonym or header string), else None.

    Examples: "fdg" -> "FDG", "Ga-68 PSMA-11" -> "PSMA-11", "Pylarify" -> "DCFPyL", "psma" -> "PSMA",
    "11C-choline" -> "C-11 choline", "Rb-82" -> "Rb-82".
    """
    if not isinstance(text, str) or not text.strip():
        return None
    exact = _index().by_name.get(text.strip().lower())
    if exact is not None:
        return exact.name
    tokens = _tokenise(text)
    nuclides = set(tokens.nuclides)
    return _from_tokens(tokens, tokens.nuclides[0] if len(nuclides) == 1 else None)[0]


def known_tracer_names() -> list[str]:
    """Every canonical tracer and family name, in table order."""
    return [t.name for t in TRACERS]


def suggest_tracer(text: str) -> str | None:
    """The known name or synonym closest to ``text`` (for "did you mean"), or None."""
    import difflib

    display = _index().display
    by_lower = {d.lower(): d for d in display}
    close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


# --------------------------------------------------------------------------------------------------------------
# From a dataset


@dataclass(frozen=True)
class TracerIdentification:
    """The outcome of ``identify_tracer``: the canonical name (or None), the nuclide, and why, in words."""

    name: str | None
    nuclide: str | None
    source: str  # which attribute(s) decided, quoting the values
    problem: str | None = None  # why ``name`` is None

    def describe(self) -> str:
        """One line for ``petnode rules test``, e.g. "FDG (F-18; from Radiopharmaceutical 'FDG')"."""
        if self.name is None:
            return f"not recognised ({self.problem})"
        nuclide = f"{self.nuclide}; " if self.nuclide else ""
        family = tracer_family(self.name)
        kind = " (family; agent unknown)" if family == self.name and _tracer(self.name).is_family else ""
        return f"{self.name}{kind} ({nuclide}from {self.source})"


def _text(item: Dataset, keyword: str) -> str:
    value = item.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _code(item: Dataset) -> tuple[str, str, str] | None:
    """(scheme, value, meaning) of a code item; value from CodeValue, LongCodeValue or URNCodeValue."""
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
    if not value and not _text(item, "CodeMeaning"):
        return None
    scheme = _text(item, "CodingSchemeDesignator")
    return _SCHEME_ALIASES.get(scheme.upper(), scheme), value, _text(item, "CodeMeaning")


def _lookup_code(table: dict[tuple[str, str], str], scheme: str, value: str) -> str | None:
    if not value:
        return None
    for candidate in (scheme, "SRT") if scheme == "99SDM" else (scheme,):
        if (candidate, value) in table:
            return table[(candidate, value)]
    # Unknown or missing designator: accept the value when it is unambiguous across schemes (SRT "C-B1031"
    # and SCT "35321007" cannot collide; DCM 126xxx and short SCT values could in principle).
    hits = {name for (_, v), name in table.items() if v == value}
    return hits.pop() if len(hits) == 1 and scheme not in _SCHEME_ALIASES.values() else None


def _nuclide_of(info: Dataset, texts: Sequence[str]) -> tuple[str | None, str]:
    """The nuclide and where it came from: code, code meaning, text, then half-life."""
    item = _first_item(info, "RadionuclideCodeSequence")
    code = _code(item) if item is not None else None
    if code is not None:
        scheme, value, meaning = code
        name = _lookup_code(_NUCLIDE_BY_CODE, scheme, value)
        if name is not None:
            return name, f"RadionuclideCodeSequence {scheme} {value}"
        found = set(_tokenise(meaning).nuclides)
        if len(found) == 1:
            return found.pop(), f"RadionuclideCodeSequence meaning {meaning!r}"
    for text in texts:
        found = set(_tokenise(text).nuclides)
        if len(found) == 1:
            return found.pop(), f"{text!r}"
    half_life = info.get("RadionuclideHalfLife")
    try:
        name = nuclide_from_half_life(float(half_life)) if half_life not in (None, "") else None
    except (TypeError, ValueError):
        name = None
    if name is not None:
        return name, f"RadionuclideHalfLife {float(half_life):g} s"
    return None, ""


def identify_tracer(ds: Dataset) -> TracerIdentification:
    """Identify the tracer of ``ds`` from its Radiopharmaceutical Information Sequence (first item).

    The coded radiopharmaceutical is tried first (code value, then code meaning), then the free text, then the
    nuclide alone (Rb-82). When code and text name different tracers outside one family the result is None:
    consoles sometimes keep a default code (often FDG) while the technologist types the real tracer, and
    guessing would route a series to the wrong denoiser.
    """
    info = _first_item(ds, "RadiopharmaceuticalInformationSequence")
    if info is None:
        return TracerIdentification(None, None, "", "no RadiopharmaceuticalInformationSequence")
    text = _text(info, "Radiopharmaceutical")
    code_item = _first_item(info, "RadiopharmaceuticalCodeSequence")
    code = _code(code_item) if code_item is not None else None
    nuclide, nuclide_source = _nuclide_of(info, [t for t in (text, code[2] if code else "") if t])

    # What the code says, then what the text says: (name, problem, where).
    said: list[tuple[str | None, str | None, str]] = []
    if code is not None:
        scheme, value, meaning = code
        hit = _lookup_code(_index().by_code, scheme, value)
        where = f"RadiopharmaceuticalCodeSequence {scheme} {value}" + (f" {meaning!r}" if meaning else "")
        if hit is not None:
            name = _with_nuclide(hit, nuclide)
            problem = None if name else f"names {hit}, which is not made with {nuclide} (from {nuclide_source})"
            said.append((name, problem, where))
        elif meaning:
            said.append((*_from_tokens(_tokenise(meaning), nuclide), where))
    if text:
        said.append((*_from_tokens(_tokenise(text), nuclide), f"Radiopharmaceutical {text!r}"))

    problems = [f"{where} {problem}" for _, problem, where in said if problem]
    found = [(name, where) for name, _, where in said if name]
    if problems:
        return TracerIdentification(None, nuclide, "; ".join(w for _, _, w in said), "; ".join(problems))
    if len(found) == 2:
        (first, first_where), (second, second_where) = found
        if first == second:
            return TracerIdentification(first, nuclide, f"{first_where} and {second_where}")
        # One may be the family of the other: keep the more specific.
        if tracer_family(second) == first:
            return TracerIdentification(second, nuclide, second_where)
        if tracer_family(first) == second:
            return TracerIdentification(first, nuclide, first_where)
        problem = f"{first_where} says {first} but {second_where} says {second}"
        logger.debug("tracer conflict: %s", problem)
        return TracerIdentification(None, nuclide, f"{first_where}; {second_where}", problem)
    if found:
        return TracerIdentification(found[0][0], nuclide, found[0][1])
    if nuclide is not None and not text and code is None:
        # Nothing names the agent; only for Rb-82 (and calibration sources) does the nuclide say it all.
        for tracer in TRACERS:
            if tracer.nuclide_only and nuclide in tracer.nuclides:
                return TracerIdentification(tracer.name, nuclide, f"nuclide only ({nuclide_source})")
    seen = "; ".join(where for _, _, where in said)
    if code is not None and not said:
        seen = f"RadiopharmaceuticalCodeSequence {code[0]} {code[1]}"
    problem = f"not in the tracer table: {seen}" if seen else "no Radiopharmaceutical text or code"
    if nuclide is not None and not seen:
        problem += f" (nuclide {nuclide} from {nuclide_source} does not identify the agent)"
    return TracerIdentification(None, nuclide, seen, problem)


def canonical_tracer(ds: Dataset) -> str | None:
    """Return the canonical tracer (agent or family) name of dataset ``ds``, or None when unknown or ambiguous."""
    return identify_tracer(ds).name

