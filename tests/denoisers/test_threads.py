"""A denoiser called from a worker thread runs in a thread of its own that takes its OpenMP team with it."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from denoisers.base import DenoiseInputs
from denoisers.nlm import NLMDenoiser, NLMParams
from denoisers.threads import run_released


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_main_thread_runs_the_work_itself() -> None:
    ran_on: list[threading.Thread] = []
    assert run_released(lambda: ran_on.append(threading.current_thread()) or 7) == 7
    assert ran_on == [threading.main_thread()]


def test_worker_thread_hands_the_work_to_a_thread_that_ends() -> None:
    ran_on: list[threading.Thread] = []

    def work() -> str:
        ran_on.append(threading.current_thread())
        return "done"

    with ThreadPoolExecutor(1, thread_name_prefix="lane") as lane:
        caller = lane.submit(threading.current_thread).result()
        assert lane.submit(run_released, work).result() == "done"
    assert len(ran_on) == 1 and ran_on[0] is not caller and ran_on[0] is not threading.main_thread()
    assert ran_on[0].name.startswith("lane") and ran_on[0].name.endswith("-run")
    assert not ran_on[0].is_alive()


def test_worker_thread_gets_the_exception_itself() -> None:
    class Boom(RuntimeError):
        pass

    raised = Boom("no luck")

    def work() -> None:
        raise raised

    with ThreadPoolExecutor(1) as lane:
        with pytest.raises(Boom) as info:
            lane.submit(run_released, work).result()
    assert info.value is raised


def test_no_openmp_team_outlives_a_denoise_in_a_lane() -> None:
    """The NLM's torch kernels start an OpenMP team in the thread that runs them; run in the lane thread itself,
    that team would live as long as the lane (and two such lanes throttle every kernel, see denoisers.threads)."""
    torch = pytest.importorskip("torch")
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: OpenMP starts no team to leave behind")
    pet = np.random.default_rng(3).poisson(50.0, size=(12, 24, 24)).astype(np.float32)
    inputs = DenoiseInputs(pet, (2.0, 2.0, 2.0))
    with ThreadPoolExecutor(1) as lane:
        lane.submit(lambda: None).result()  # the lane thread exists
        before = _threads()
        result = lane.submit(NLMDenoiser(NLMParams()).denoise, inputs).result()
        deadline = time.monotonic() + 5.0
        while _threads() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        after = _threads()
    assert after == before, f"{after - before} thread(s) left behind in the lane after the denoise"
    # The same result as in the main thread (the work itself is unchanged).
    np.testing.assert_array_equal(result.denoised, NLMDenoiser(NLMParams()).denoise(inputs).denoised)
