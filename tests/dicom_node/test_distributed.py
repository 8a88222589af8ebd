"""Distributed processing without a broker: the worker's half (run_job) and the node's half (write_series) give
what the in-process pipeline gives; jobs name their results deterministically; no broker, no Celery."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.distributed import (WorkerContext, job_key, load_denoised, make_job, queue_lane, run_job,
                                    save_denoised)
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.pipeline import Plan, load_series, process_series, write_series
from dicom_node.settings import load_settings
from tests.factories import make_pet_series, write_series as write_dicom

PLAN = Plan(route="r", denoiser="gaussian", params={"fwhm_mm": 6.0})


def _series(root: Path, **kw: object) -> list[Path]:
    return write_dicom(make_pet_series(shape=(6, 16, 16), seed=5, **kw), root / "spool" / "s1")


def test_worker_and_node_halves_write_what_the_in_process_pipeline_writes(tmp_path: Path):
    paths = _series(tmp_path)
    uid = str(dcmread(paths[0]).SeriesInstanceUID)
    job = json.loads(json.dumps(make_job(uid, paths, PLAN, tmp_path)))  # what goes over the broker: JSON only
    assert all(not Path(p).is_absolute() for p in job["instances"])
    answer = run_job(job, WorkerContext(root=tmp_path, models=None, hostname="w1@test"), job_id="j1")
    assert answer["ok"] and answer["worker"] == "w1@test" and answer["device"] == "cpu"
    denoised = load_denoised(tmp_path / answer["result"])
    remote = write_series(load_series(paths, PLAN), PLAN, denoised, tmp_path / "remote")
    local = process_series(paths, PLAN, tmp_path / "local")
    assert remote.output_series_uid == local.output_series_uid
    assert [p.name for p in remote.files] == [p.name for p in local.files]
    for a, b in zip(remote.files, local.files):
        da, db = dcmread(a), dcmread(b)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        assert np.array_equal(da.pixel_array, db.pixel_array) and da.RescaleSlope == db.RescaleSlope


def test_a_job_run_twice_writes_the_same_file_and_a_done_job_is_not_run_again(tmp_path: Path):
    paths = _series(tmp_path)
    uid = str(dcmread(paths[0]).SeriesInstanceUID)
    job = make_job(uid, paths, PLAN, tmp_path)
    first = run_job(job, WorkerContext(root=tmp_path, models=None, hostname="w1"))
    array = load_denoised(tmp_path / first["result"]).result.denoised
    second = run_job(job, WorkerContext(root=tmp_path, models=None, hostname="w2"))
    assert second["result"] == first["result"]  # same name: replaced, not a second file
    assert np.array_equal(load_denoised(tmp_path / second["result"]).result.denoised, array)
    assert [p.name for p in (tmp_path / "results").iterdir()] == [Path(first["result"]).name]  # no temp left
    calls = []
    again = run_job(job, WorkerContext(root=tmp_path, models=None, hostname="w3"),
                    answered=lambda: calls.append(1) or first)
    assert again == first and calls == [1]  # asked before any work: nothing loaded, nothing written


def test_failures_come_back_as_answers_the_node_maps(tmp_path: Path):
    paths = _series(tmp_path, units="CNTS")
    uid = str(dcmread(paths[0]).SeriesInstanceUID)
    refuse = Plan(route="r", denoiser="gaussian", params={}, non_quantitative="refuse")
    answer = run_job(make_job(uid, paths, refuse, tmp_path), WorkerContext(root=tmp_path, models=None))
    assert not answer["ok"] and answer["error"] == "RoutingError" and "non-quantitative" in answer["message"]
    missing = make_job(uid, paths, PLAN, tmp_path) | {"instances": ["spool/s1/nothing.dcm"]}
    answer = run_job(missing, WorkerContext(root=tmp_path, models=None))
    assert not answer["ok"] and answer["message"]
    with pytest.raises(DicomNodeError, match="not under distributed.shared_root"):
        make_job(uid, paths, PLAN, tmp_path / "elsewhere")


def test_results_file_round_trip_keeps_maps_and_provenance_facts(tmp_path: Path):
    from denoisers.base import DenoiseResult
    from dicom_node.pipeline import Denoised

    vol = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
    denoised = Denoised(result=DenoiseResult(denoised=vol, stability=vol * 2, info={"h": np.float32(0.5), "n": 3}),
                        stochastic=True, seed=7, inputs=("mr_prior", "pet", "spacing"), model_version="m@1",
                        prior_info={"prior": "rigid-registration"}, prior_series_uid="1.2", prior_study_uid="1.3",
                        timings={"denoise": 1.0})
    back = load_denoised(save_denoised(denoised, tmp_path / "x.npz", "w1@host"))
    assert np.array_equal(back.result.denoised, vol) and np.array_equal(back.result.stability, vol * 2)
    assert back.result.uncertainty is None and back.result.info == {"h": 0.5, "n": 3}
    assert (back.stochastic, back.seed, back.inputs, back.model_version, back.prior_series_uid) == \
        (True, 7, ("mr_prior", "pet", "spacing"), "m@1", "1.2")


def test_job_key_is_fixed_by_what_the_job_computes():
    assert job_key("1.2", PLAN) == job_key("1.2", PLAN)
    others = [job_key("1.3", PLAN), job_key("1.2", Plan(route="r", denoiser="gaussian", params={"fwhm_mm": 5.0})),
              job_key("1.2", Plan(route="r", denoiser="gaussian", params={"fwhm_mm": 6.0}, source_revision=1))]
    assert len({job_key("1.2", PLAN), *others}) == 4


def test_queue_lane_follows_the_method_and_the_configuration_not_this_machine():
    assert queue_lane("gaussian", "auto") == "cpu"
    assert queue_lane("nlm", "auto") == "gpu"  # can use a GPU: the GPU workers' queue, whatever the node has
    assert queue_lane("nlm", "cpu") == "cpu"
    assert queue_lane("gaussian", "cuda:1") == "gpu"


def test_settings_embedded_default_is_off_and_shared_root_must_be_absolute(tmp_path: Path):
    assert load_settings().distributed.enabled is False
    cfg = tmp_path / "node.yaml"
    cfg.write_text("distributed:\n  broker_url: redis://127.0.0.1:6379/0\n  shared_root: relative/dir\n")
    with pytest.raises(ConfigError, match=r"node.yaml.*must be an absolute path"):
        load_settings(cfg)
    cfg.write_text("distributed:\n  broker_url: amqp://x\n")
    with pytest.raises(ConfigError, match="distributed.broker_url"):
        load_settings(cfg)


def test_without_a_broker_celery_is_never_imported(tmp_path: Path):
    """The embedded default: a node built, its lanes chosen and a series processed, with no Celery loaded."""
    (tmp_path / "rules.yaml").write_text(textwrap.dedent("""\
        rules:
          - name: pet
            match: {modality: [PT]}
            denoiser: {name: gaussian, params: {fwhm_mm: 6.0}}
            destinations: [{ae_title: PACS, host: 127.0.0.1, port: 104}]
        """))
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from dicom_node.cli import build_parser
        from dicom_node.node import Node
        from dicom_node.pipeline import Plan, process_series
        from dicom_node.rules import load_rules
        from dicom_node.settings import NodeSettings
        from tests.factories import make_pet_series, write_series
        root = Path({str(tmp_path)!r})
        node = Node(NodeSettings(data_dir=root / "var", port=0), load_rules(root / "rules.yaml"))
        assert node.remote is None
        assert node.lane_for(node.ruleset.rules[0]) == ("cpu:gaussian", "cpu")
        paths = write_series(make_pet_series(shape=(4, 8, 8)), root / "src")
        process_series(paths, Plan(route="pet", denoiser="gaussian"), root / "out")
        build_parser().parse_args(["worker", "--queues", "gpu"])
        node.db.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("celery", "kombu", "redis"))
        assert not loaded, loaded
        print("ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
