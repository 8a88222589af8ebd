"""The pipeline carries the whole denoiser result: info and seed into the provenance and UIDs, maps kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from denoisers.base import DenoiseResult
from dicom_node.outputs.derived_pet import Provenance, derived_series_uid
from dicom_node.pipeline import Plan, _save_maps, process_series, series_seed
from tests.factories import make_pet_series, write_series


def test_nlm_info_reaches_the_dicom_provenance(tmp_path: Path):
    paths = write_series(make_pet_series(shape=(6, 16, 16), seed=3), tmp_path / "src")
    result = process_series(paths, Plan(route="r", denoiser="nlm", params={}), tmp_path / "out")
    assert result.info, "the denoiser's info was dropped"
    ds = dcmread(result.files[0], stop_before_pixels=True)
    assert "run {" in ds.DerivationDescription and "inputs pet+spacing" in ds.DerivationDescription
    key = next(iter(result.info))
    assert key in ds.DerivationDescription  # e.g. the data-dependent h NLM chose
    assert key in ds.ContributingEquipmentSequence[0].ContributionDescription
    assert result.seed == series_seed(str(dcmread(paths[0]).SeriesInstanceUID), "r", 0)


def test_seed_is_fixed_by_series_route_and_revision():
    assert series_seed("1.2.3", "a") == series_seed("1.2.3", "a") >= 0
    assert len({series_seed("1.2.3", "a"), series_seed("1.2.3", "b"), series_seed("1.2.4", "a"),
                series_seed("1.2.3", "a", 1)}) == 4


def test_stochastic_seed_and_priors_change_the_uids():
    base = Provenance(method="m", params={}, route="r")
    assert derived_series_uid("1.2", base) == derived_series_uid("1.2", Provenance(method="m", params={},
                                                                                  route="r", seed=5))
    stochastic = [Provenance(method="m", params={}, route="r", seed=s, stochastic=True) for s in (5, 6)]
    assert len({derived_series_uid("1.2", p) for p in [base, *stochastic]}) == 3
    with_prior = Provenance(method="m", params={}, route="r", inputs=("ct_prior", "pet", "spacing"))
    assert derived_series_uid("1.2", with_prior) != derived_series_uid("1.2", base)


def test_maps_are_kept_beside_the_series(tmp_path: Path):
    vol = np.ones((2, 3, 4), np.float32)
    saved = _save_maps(DenoiseResult(denoised=vol, stability=vol * 2, info={}), tmp_path)
    assert list(saved) == ["stability"]
    assert np.array_equal(np.load(saved["stability"]), vol * 2)


def test_the_offline_command_path_does_not_build_the_node_settings_or_rules(tmp_path: Path):
    """`petnode denoise --method gaussian` runs the CLI, the pipeline and the derived-series writer: none of them
    imports the settings and rules models (pydantic models built at import, YAML), which cost the command about
    0.07 s of its 1.1 s at every start, nor scipy (the Gaussian is numpy's: scipy's import alone was 0.15 s).
    A node verb still gets them where it uses them."""
    import subprocess
    import sys

    series = write_series(make_pet_series(shape=(3, 8, 8), seed=5), tmp_path / "src")
    code = ("import sys\nfrom dicom_node.cli import main\n"
            f"assert main(['denoise', {str(series[0].parent)!r}, {str(tmp_path / 'out')!r}, '--method', "
            "'gaussian']) == 0\n"
            "print(sorted(m for m in ('dicom_node.settings', 'dicom_node.rules', 'yaml', 'scipy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 3
