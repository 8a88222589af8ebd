"""The conformance statement is generated from the code's tables; docs/conformance.md must be its output."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node import handlers
from dicom_node.cli import main
from dicom_node.conformance import conformance_statement
from dicom_node.scp import make_ae
from dicom_node.settings import NodeSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def test_docs_conformance_is_the_generated_statement() -> None:
    assert DOC.read_text(encoding="utf-8") == conformance_statement(), (
        "docs/conformance.md is stale: regenerate it with `petnode conformance > docs/conformance.md`")


def test_every_accepted_context_and_syntax_is_stated() -> None:
    text = conformance_statement()
    ae = make_ae(NodeSettings())
    for cx in ae.supported_contexts:
        assert f"`{cx.abstract_syntax}`" in text
    for uid in handlers.TRANSFER_SYNTAXES + handlers.LOSSY_SYNTAXES:
        assert f"`{uid}`" in text
    for status in handlers.Status:
        assert f"0x{int(status):04X}" in text


def test_a_changed_table_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    assert main(["conformance", "--check", str(DOC)]) == 0
    before = conformance_statement()
    monkeypatch.setitem(handlers.IMAGE_STORAGE_CLASSES, "1.2.840.10008.5.1.4.1.1.20", "Nuclear Medicine Image Storage")
    monkeypatch.setattr(handlers, "LOSSY_SYNTAXES", handlers.LOSSY_SYNTAXES[:-1])
    after = conformance_statement()
    assert after != before
    assert "| Nuclear Medicine Image Storage | `1.2.840.10008.5.1.4.1.1.20` | no (prior or forward) |" in after
    assert main(["conformance", "--check", str(DOC)]) == 1
    assert "differs" in capsys.readouterr().err


def test_conformance_prints_the_statement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance"]) == 0
    assert capsys.readouterr().out == conformance_statement()
