"""Rules that need a prior, the waiting state in the database, the outputs table, and the offline cdip command."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.outputs.derived_pet import is_petnode_output
from dicom_node.rules import map_formats, parse_rules
from dicom_node.state import SeriesState, StateDB
from tests.dicomtools import run_dciodvfy
from tests.factories import make_mr_series, make_pet_series, write_series

CDIP = "{name: cdip, params: {prior: mr, features: 4, depth: 2, epochs: 8, sample_from: 4, sample_every: 2}}"


def _rules(body: str) -> object:
    return yaml.safe_load("rules:\n" + textwrap.indent(textwrap.dedent(body), "  "))


def test_a_method_that_needs_an_mr_needs_a_prior_section() -> None:
    with pytest.raises(ConfigError, match=r"cdip needs an MR prior: add prior: \{modality: MR\}"):
        parse_rules(_rules(f"""
            - name: brain
              denoiser: {CDIP}
              destinations: [return_to_sender]
        """), source="rules.yaml")


def test_the_prior_modality_must_be_the_one_the_method_uses() -> None:
    with pytest.raises(ConfigError, match="configured for a MR prior, but prior.modality is CT"):
        parse_rules(_rules(f"""
            - name: brain
              denoiser: {CDIP}
              prior: {{modality: CT}}
              destinations: [return_to_sender]
        """), source="rules.yaml")


def test_a_fallback_cannot_need_a_prior_and_a_forwarding_rule_takes_none() -> None:
    with pytest.raises(ConfigError, match="the fallback cdip needs a prior itself"):
        parse_rules(_rules(f"""
            - name: brain
              denoiser: {CDIP}
              prior: {{modality: MR, fallback: {CDIP}}}
              destinations: [return_to_sender]
        """), source="rules.yaml")
    with pytest.raises(ConfigError, match="prior applies only to a rule with a denoiser"):
        parse_rules(_rules("""
            - name: fwd
              prior: {modality: MR}
              destinations: [{peer: pacs}]
        """), source="rules.yaml", peer_names={"pacs"})
    with pytest.raises(ConfigError, match="a prior's match takes no modality or tracer"):
        parse_rules(_rules(f"""
            - name: brain
              denoiser: {CDIP}
              prior: {{modality: MR, match: {{modality: MR}}}}
              destinations: [return_to_sender]
        """), source="rules.yaml")


def test_a_prior_rule_loads_with_its_defaults_and_says_so() -> None:
    rules = parse_rules(_rules(f"""
        - name: brain
          denoiser: {CDIP}
          prior: {{modality: MR, match: {{series_description: "(?i)t1"}}, fallback: none}}
          destinations: [{{return_to_sender: true, send: [derived, secondary_capture]}}]
    """), source="rules.yaml")
    rule = rules.rules[0]
    assert rule.prior is not None and rule.prior.fallback is None
    assert (rule.prior.scope, rule.prior.wait_s, rule.prior.registration) == ("study", 600.0, "auto")
    assert "MR prior with SeriesDescription /(?i)t1/ from the same study; waits 600 s, then no output" \
        in rule.summary()
    assert map_formats(rule.destinations[0].payloads(True)) == ("sc",)
    assert map_formats(("derived", "maps")) == ("sc", "pm")
    assert map_formats(("original", "derived")) == ()


def test_waiting_for_a_prior_in_the_database(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite3")
    try:
        db._conn.execute("INSERT INTO series (series_uid, study_uid, modality, state, updated_at, last_received) "
                         "VALUES ('1.1', '9', 'PT', 'processing', 0, 10), ('2.2', '9', 'MR', 'unrouted', 0, 20), "
                         "('3.3', '9', 'MR', 'receiving', 0, 30), ('4.4', '8', 'MR', 'delivered', 0, 40)")
        first = db.wait_for_prior("1.1", "waiting for its MR prior", now=100.0)
        assert first == 100.0 and db.series("1.1")["state"] == SeriesState.WAITING_PRIOR
        assert db.wait_for_prior("1.1", "again", now=200.0) is None  # not processing any more: nothing moves
        # Only complete MR series with files are candidates; in the study, or by time.
        assert [r["series_uid"] for r in db.prior_candidates("MR", study_uid="9")] == ["2.2"]
        assert [r["series_uid"] for r in db.prior_candidates("MR", since=15)] == ["4.4", "2.2"]
        assert db.wake_waiting() == ["1.1"] and db.series("1.1")["state"] == SeriesState.COMPLETE
        db.set_state("1.1", SeriesState.PROCESSING)
        assert db.wait_for_prior("1.1", "again", now=300.0) == 100.0  # waiting keeps its first start
        db.set_prior("1.1", "2.2")
        assert db.priors_in_use() == {"2.2"}  # retention keeps it while the PET needs it
        assert db.series("1.1")["waiting_since"] is None
        db.record_output("1.1", "5.5", payload="maps", kind="stability", fmt="sc", directory=tmp_path, count=3)
        assert db.is_own_output("5.5") and db.output("5.5")["format"] == "sc"
        db.forget_outputs("1.1")
        assert not db.is_own_output("5.5")
    finally:
        db.close()


def test_a_version_3_database_gets_the_prior_columns(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE outputs; ALTER TABLE series DROP COLUMN prior_series_uid; "
                       "ALTER TABLE series DROP COLUMN waiting_since; "
                       "INSERT INTO series (series_uid, state, updated_at) VALUES ('1.2', 'delivered', 1);")
    conn.close()
    db = StateDB(path)
    try:
        assert db.series("1.2")["prior_series_uid"] is None and db.outputs("1.2") == []
    finally:
        db.close()


def test_offline_cdip_with_a_prior_writes_every_series_in_its_own_folder(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    shape, spacing = (8, 20, 20), (3.0, 3.0, 3.0)
    study, frame = generate_uid(), generate_uid()
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = z ** 2 + y ** 2 + x ** 2 < 0.8
    rng = np.random.default_rng(4)
    pet = (np.where(head, 5000.0, 0.0) * rng.gamma(30, 1 / 30, shape)).astype(np.float32)
    write_series(make_pet_series(shape=shape, spacing=spacing, activity=pet, study_uid=study, for_uid=frame),
                 tmp_path / "pet")
    mr = make_mr_series(shape=shape, spacing=spacing, intensity=np.where(head, 1500.0, 0.0), study_uid=study,
                        for_uid=frame)
    write_series(mr, tmp_path / "mr")
    out = tmp_path / "out"
    assert main(["denoise", str(tmp_path / "pet"), str(out), "--method", "cdip", "--prior", str(tmp_path / "mr"),
                 "--param", "features=4", "--param", "depth=2", "--param", "epochs=8", "--param", "sample_from=4",
                 "--param", "sample_every=2"]) == 0
    printed = capsys.readouterr().out
    assert "prior: series" in printed and "frame-of-reference" in printed
    folders = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    assert folders == ["pet", "stability/pm", "stability/sc"]
    derived = dcmread(sorted((out / "pet").glob("*.dcm"))[0])
    assert str(mr[0].SeriesInstanceUID) in {str(i.SeriesInstanceUID) for i in derived.RelatedSeriesSequence}
    for folder in ("stability/sc", "stability/pm"):
        first = sorted((out / folder).glob("*.dcm"))[0]
        assert is_petnode_output(dcmread(first, stop_before_pixels=True))
        errors, _ = run_dciodvfy(first)
        assert errors == [], (folder, errors)
    assert len(list((out / "stability/sc").glob("*.dcm"))) == shape[0]


def test_offline_cdip_without_a_prior_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    write_series(make_pet_series(shape=(4, 12, 12)), tmp_path / "pet")
    assert main(["denoise", str(tmp_path / "pet"), str(tmp_path / "out"), "--method", "cdip"]) == 2
    assert "needs a prior (mr_prior): give --prior PRIOR_DIR" in capsys.readouterr().err
