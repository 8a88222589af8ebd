"""Routing rules: loading and its error messages, every operator and helper, ordering, loop guard, explain."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.errors import ConfigError
from dicom_node.rules import (
    Address,
    Condition,
    MatchContext,
    PeerRef,
    ReturnToSender,
    Rule,
    RuleSet,
    attribute_values,
    explain,
    format_explanations,
    is_own_output,
    load_rules,
    parse_attribute,
    parse_rules,
    select_rule,
    used_attributes,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "rules.yaml"


def _header(**attrs: Any) -> Dataset:
    """A PET instance header as the rules see it (no pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "Discovery ST"
    ds.StationName = "PETCT1"
    ds.SeriesDescription = "PET WB AC"
    ds.CorrectedImage = ["ATTN", "DECY"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SliceThickness = "3.27"
    ds.PixelSpacing = ["4.0", "4.0"]
    ds.NumberOfSlices = 47
    ds.PatientWeight = "75.0"
    info = Dataset()
    info.Radiopharmaceutical = "Fluorodeoxyglucose"
    info.RadionuclideTotalDose = "370000000"
    info.RadionuclideHalfLife = "6586.2"
    code = Dataset()
    code.CodeValue = "C-B1031"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Fluorodeoxyglucose F^18^"
    info.RadiopharmaceuticalCodeSequence = Sequence([code])
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _ctx(ds: Dataset | None = None, calling: str | None = "PETCT1", called: str | None = "PETNODE") -> MatchContext:
    return MatchContext(ds if ds is not None else _header(), calling, called)


def _rule(name: str = "r", **fields: Any) -> dict[str, Any]:
    return {"name": name, "denoiser": {"name": "gaussian"}, "destinations": ["return_to_sender"], **fields}


def _rules(*rules: dict[str, Any], peer_names: Any = ()) -> RuleSet:
    return parse_rules({"rules": list(rules)}, peer_names=peer_names)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _load_error(tmp_path: Path, text: str, **kwargs: Any) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# The shipped file


def test_shipped_rules_route_fdg_to_the_shipped_networks_and_other_pet_to_gaussian() -> None:
    ruleset = load_rules(SHIPPED)
    enabled = [r for r in ruleset.rules if not r.disabled]
    assert [r.name for r in enabled] == ["fdg-brain-cnn", "fdg-brain-cnn-body-part", "fdg-whole-body-cnn",
                                         "pet-gaussian"]
    wb = select_rule(ruleset, _ctx())  # FDG, "PET WB AC"
    assert wb is not None and wb.name == "fdg-whole-body-cnn"
    assert wb.denoiser.name == "cnn" and wb.denoiser.model == "fdg-wb-fo" and wb.denoiser.params["resample"]
    assert wb.destinations == (ReturnToSender(),) and wb.non_quantitative == "process"
    brain = select_rule(ruleset, _ctx(_header(SeriesDescription="Brain FDG 3D")))
    assert brain is not None and brain.name == "fdg-brain-cnn" and brain.denoiser.model == "fdg-brain-fo"
    by_part = select_rule(ruleset, _ctx(_header(SeriesDescription="PET AC", BodyPartExamined="HEAD")))
    assert by_part is not None and by_part.name == "fdg-brain-cnn-body-part"
    assert by_part.denoiser.model == "fdg-brain-fo"
    # the brain rules keep the input's regional means, tissue by tissue above 20 mm (within 2 % from 3 M down to
    # 0.1 M counts per slice) at every count level; the whole-body rule above 12 mm, tapered off for series noisier
    # than a noise index of about 0.2 (at ultra-low counts it gave back too much noise)
    assert brain.denoiser.params["keep_means_fwhm_mm"] == by_part.denoiser.params["keep_means_fwhm_mm"] == 20.0
    assert brain.denoiser.params["keep_means_guided"] is by_part.denoiser.params["keep_means_guided"] is True
    assert "keep_means_max_noise" not in brain.denoiser.params
    assert wb.denoiser.params["keep_means_fwhm_mm"] == 12.0 and wb.denoiser.params["keep_means_guided"] is True
    assert wb.denoiser.params["keep_means_max_noise"] == 0.2
    psma = _header()
    psma.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Ga-68 PSMA-11"
    del psma.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence
    rule = select_rule(ruleset, _ctx(psma))
    assert rule is not None and rule.name == "pet-gaussian"  # Gaussian stays for other tracers
    assert rule.denoiser.name == "gaussian"
    assert rule.denoiser.params["fwhm_mm"] == 4.0
    assert rule.destinations == (ReturnToSender(),)
    assert rule.non_quantitative == "process"
    assert select_rule(ruleset, _ctx(_header(Modality="CT"))) is None


def test_shipped_examples_are_valid_when_uncommented(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    head, marker, examples = text.partition("  # # ----")
    assert marker, "the examples block marker moved"
    uncommented = re.sub(r"(?m)^  # ", "  ", marker + examples)
    ruleset = load_rules(_write(tmp_path, head + uncommented), peer_names={"pacs"})
    by_name = {r.name: r for r in ruleset.rules}
    assert set(by_name) == {"fdg-brain-cnn", "fdg-brain-cnn-body-part", "fdg-whole-body-cnn", "pet-gaussian",
                            "psma-sstr-ge", "research-fdg", "catch-all", "pet-to-pacs",
                            "drop-scouts", "forward-rest", "pet-mr-brain-cdip", "fdg-research-bcdpm"}
    assert by_name["research-fdg"].disabled
    assert by_name["fdg-research-bcdpm"].denoiser.name == "bcdpm"
    assert by_name["fdg-research-bcdpm"].denoiser.model == "fdg-bcdpm"
    assert by_name["catch-all"].fallback
    # Every key of a rule and of match appears in the examples.
    used = set().union(*(r.model_fields_set for r in ruleset.rules))
    assert used >= set(Rule.model_fields)
    assert by_name["psma-sstr-ge"].match.model_fields_set == set(type(by_name["psma-sstr-ge"].match).model_fields)
    operators = {c.operator for r in ruleset.rules for c in r.match.conditions}
    assert operators >= {"equals", "in", "gt", "ge", "lt", "not_in", "exists", "regex"}


def test_shipped_examples_route_as_documented(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    head, marker, examples = text.partition("  # # ----")
    ruleset = load_rules(_write(tmp_path, head + re.sub(r"(?m)^  # ", "  ", marker + examples)),
                         peer_names={"pacs"})
    psma = _header(
        ManufacturerModelName="Discovery MI", SeriesDescription="PSMA Whole Body", DecayCorrection="START",
    )
    psma.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Ga-68 PSMA-11"
    del psma.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence
    assert select_rule(ruleset, _ctx(psma)).name == "psma-sstr-ge"  # type: ignore[union-attr]
    fdg = select_rule(ruleset, _ctx())
    assert fdg is not None and fdg.name == "pet-to-pacs" and fdg.action == "process and forward"
    assert fdg.destinations[0].payloads(True) == ("original", "derived", "maps")
    assert fdg.destinations[1].payloads(True) == ("derived",) and fdg.hold_study
    flt = _header()
    flt.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "FLT"
    del flt.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence
    assert select_rule(ruleset, _ctx(flt)).name == "pet-gaussian"  # type: ignore[union-attr]
    assert select_rule(ruleset, _ctx(_header(Modality="NM"))).name == "catch-all"  # type: ignore[union-attr]
    ct = select_rule(ruleset, _ctx(_header(Modality="CT")))
    assert ct is not None and ct.name == "forward-rest" and ct.action == "forward" and ct.forward == "on_receipt"
    scout = select_rule(ruleset, _ctx(_header(Modality="CT", SeriesDescription="Topogram 0.6 T20s")))
    assert scout is not None and scout.name == "drop-scouts" and scout.action == "drop"


# ---------------------------------------------------------------------------------------------------------------
# Conditions: every operator


@pytest.mark.parametrize(
    ("condition", "attrs", "expected"),
    [
        ({"attribute": "Units", "equals": "BQML"}, {}, True),
        ({"attribute": "Units", "equals": "BQML"}, {"Units": "CNTS"}, False),
        ({"attribute": "Units", "equals": "bqml"}, {}, False),  # text is case-sensitive; use regex (?i)
        ({"attribute": "CorrectedImage", "equals": "ATTN\\DECY"}, {}, True),  # the whole multi-value
        ({"attribute": "CorrectedImage", "equals": "ATTN"}, {}, False),
        ({"attribute": "NumberOfSlices", "equals": 47}, {}, True),  # numeric
        ({"attribute": "SliceThickness", "equals": 3.27}, {}, True),
        ({"attribute": "SliceThickness", "equals": "3.27"}, {}, True),
        ({"attribute": "SeriesDescription", "regex": "(?i)wb"}, {}, True),
        ({"attribute": "SeriesDescription", "regex": "^WB"}, {}, False),
        ({"attribute": "ImageType", "regex": "^ORIGINAL\\\\PRIMARY$"}, {}, True),
        ({"attribute": "SliceThickness", "gt": 2.0}, {}, True),
        ({"attribute": "SliceThickness", "gt": 3.27}, {}, False),
        ({"attribute": "SliceThickness", "ge": 3.27}, {}, True),
        ({"attribute": "SliceThickness", "lt": 3.27}, {}, False),
        ({"attribute": "SliceThickness", "le": 3.27}, {}, True),
        ({"attribute": "SliceThickness", "eq": 3.27}, {}, True),
        ({"attribute": "SliceThickness", "ne": 3.27}, {}, False),
        ({"attribute": "SliceThickness", "ne": 2}, {}, True),
        ({"attribute": "PixelSpacing", "ge": 4.0}, {}, True),  # every value must pass
        ({"attribute": "PixelSpacing", "gt": 3.0}, {"PixelSpacing": ["4.0", "2.0"]}, False),
        ({"attribute": "Units", "gt": 1}, {}, False),  # not a number
        ({"attribute": "CorrectedImage", "in": ["ATTN"]}, {}, True),  # any value in the list
        ({"attribute": "CorrectedImage", "in": ["SCAT", "RAN"]}, {}, False),
        ({"attribute": "Units", "in": "BQML"}, {}, True),  # a single item is a list of one
        ({"attribute": "NumberOfSlices", "in": [47, 48]}, {}, True),
        ({"attribute": "CorrectedImage", "not_in": ["SCAT"]}, {}, True),
        ({"attribute": "CorrectedImage", "not_in": ["DECY"]}, {}, False),  # no value may be in the list
        ({"attribute": "StationName", "not_in": ["RESEARCH"]}, {}, True),
        ({"attribute": "PatientWeight", "exists": True}, {}, True),
        ({"attribute": "PatientWeight", "exists": True}, {"PatientWeight": None}, False),
        ({"attribute": "PatientWeight", "exists": True}, {"PatientWeight": ""}, False),  # empty == absent
        ({"attribute": "PatientWeight", "exists": False}, {"PatientWeight": None}, True),
        ({"attribute": "PatientWeight", "exists": False}, {}, False),
        # An absent attribute fails every other operator, not_in and ne included.
        ({"attribute": "DecayCorrection", "equals": "START"}, {}, False),
        ({"attribute": "DecayCorrection", "not_in": ["NONE"]}, {}, False),
        ({"attribute": "DecayCorrection", "regex": ".*"}, {}, False),
        ({"attribute": "PatientWeight", "ne": 1}, {"PatientWeight": None}, False),
        # Tags and dotted paths.
        ({"attribute": "0054,1001", "equals": "BQML"}, {}, True),
        ({"attribute": "(0054,1001)", "equals": "BQML"}, {}, True),
        ({"attribute": "RadiopharmaceuticalInformationSequence.RadionuclideTotalDose", "lt": 5e8}, {}, True),
        ({"attribute": "RadiopharmaceuticalInformationSequence.RadiopharmaceuticalCodeSequence.CodeValue",
          "equals": "C-B1031"}, {}, True),
        ({"attribute": "0054,0016.0018,1074", "gt": 1e8}, {}, True),
        ({"attribute": "RadiopharmaceuticalInformationSequence", "exists": True}, {}, True),
        ({"attribute": "RadiopharmaceuticalInformationSequence", "exists": True},
         {"RadiopharmaceuticalInformationSequence": Sequence([])}, False),
        ({"attribute": "RadiopharmaceuticalInformationSequence.RadionuclideTotalDose", "exists": True},
         {"RadiopharmaceuticalInformationSequence": Sequence([])}, False),
    ],
)
def test_condition_operators(condition: dict[str, Any], attrs: dict[str, Any], expected: bool) -> None:
    cond = Condition.model_validate(condition)
    ok, found = cond.evaluate(_header(**attrs))
    assert ok is expected, found
    ruleset = _rules(_rule(match={"conditions": [condition]}))
    assert (select_rule(ruleset, _ctx(_header(**attrs))) is not None) is expected


def test_private_tag_condition() -> None:
    ds = _header()
    ds.add_new(0x00091001, "LO", "GEMS_PETD_01")
    assert Condition(attribute="0009,1001", regex="^GEMS").evaluate(ds)[0]
    assert not Condition(attribute="0009,1002", exists=True).evaluate(ds)[0]


def test_condition_needs_exactly_one_operator() -> None:
    with pytest.raises(ValidationError, match="exactly one operator"):
        Condition(attribute="Units")
    with pytest.raises(ValidationError, match="found equals, regex"):
        Condition(attribute="Units", equals="BQML", regex="B")
    with pytest.raises(ValidationError, match="only 'exists' applies"):
        Condition(attribute="RadiopharmaceuticalInformationSequence", equals="x")


def test_parse_attribute_forms() -> None:
    assert parse_attribute("Units") == parse_attribute("0054,1001") == parse_attribute("(0054, 1001)")
    assert len(parse_attribute("RadiopharmaceuticalInformationSequence.RadionuclideTotalDose")) == 2
    with pytest.raises(ValueError, match="did you mean 'Units'"):
        parse_attribute("Unit")
    with pytest.raises(ValueError, match="not a sequence"):
        parse_attribute("Units.CodeValue")


# ---------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    ("match", "ctx_kwargs", "expected"),
    [
        ({"modality": "PT"}, {}, True),
        ({"modality": ["pt"]}, {}, True),  # codes are upper-cased at load
        ({"modality": ["CT", "MR"]}, {}, False),
        ({"tracer": "FDG"}, {}, True),
        ({"tracer": ["fluorodeoxyglucose"]}, {}, True),  # synonyms in the rule are fine too
        ({"tracer": ["PSMA", "SSTR"]}, {}, False),
        ({"scanner": {"manufacturer": "(?i)^ge"}}, {}, True),
        ({"scanner": {"manufacturer": "^Siemens"}}, {}, False),
        ({"scanner": {"model": "Discovery"}}, {}, True),
        ({"scanner": {"model": "Discovery", "station": "^PETCT2$"}}, {}, False),  # all given must match
        ({"scanner": {"station": "^PETCT1$"}}, {}, True),
        ({"calling_ae": "PETCT1"}, {}, True),
        ({"calling_ae": ["OTHER", "PETCT1"]}, {}, True),
        ({"calling_ae": "petct1"}, {}, False),  # AE titles are case-sensitive
        ({"calling_ae": "PETCT1"}, {"calling": "PETCT1   "}, True),  # padding ignored
        ({"calling_ae": "PETCT1"}, {"calling": None}, False),  # unknown sender
        ({"called_ae": "PETNODE"}, {}, True),
        ({"called_ae": "PETNODE2"}, {}, False),
        ({"series_description": "(?i)\\bwb\\b"}, {}, True),
        ({"series_description": "NAC$"}, {}, False),
        ({}, {}, True),  # no criteria: matches everything
        ({"modality": "PT", "tracer": "FDG", "calling_ae": "PETCT1", "series_description": "AC"}, {}, True),
        ({"modality": "PT", "tracer": "FDG", "calling_ae": "OTHER"}, {}, False),  # AND
    ],
)
def test_match_helpers(match: dict[str, Any], ctx_kwargs: dict[str, Any], expected: bool) -> None:
    ruleset = _rules(_rule(match=match))
    assert (select_rule(ruleset, _ctx(**ctx_kwargs)) is not None) is expected


def test_tracer_family_and_agent_rules() -> None:
    ds = _header()
    info = ds.RadiopharmaceuticalInformationSequence[0]
    del info.RadiopharmaceuticalCodeSequence
    info.Radiopharmaceutical = "68Ga-PSMA-11"
    assert select_rule(_rules(_rule(match={"tracer": "PSMA"})), _ctx(ds)) is not None
    assert select_rule(_rules(_rule(match={"tracer": "PSMA-11"})), _ctx(ds)) is not None
    assert select_rule(_rules(_rule(match={"tracer": "DCFPyL"})), _ctx(ds)) is None
    info.Radiopharmaceutical = "Ga-68 PSMA"  # family only: agent rules cannot be satisfied
    assert select_rule(_rules(_rule(match={"tracer": "PSMA"})), _ctx(ds)) is not None
    assert select_rule(_rules(_rule(match={"tracer": "PSMA-11"})), _ctx(ds)) is None


def test_missing_helper_attributes_fail() -> None:
    ds = _header(Manufacturer=None, SeriesDescription=None, Modality=None)
    assert select_rule(_rules(_rule(match={"scanner": {"manufacturer": ".*"}})), _ctx(ds)) is None
    assert select_rule(_rules(_rule(match={"series_description": ".*"})), _ctx(ds)) is None
    assert select_rule(_rules(_rule(match={"modality": "PT"})), _ctx(ds)) is None
    ds = _header(RadiopharmaceuticalInformationSequence=None)
    assert select_rule(_rules(_rule(match={"tracer": "FDG"})), _ctx(ds)) is None


# ---------------------------------------------------------------------------------------------------------------
# Ordering, fallback, disabled, loop guard


def test_priority_then_file_order() -> None:
    ruleset = _rules(
        _rule("late", priority=200),
        _rule("first-of-100", priority=100),
        _rule("second-of-100", priority=100),
        _rule("early", priority=-5, match={"modality": "CT"}),
    )
    assert [r.name for r in ruleset.ordered()] == ["early", "first-of-100", "second-of-100", "late"]
    assert select_rule(ruleset, _ctx()).name == "first-of-100"  # type: ignore[union-attr]
    assert select_rule(ruleset, _ctx(_header(Modality="CT"))).name == "early"  # type: ignore[union-attr]


def test_fallback_only_when_no_normal_rule_matched() -> None:
    ruleset = _rules(
        _rule("catch-all", fallback=True, priority=0),  # a low priority does not put a fallback first
        _rule("fdg", match={"tracer": "FDG"}),
    )
    assert select_rule(ruleset, _ctx()).name == "fdg"  # type: ignore[union-attr]
    other = _header()
    other.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Florbetapir"
    del other.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence
    assert select_rule(ruleset, _ctx(other)).name == "catch-all"  # type: ignore[union-attr]


def test_fallbacks_have_criteria_and_order_too() -> None:
    ruleset = _rules(
        _rule("pet-fallback", fallback=True, priority=20, match={"modality": "PT"}),
        _rule("nm-fallback", fallback=True, priority=10, match={"modality": "NM"}),
        _rule("never", match={"modality": "MR"}),
    )
    assert select_rule(ruleset, _ctx()).name == "pet-fallback"  # type: ignore[union-attr]
    assert select_rule(ruleset, _ctx(_header(Modality="NM"))).name == "nm-fallback"  # type: ignore[union-attr]
    assert select_rule(ruleset, _ctx(_header(Modality="CT"))) is None


def test_disabled_rules_are_skipped() -> None:
    ruleset = _rules(_rule("off", disabled=True, priority=1), _rule("on"))
    assert select_rule(ruleset, _ctx()).name == "on"  # type: ignore[union-attr]
    assert select_rule(_rules(_rule("off", disabled=True)), _ctx()) is None
    assert select_rule(_rules(_rule("off", disabled=True, fallback=True)), _ctx()) is None


def _own_output() -> Dataset:
    ds = _header(ImageType=["DERIVED", "SECONDARY"], SeriesDescription="PET WB AC [petnode]")
    item = Dataset()
    item.Manufacturer = "petnode"
    item.ManufacturerModelName = "gaussian"
    scanner = Dataset()
    scanner.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ContributingEquipmentSequence = Sequence([scanner, item])
    return ds


def test_loop_guard_never_routes_our_own_output() -> None:
    ds = _own_output()
    assert is_own_output(ds)
    assert not is_own_output(_header())
    ruleset = _rules(_rule("everything"), _rule("fallback", fallback=True))
    assert select_rule(ruleset, _ctx(ds)) is None
    explanations = explain(ruleset, _ctx(ds))
    assert [e.matched for e in explanations] == [False, False]
    assert all("petnode's own output" in e.reasons[0] for e in explanations)
    assert "No rule applies" in format_explanations(explanations)
    # Other equipment in the sequence does not trigger it.
    other = _header()
    item = Dataset()
    item.Manufacturer = "Some Other AI"
    other.ContributingEquipmentSequence = Sequence([item])
    assert not is_own_output(other)
    assert select_rule(ruleset, _ctx(other)) is not None


# ---------------------------------------------------------------------------------------------------------------
# explain


def test_explain_reasons_and_verdicts() -> None:
    ruleset = _rules(
        _rule("psma", priority=10, match={"modality": "PT", "tracer": "PSMA", "conditions": [
            {"attribute": "Units", "equals": "BQML"}, {"attribute": "DecayCorrection", "exists": True}]}),
        _rule("off", disabled=True, priority=5, match={"modality": "PT"}),
        _rule("pet", priority=50, match={"modality": "PT"}),
        _rule("pet-too", priority=60, match={"modality": "PT"}),
        _rule("safety-net", fallback=True),
    )
    explanations = explain(ruleset, _ctx())
    by_name = {e.rule: e for e in explanations}
    assert [e.rule for e in explanations] == ["off", "psma", "pet", "pet-too", "safety-net"]

    psma = by_name["psma"]
    assert not psma.matched and not psma.selected
    assert psma.reasons[0] == "pass: modality: Modality is 'PT' (wanted one of [PT])"
    assert psma.reasons[1].startswith("FAIL: tracer: tracer is FDG")
    assert "wanted one of [PSMA]" in psma.reasons[1]
    # Every criterion is reported, not only the first failure.
    assert psma.reasons[2] == "pass: conditions[0]: Units is 'BQML' (wanted equal to 'BQML')"
    assert psma.reasons[3] == "FAIL: conditions[1]: DecayCorrection is <absent> (wanted present)"

    off = by_name["off"]
    assert off.disabled and not off.matched
    assert "disabled" in off.reasons[0] and "would match" in off.reasons[0]

    assert by_name["pet"].matched and by_name["pet"].selected
    assert by_name["pet-too"].matched and not by_name["pet-too"].selected
    assert "rule 'pet' comes first" in by_name["pet-too"].reasons[-1]
    net = by_name["safety-net"]
    assert net.fallback and net.matched and not net.selected
    assert "fallback rule not used: rule 'pet' matched" in net.reasons[-1]

    text = format_explanations(explanations)
    assert text.startswith("Selected rule: pet\n  gaussian(fwhm_mm=4.0")
    assert "rule 'pet' (priority 50): SELECTED" in text
    assert "rule 'off' (priority 5): disabled" in text
    assert "fallback rule 'safety-net' (priority 100): matches, not used" in text
    # explain and select_rule agree.
    assert select_rule(ruleset, _ctx()).name == "pet"  # type: ignore[union-attr]


def test_explain_fallback_selected_and_no_match() -> None:
    ruleset = _rules(_rule("ct-only", match={"modality": "CT"}), _rule("net", fallback=True))
    explanations = explain(ruleset, _ctx())
    assert [(e.rule, e.selected) for e in explanations] == [("ct-only", False), ("net", True)]
    assert format_explanations(explanations).startswith("Selected rule: net (fallback)")
    ruleset = _rules(_rule("ct-only", match={"modality": "CT"}))
    text = format_explanations(explain(ruleset, _ctx()))
    assert text.startswith("No rule applies")
    assert "FAIL: modality: Modality is 'PT' (wanted one of [CT])" in text
    assert format_explanations([]).startswith("No rules are defined")


def test_explain_says_why_an_ae_or_regex_failed() -> None:
    ruleset = _rules(_rule(match={"calling_ae": "SCANNER2", "scanner": {"model": "^Biograph"}}))
    reasons = explain(ruleset, _ctx(calling=None))[0].reasons
    assert "FAIL: scanner.model: ManufacturerModelName is 'Discovery ST' (wanted matching /^Biograph/)" in reasons
    assert "FAIL: calling_ae: calling AE is unknown (wanted one of [SCANNER2])" in reasons


def test_explain_no_criteria() -> None:
    reasons = explain(_rules(_rule()), _ctx())[0].reasons
    assert reasons == ["pass: no match criteria: the rule matches every series"]


# ---------------------------------------------------------------------------------------------------------------
# used_attributes / attribute_values


def test_used_attributes_and_values() -> None:
    ruleset = _rules(
        _rule("a", match={"modality": "PT", "tracer": "FDG", "scanner": {"station": "X"}, "calling_ae": "A"}),
        _rule("b", disabled=True, match={"series_description": "x", "conditions": [
            {"attribute": "0054,1001", "equals": "BQML"},
            {"attribute": "RadiopharmaceuticalInformationSequence.RadionuclideTotalDose", "gt": 1},
            {"attribute": "DecayCorrection", "exists": True}]}),
    )
    names = used_attributes(ruleset)
    assert names[0] == "ContributingEquipmentSequence.Manufacturer"  # the loop guard
    for expected in ("Modality", "StationName", "SeriesDescription", "Units", "DecayCorrection",
                     "RadiopharmaceuticalInformationSequence.Radiopharmaceutical",
                     "RadiopharmaceuticalInformationSequence.RadiopharmaceuticalCodeSequence.CodeValue",
                     "RadiopharmaceuticalInformationSequence.RadionuclideCodeSequence.CodeValue",
                     "RadiopharmaceuticalInformationSequence.RadionuclideTotalDose"):
        assert expected in names
    assert "Manufacturer" not in names  # scanner.manufacturer is not used
    assert len(names) == len(set(names))

    values = attribute_values(_ctx(), ruleset)
    assert values["Modality"] == "'PT'"
    assert values["Units"] == "'BQML'"
    assert values["DecayCorrection"] == "<absent>"
    assert values["ContributingEquipmentSequence.Manufacturer"] == "<absent>"
    assert values["RadiopharmaceuticalInformationSequence.RadionuclideTotalDose"] == "'370000000'"
    assert values["(tracer)"].startswith("FDG (F-18;")
    assert values["(calling AE)"] == "'PETCT1'"
    assert "(called AE)" not in values


def test_attribute_values_show_multivalues_and_sequences() -> None:
    ruleset = _rules(_rule(match={"conditions": [
        {"attribute": "CorrectedImage", "in": ["ATTN"]},
        {"attribute": "RadiopharmaceuticalInformationSequence", "exists": True}]}))
    values = attribute_values(_ctx(), ruleset)
    assert values["CorrectedImage"] == "'ATTN\\DECY'"
    assert values["RadiopharmaceuticalInformationSequence"] == "<sequence, 1 item>"


# ---------------------------------------------------------------------------------------------------------------
# Models


def test_destinations_forms() -> None:
    rule = _rules(_rule(destinations=[
        "return_to_sender", {"peer": "pacs"}, {"ae_title": "WS1", "host": "192.0.2.10", "port": 104},
    ]), peer_names=["pacs"]).rules[0]
    assert rule.destinations == (ReturnToSender(), PeerRef(peer="pacs"),
                                 Address(ae_title="WS1", host="192.0.2.10", port=104))
    assert rule.summary() == (
        "gaussian(fwhm_mm=4.0, fwhm_mm_z=None) -> return_to_sender, peer pacs, WS1@192.0.2.10:104; "
        "non-quantitative series: process"
    )


def test_denoiser_params_are_validated_and_completed() -> None:
    rule = _rules(_rule(denoiser={"name": "gaussian", "params": {"fwhm_mm": 6}})).rules[0]
    assert rule.denoiser.params == {"fwhm_mm": 6.0, "fwhm_mm_z": None}
    assert _rules(_rule(denoiser="gaussian")).rules[0].denoiser.params["fwhm_mm"] == 4.0
    assert _rules(_rule(denoiser={"name": "gaussian", "params": None})).rules[0].denoiser.params["fwhm_mm"] == 4.0


def test_defaults_and_frozen() -> None:
    rule = _rules(_rule()).rules[0]
    assert (rule.priority, rule.disabled, rule.fallback, rule.quiet_period_s) == (100, False, False, None)
    assert rule.output.series_description_suffix == " [petnode]"
    assert rule.output.series_number_offset == 1000
    with pytest.raises(ValidationError):
        rule.priority = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        rule.match.conditions = ()  # type: ignore[misc]


def test_peer_check_can_be_skipped() -> None:
    ruleset = _rules(_rule(destinations=[{"peer": "anything"}]), peer_names=None)
    assert ruleset.rules[0].destinations == (PeerRef(peer="anything"),)


# ---------------------------------------------------------------------------------------------------------------
# Load errors: file, line, key path, bad value, did-you-mean


@pytest.mark.parametrize(
    ("rule_yaml", "expected"),
    [
        ("    tracers: [FDG]", ":7: rules[0].tracers: unknown key 'tracers' (did you mean 'match.tracer'? "
                             "criteria go under 'match')"),
        ("    modality: PT", ":7: rules[0].modality: unknown key 'modality' (did you mean 'match.modality'?"),
        ("    prority: 3", ":7: rules[0].prority: unknown key 'prority' (did you mean 'priority'?)"),
        ("    match: {tracers: [FDG]}",
         ":7: rules[0].match.tracers: unknown key 'tracers' (did you mean 'tracer'?); allowed here: modality, tracer"),
        ("    match: {tracer: [FDG, FGD]}",
         ":7: rules[0].match.tracer[1]: unknown tracer 'FGD' (did you mean 'FDG'?)"),
        ("    match: {modality: PET}", ":7: rules[0].match.modality[0]: unknown modality 'PET' (did you mean 'PT'?)"),
        ("    match: {scanner: {manufacturer: '(ge'}}",
         ":7: rules[0].match.scanner.manufacturer: invalid regular expression '(ge'"),
        ("    match: {scanner: {}}", "rules[0].match.scanner: scanner needs at least one of"),
        ("    match: {conditions: [{attribute: Unit, equals: BQML}]}",
         "rules[0].match.conditions[0].attribute: unknown DICOM attribute 'Unit' (did you mean 'Units'?)"),
        ("    match: {conditions: [{attribute: Units, equal: BQML}]}",
         "rules[0].match.conditions[0].equal: unknown key 'equal' (did you mean 'equals'?)"),
        ("    match: {conditions: [{attribute: Units, in: [yes]}]}",
         "rules[0].match.conditions[0].in[0]: True is a YAML boolean"),
        ("    match: {conditions: [{attribute: Units, equals: on}]}",
         "rules[0].match.conditions[0].equals: value True is a YAML boolean"),
        ("    match: {conditions: [{attribute: SliceThickness, gt: thick}]}",
         "rules[0].match.conditions[0].gt: gt needs a number, got 'thick'"),
        ("    match: {calling_ae: [THIS_AE_TITLE_IS_TOO_LONG]}",
         "rules[0].match.calling_ae[0]: AE title 'THIS_AE_TITLE_IS_TOO_LONG' must be 1-16"),
        ("    match: {modality: []}", "rules[0].match.modality: modality is an empty list"),
        ("    match: PT", "rules[0].match: expected a mapping (key: value lines), got 'PT'"),
        ("    priority: high", "rules[0].priority: Input should be a valid integer (got 'high')"),
        ("    non_quantitative: skip", "rules[0].non_quantitative: Input should be 'process' or 'refuse' (got 'skip')"),
        ("    quiet_period_s: -1", "rules[0].quiet_period_s: Input should be greater than 0 (got -1)"),
        ("    output: {series_description_suffix: 'a\\\\b'}", "rules[0].output.series_description_suffix: suffix"),
        ("    output: {series_number_offset: -3}", "rules[0].output.series_number_offset: Input should be greater"),
    ],
)
def test_load_errors_name_file_line_key_and_value(tmp_path: Path, rule_yaml: str, expected: str) -> None:
    text = "rules:\n  - name: first\n    denoiser: {name: gaussian}\n    destinations: [return_to_sender]\n" \
           "  - name: second\n    denoiser: gaussian\n" + rule_yaml + "\n    destinations: [return_to_sender]\n"
    message = _load_error(tmp_path, text)
    assert expected.replace("rules[0]", "rules[1]") in message, message


@pytest.mark.parametrize(
    ("rule_yaml", "expected"),
    [
        ("    denoiser: {name: gausian}",
         "rules[0].denoiser.name: unknown denoiser 'gausian' (did you mean 'gaussian'?)"),
        ("    denoiser: {name: gaussian, params: {fwhm: 3}}",
         "rules[0].denoiser.params: invalid params for denoiser 'gaussian': unknown parameter 'fwhm' "
         "(did you mean 'fwhm_mm'?)"),
        ("    denoiser: {name: gaussian, params: {fwhm_mm: -1}}", "rules[0].denoiser.params: invalid params"),
        ("    denoiser: {name: gaussian, params: [1]}", "rules[0].denoiser.params: params must be a mapping"),
        ("    denoiser: {params: {}}", "rules[0].denoiser.name: required key is missing"),
    ],
)
def test_denoiser_errors(tmp_path: Path, rule_yaml: str, expected: str) -> None:
    message = _load_error(tmp_path, f"rules:\n  - name: a\n{rule_yaml}\n    destinations: [return_to_sender]\n")
    assert expected in message, message


@pytest.mark.parametrize(
    ("destinations", "peers", "expected"),
    [
        ("[{peer: pcas}]", {"pacs", "ws"}, "rules[0].destinations[0].peer: unknown peer 'pcas' (did you mean 'pacs'?)"),
        ("[{peer: pacs}]", (), "unknown peer 'pacs'; node.yaml defines no peers"),
        ("[return_to_sendr]", (), "rules[0].destinations[0]: unknown destination 'return_to_sendr' "
                                  "(did you mean 'return_to_sender'?)"),
        ("[{ae_title: WS1, host: h}]", (), "rules[0].destinations[0].port: required key is missing"),
        ("[{ae_title: WS1, host: h, port: 70000}]", (), "rules[0].destinations[0].port: Input should be less than"),
        ("[{ae_title: WS1, host: h, port: 104, tls: true}]", (),
         "rules[0].destinations[0].tls: unknown key 'tls'; allowed here: ae_title, host, port, send"),
        ("[{peer: pacs, port: 104}]", {"pacs"}, "rules[0].destinations[0].port: unknown key 'port'"),
        ("[]", (), "rules[0].destinations: at least one destination is needed"),
        ("[return_to_sender, return_to_sender]", (),
         "rules[0].destinations[1]: destination return_to_sender is listed twice"),
        ("[7]", (), "rules[0].destinations[0]: a destination is return_to_sender or a mapping, got 7"),
    ],
)
def test_destination_errors(tmp_path: Path, destinations: str, peers: Any, expected: str) -> None:
    text = f"rules:\n  - name: a\n    denoiser: gaussian\n    destinations: {destinations}\n"
    message = _load_error(tmp_path, text, peer_names=peers)
    assert expected in message, message


def test_every_problem_is_listed_in_file_order(tmp_path: Path) -> None:
    message = _load_error(tmp_path, """\
        rules:
          - name: Bad Name
            match: {modality: PET, tracer: FGD}
            denoiser: {name: gausian}
            destinations: [return_to_sender]
          - name: ok
            priority: high
            denoiser: gaussian
            destination: [return_to_sender]
        """)
    lines = message.splitlines()
    numbers = [int(re.search(r"\.yaml:(\d+): ", ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert numbers == sorted(numbers)
    expected = [
        ":2: rules[0].name: rule name 'Bad Name' must be lower-case letters, digits, '-' and '_' (e.g. 'bad-name')",
        ":3: rules[0].match.modality[0]: unknown modality 'PET' (did you mean 'PT'?)",
        ":3: rules[0].match.tracer[0]: unknown tracer 'FGD' (did you mean 'FDG'?)",
        ":4: rules[0].denoiser.name: unknown denoiser 'gausian' (did you mean 'gaussian'?)",
        ":7: rules[1].priority: Input should be a valid integer (got 'high')",
        ":9: rules[1].destination: unknown key 'destination' (did you mean 'destinations'?)",
    ]
    assert len(lines) == len(expected), message
    for line, want in zip(lines, expected):
        assert want in line, (want, line)


def test_duplicate_rule_names(tmp_path: Path) -> None:
    message = _load_error(tmp_path, """\
        rules:
          - {name: same, denoiser: gaussian, destinations: [return_to_sender]}
          - {name: other, denoiser: gaussian, destinations: [return_to_sender]}
          - {name: same, denoiser: gaussian, destinations: [return_to_sender]}
        """)
    assert ":4: rules[2].name: rule name 'same' is already used by rules[0]" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ": the file is empty; expected a mapping with the key 'rules'"),
        ("- a\n- b\n", ": top level must be a mapping with the key 'rules', got list"),
        ("rule: []\n", "rule: unknown key 'rule' (did you mean 'rules'?)"),
        ("rules:\n", "rules: Input should be a valid tuple"),
        ("rules: [\n", ": not valid YAML:"),
        ("rules:\n  - name: a\n    name: b\n", ":3:5: not valid YAML: duplicate key 'name' (first given on line 2)"),
        ("rules:\n  - name: a\n\tdenoiser: x\n", ":3:1: not valid YAML:"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value), str(info.value)


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="cannot read the rules file") as info:
        load_rules(tmp_path / "nope.yaml")
    assert "looked in" not in str(info.value)  # an absolute path needs no hint
    # The embedded default is relative to the working directory: the message says where it looked and what to do.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"looked in {re.escape(str(tmp_path))}.*-c NODE_YAML"):
        load_rules(Path("config/rules.yaml"))


def test_empty_rule_list_is_valid_and_routes_nothing(tmp_path: Path) -> None:
    ruleset = load_rules(_write(tmp_path, "rules: []\n"))
    assert ruleset.rules == ()
    assert select_rule(ruleset, _ctx()) is None
    assert explain(ruleset, _ctx()) == []


def test_yaml_anchors_share_destinations(tmp_path: Path) -> None:
    ruleset = load_rules(_write(tmp_path, """\
        rules:
          - name: a
            match: {modality: PT}
            denoiser: gaussian
            destinations: &both [return_to_sender, {peer: pacs}]
          - name: b
            match: {modality: NM}
            denoiser: gaussian
            destinations: *both
        """), peer_names=["pacs"])
    assert ruleset.rules[0].destinations == ruleset.rules[1].destinations


def test_match_everything_rule_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="dicom_node.rules"):
        _rules(_rule("all"))
    assert "matches every series" in caplog.text


def test_factory_series_routes_with_shipped_rules() -> None:
    from tests.factories import make_pet_series

    header = make_pet_series(shape=(2, 4, 4))[0]
    ruleset = load_rules(SHIPPED)
    rule = select_rule(ruleset, MatchContext(header, "STORESCU", "PETNODE"))
    assert rule is not None and rule.name == "fdg-whole-body-cnn"  # the factory's series are FDG
    values = attribute_values(MatchContext(header, None, None), _rules(_rule(match={"tracer": "FDG"})))
    assert values["(tracer)"].startswith("FDG")


# --------------------------------------------------------------------------------------------------------------
# Forwarding, drop and study hold


def test_forwarding_rule_defaults_and_actions() -> None:
    ruleset = _rules(
        {"name": "ct", "match": {"modality": "CT"}, "destinations": [{"peer": "pacs"}]},
        {"name": "both", "denoiser": "gaussian",
         "destinations": [{"peer": "pacs", "send": ["maps", "original", "derived"]},
                          {"return_to_sender": True, "send": "derived"},
                          {"ae_title": "WS1", "host": "h", "port": 104}]},
        {"name": "scouts", "match": {"series_description": "(?i)scout"}, "drop": True},
        peer_names={"pacs"},
    )
    ct, both, scouts = ruleset.rules
    assert ct.action == "forward" and not ct.processes and ct.forwards and ct.forward == "on_completion"
    assert ct.destinations[0].payloads(ct.processes) == ("original",)
    assert both.action == "process and forward"
    assert both.destinations[0].payloads(True) == ("original", "derived", "maps")  # always in this order
    assert isinstance(both.destinations[1], ReturnToSender) and both.destinations[1].payloads(True) == ("derived",)
    assert both.destinations[2].payloads(True) == ("derived", "maps")  # a processing rule's default
    assert scouts.action == "drop" and not scouts.processes and scouts.destinations == ()
    assert "forward -> peer pacs" in ct.summary() and "drop" in scouts.summary()
    assert "peer pacs [original, derived, maps]" in both.summary()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"drop": True}, "a drop rule discards the series: remove denoiser and destinations"),
        ({"denoiser": None, "destinations": [{"peer": "pacs", "send": ["derived"]}]},
         "asks for derived but the rule has no denoiser"),
        ({"destinations": [{"peer": "pacs", "send": ["orignal"]}]}, "unknown payload 'orignal' (did you mean "
                                                                    "'original'?)"),
        ({"destinations": [{"peer": "pacs", "send": []}]}, "send is an empty list"),
        ({"forward": "on_receipt"}, "forward: on_receipt needs a destination that gets the original"),
        ({"forward": "at_once"}, "Input should be 'on_receipt' or 'on_completion'"),
        ({"forward": "on_receipt", "hold_study": True, "destinations": [{"peer": "pacs", "send": "original"}]},
         "cannot be combined with forward: on_receipt"),
        ({"study_quiet_period_s": 30.0}, "study_quiet_period_s applies only with hold_study: true"),
        ({"destinations": []}, "at least one destination is needed"),
        ({"destinations": [{"return_to_sender": "yes"}]}, "write return_to_sender: true"),
    ],
)
def test_forwarding_rule_errors(fields: dict[str, Any], expected: str) -> None:
    rule = {**_rule(), "destinations": [{"peer": "pacs"}], **fields}
    rule = {k: v for k, v in rule.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        _rules(rule, peer_names={"pacs"})
    assert expected in str(info.value), str(info.value)


def test_drop_and_forward_rules_route_like_any_rule() -> None:
    ruleset = _rules(
        {"name": "scouts", "priority": 10, "match": {"modality": "CT", "series_description": "(?i)scout"},
         "drop": True},
        {"name": "ct", "match": {"modality": "CT"}, "forward": "on_receipt", "destinations": [{"peer": "pacs"}]},
        _rule("pet", match={"modality": "PT"}),
        peer_names={"pacs"},
    )
    def name(ds: Dataset) -> str | None:
        rule = select_rule(ruleset, _ctx(ds))
        return rule.name if rule is not None else None

    assert name(_header(Modality="CT", SeriesDescription="SCOUT")) == "scouts"
    assert name(_header(Modality="CT", SeriesDescription="CT AC")) == "ct"
    assert name(_header()) == "pet"
