"""When is a series complete? Pure decisions from what the state database knows (no I/O).

DICOM has no "series done" signal. PET carries NumberOfSlices (0054,0081), so a PET series is complete the
moment that many contiguous slices are here; anything else waits for a quiet period and is then checked for
contiguity. Association release is only a hint (an SCU may send a series over several associations).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Verdict(enum.StrEnum):
    WAIT = "wait"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str


# Slice spacing may differ from the median by this fraction before a stack counts as non-contiguous. Real
# whole-body series are not perfectly uniform: the 267-slice GE Discovery ST series in shared/data has gaps of 3.19
# and 3.29 mm at its bed junctions against 3.27 mm elsewhere (2.4 %), while one missing slice doubles a gap
# (100 %). One value for completion and the loader (``completion.spacing_tolerance``), so a series that completes
# also loads, and one that would not load never completes.
DEFAULT_SPACING_TOLERANCE = 0.1


def spacing_problem(along_sorted: np.ndarray, tolerance: float = DEFAULT_SPACING_TOLERANCE) -> str | None:
    """Why slice positions along the normal (sorted, no duplicates) are not uniformly spaced; None when they are.

    The one definition of "contiguous" the node uses: every gap within ``tolerance`` (relative) of the median.
    """
    steps = np.diff(np.asarray(along_sorted, dtype=float))
    if steps.size == 0:
        return None
    median = float(np.median(steps))
    bad = np.abs(steps - median) > tolerance * median
    if not np.any(bad):
        return None
    i = int(np.argmax(bad))
    gap = int(round(steps[i] / median)) - 1
    what = f"{gap} slice(s) missing" if gap >= 1 else "irregular spacing"
    return (f"not contiguous (non-uniform slice spacing): {what} between {along_sorted[i]:.2f} and "
            f"{along_sorted[i + 1]:.2f} mm (spacing {steps[i]:.2f} mm, usual {median:.2f} mm, tolerance "
            f"{100 * tolerance:g} %)")


def contiguity_problem(positions: Sequence[Sequence[float] | None], orientations: Sequence[Sequence[float] | None],
                       tolerance: float = DEFAULT_SPACING_TOLERANCE) -> str | None:
    """Why these slices do not form one contiguous stack (None when they do).

    Slices are sorted by their position along the slice normal; spacing must be uniform within ``tolerance``
    (relative) and no two slices may share a position. Single-frame images without geometry pass.
    """
    if len(positions) < 2:
        return None
    if any(p is None or len(p) != 3 for p in positions) or any(o is None or len(o) != 6 for o in orientations):
        return "some slices have no ImagePositionPatient / ImageOrientationPatient"
    iops = np.asarray(orientations, dtype=float)
    if np.abs(iops - iops[0]).max() > 1e-4:
        return "slices have different ImageOrientationPatient"
    normal = np.cross(iops[0, :3], iops[0, 3:])
    along = np.sort(np.asarray(positions, dtype=float) @ normal)
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        dup = along[1:][steps < 1e-3][0]
        return f"two slices at the same position ({dup:.2f} mm along the normal)"
    return spacing_problem(along, tolerance)


def _ranges(values: Sequence[int]) -> str:
    """1,2,3,7,9,10 -> '1-3, 7, 9-10' (at most five ranges shown)."""
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out[:5]) + (f" and {len(out) - 5} more range(s)" if len(out) > 5 else "")


def image_index_problem(indices: Sequence[int | None]) -> str | None:
    """Why the PET Image Index values (0054,1330) show slices missing (None when they run 1..N without holes).

    Image Index numbers the slices of a PET series from 1; without NumberOfSlices it still tells a partial
    series (indices 69..135, or 1..135 with holes) from a short one. Series whose instances lack it pass.
    """
    if not indices or any(i is None for i in indices):
        return None
    values = sorted(int(i) for i in indices if i is not None)
    if len(set(values)) != len(values):
        dup = next(a for a, b in zip(values, values[1:]) if a == b)
        return f"two slices with Image Index {dup}"
    missing = sorted(set(range(1, values[-1] + 1)) - set(values))
    if values[0] < 1:
        return f"Image Index {values[0]} out of range (PET Image Index starts at 1)"
    if missing:
        return (f"{len(missing)} slice(s) missing by Image Index (0054,1330): {_ranges(missing)} "
                f"(received {len(values)}, highest index {values[-1]})")
    return None


def decide(*, modality: str, received: int, expected: int | None, seconds_quiet: float, quiet_period_s: float,
           positions: Sequence[Sequence[float] | None], orientations: Sequence[Sequence[float] | None],
           forced: bool = False, tolerance: float = DEFAULT_SPACING_TOLERANCE,
           image_indices: Sequence[int | None] = ()) -> Decision:
    """Decide whether a series is complete now.

    Parameters
    ----------
    modality, received, expected
        What the series says of itself; ``expected`` is NumberOfSlices for classic PET, else None.
    seconds_quiet, quiet_period_s
        Time since the last instance arrived, and how long to wait when the count cannot decide.
    positions, orientations
        ImagePositionPatient / ImageOrientationPatient of every received instance.
    forced
        An operator said ``petnode series complete``: complete now, whatever the count.
    image_indices
        Image Index (0054,1330) of every received PET instance (None where absent): when NumberOfSlices is
        missing, indices that do not run 1..N show slices are missing.
    """
    if forced:
        return Decision(Verdict.COMPLETE, f"forced by operator with {received} instance(s)")
    counted = modality == "PT" and expected is not None and expected > 0
    if counted and received >= expected:  # type: ignore[operator]
        problem = contiguity_problem(positions, orientations, tolerance)
        if problem is None:
            return Decision(Verdict.COMPLETE, f"all {expected} slices received and contiguous")
        if seconds_quiet < quiet_period_s:
            return Decision(Verdict.WAIT, f"{received} of {expected} slices but {problem}")
        return Decision(Verdict.INCOMPLETE, f"{received} of {expected} slices but {problem}")
    if seconds_quiet < quiet_period_s:
        detail = f"{received} of {expected} slices" if counted else f"{received} instance(s)"
        return Decision(Verdict.WAIT, f"{detail}, waiting for the quiet period")
    if counted:
        return Decision(Verdict.INCOMPLETE, f"only {received} of {expected} slices after "
                                            f"{seconds_quiet:.0f} s without new instances")
    has_geometry = all(p is not None for p in positions)
    problem = contiguity_problem(positions, orientations, tolerance) if modality == "PT" or has_geometry else None
    if problem is None and modality == "PT":
        problem = image_index_problem(image_indices)
    if problem is not None:
        return Decision(Verdict.INCOMPLETE, problem)
    return Decision(Verdict.COMPLETE, f"{received} instance(s), quiet for {seconds_quiet:.0f} s")
