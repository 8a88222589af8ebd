"""Routing rules: which series petnode processes, with which denoiser, and where the results go.

Pure: no network, no state, no clock. ``load_rules`` reads ``config/rules.yaml`` into frozen pydantic models and
validates everything it can up front (regexes compiled, DICOM keywords checked, denoiser name and params checked
against ``denoisers.registry``, peer names checked against node.yaml), so a bad file stops the node at start-up
with a message naming the file, line, key path and bad value instead of failing a series at 3 a.m.

A rule matches when *every* criterion it gives holds (AND); a missing or empty attribute fails every criterion
except ``exists: false``, so a rule never fires on a header it cannot read. Rules are tried by ``priority``
(lower first; ties in file order); fallback rules are tried only when no normal rule matched; disabled rules are
skipped. Our own derived series are never matched (loop guard), whatever the rules say.

The file format, in short (``config/rules.yaml`` documents every key)::

    rules:
      - name: pet-gaussian
        match: {modality: PT, tracer: [FDG, PSMA]}
        denoiser: {name: gaussian, params: {fwhm_mm: 4.0}}
        destinations: [return_to_sender, {peer: pacs}]
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag as DicomTag

from dicom_node.errors import ConfigError
from dicom_node.tracers import (
    TRACER_ATTRIBUTES,
    TracerIdentification,
    canonical_tracer_name,
    identify_tracer,
    suggest_tracer,
    tracer_matches,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Address",
    "Condition",
    "DenoiserRef",
    "Destination",
    "Match",
    "MatchContext",
    "OutputOptions",
    "PeerRef",
    "ReturnToSender",
    "Rule",
    "RuleExplanation",
    "RuleSet",
    "Scanner",
    "attribute_name",
    "attribute_values",
    "explain",
    "format_explanations",
    "is_own_output",
    "load_rules",
    "parse_attribute",
    "parse_rules",
    "select_rule",
    "used_attributes",
]

PETNODE_MANUFACTURER = "petnode"
LOOP_GUARD_ATTRIBUTE = "ContributingEquipmentSequence.Manufacturer"

# Modality defined terms (PS3.3 C.7.3.1.1.1), for "did you mean" on typos such as "PET" for "PT".
_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG "
    "MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC".split()
)
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?$")
_MAX_SHOWN = 80


# --------------------------------------------------------------------------------------------------------------
# Small helpers shared by validators


def _did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (case-insensitive), or ``""``."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _error(kind: str, message: str, *, subpath: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error whose message is final; ``subpath`` extends the key path it is reported at."""
    return PydanticCustomError(kind, "{message}", {"message": message, "subpath": subpath})


def _as_tuple(value: Any) -> Any:
    """Accept one string (or number) where a list is expected: ``modality: PT`` == ``modality: [PT]``."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_yaml_scalar(value: Any, *, what: str) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 reads yes/no/on/off/true/false unquoted as booleans.
        raise _error("yaml_bool", f"{what} {value!r} is a YAML boolean (unquoted yes/no/on/off/true/false); "
                     "quote it if you mean the text")
    if value is None:
        raise _error("missing_value", f"{what} is empty")
    return value


def _compile_regex(value: Any) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise _error("regex_type", f"a regular expression must be text, got {_shown(value)}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise _error("regex", f"invalid regular expression {value!r}: {exc}") from None


Regex = Annotated[re.Pattern[str], BeforeValidator(_compile_regex)]


def _check_ae(value: Any) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise _error(
            "ae_title", f"AE title {_shown(value)} must be 1-16 printable ASCII characters without backslash"
        )
    return value.strip()


AETitle = Annotated[str, BeforeValidator(_check_ae)]


# --------------------------------------------------------------------------------------------------------------
# DICOM attribute paths


@lru_cache(maxsize=1024)
def parse_attribute(text: str) -> tuple[BaseTag, ...]:
    """Parse ``Units``, ``0054,1001``, ``(0054,1001)`` or a dotted path into the first item of sequences
    (``RadiopharmaceuticalInformationSequence.RadionuclideTotalDose``) into a tuple of tags.

    Raises
    ------
    ValueError
        Unknown keyword (with did-you-mean), malformed tag, or a path through an attribute that is not a sequence.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"attribute must be a DICOM keyword, a 'GGGG,EEEE' tag or a dotted path, got {text!r}")
    tags: list[BaseTag] = []
    parts = text.strip().split(".")
    for i, part in enumerate(parts):
        part = part.strip()
        match = _TAG_RE.match(part)
        if match:
            tag = DicomTag(int(match.group(1), 16), int(match.group(2), 16))
        elif part in keyword_dict:
            tag = DicomTag(keyword_dict[part])
        else:
            hint = _did_you_mean(part, keyword_dict, cutoff=0.75)
            raise ValueError(f"unknown DICOM attribute {part!r}{hint}")
        if i < len(parts) - 1:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "SQ"  # private or unknown: the header decides at match time
            if vr != "SQ":
                raise ValueError(f"{part!r} is not a sequence, so {text!r} cannot look inside it")
        tags.append(tag)
    return tuple(tags)


def _tag_name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def attribute_name(text: str) -> str:
    """The display form of an attribute spec: keywords where known (``0054,1001`` -> ``Units``)."""
    return ".".join(_tag_name(t) for t in parse_attribute(text))


def _is_sequence_tag(tag: BaseTag) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


@dataclass(frozen=True)
class _Value:
    """What a header holds at one attribute path, normalised for comparison and display."""

    present: bool
    values: tuple[Any, ...] = ()  # one entry per value multiplicity; str, int, float
    is_sequence: bool = False
    items: int = 0
    binary: bool = False

    @property
    def text(self) -> str:
        """The value as DICOM writes it: multiple values joined by a backslash."""
        return "\\".join(str(v) for v in self.values)

    def display(self) -> str:
        if not self.present:
            return "<absent>"
        if self.is_sequence:
            return f"<sequence, {self.items} item{'s' if self.items != 1 else ''}>"
        if self.binary:
            return "<binary data>"
        if not self.values:
            return "<empty>"
        # Quoted but not repr()'d: a backslash between values should read as one backslash.
        text = self.text if len(self.text) <= _MAX_SHOWN else self.text[: _MAX_SHOWN - 3] + "..."
        return f"'{text}'"


def _scalar(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return str(value).strip()


def _lookup(ds: Dataset, path: Sequence[BaseTag]) -> _Value:
    """Read ``path`` from ``ds``, descending into the first item of each sequence on the way."""
    current = ds
    for tag in path[:-1]:
        elem = current.get(tag)
        if elem is None or elem.VR != "SQ" or not elem.value:
            return _Value(present=False)
        current = elem.value[0]
    elem = current.get(path[-1])
    if elem is None:
        return _Value(present=False)
    value = elem.value
    if elem.VR == "SQ":
        return _Value(present=True, is_sequence=True, items=len(value or ()))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _Value(present=True, binary=True)
    if value is None:
        return _Value(present=True)
    raw = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    values = tuple(v for v in (_scalar(v) for v in raw if v is not None) if v != "")
    return _Value(present=True, values=values)


# --------------------------------------------------------------------------------------------------------------
# Models


class _Strict(BaseModel):
    """Frozen, no extra keys (reported with the closest valid key by ``_format_errors``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @classmethod
    def keys(cls) -> list[str]:
        """The keys this mapping accepts in YAML."""
        return [f.alias or name for name, f in cls.model_fields.items()]

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if data is None:
            raise _error("empty", "is empty; expected a mapping (key: value lines)")
        if not isinstance(data, (dict, BaseModel)):
            raise _error("not_mapping", f"expected a mapping (key: value lines), got {_shown(data)}")
        return data


_NUMERIC_OPS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "gt": (">", lambda a, b: a > b),
    "ge": (">=", lambda a, b: a >= b),
    "lt": ("<", lambda a, b: a < b),
    "le": ("<=", lambda a, b: a <= b),
    "eq": ("==", lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)),
    "ne": ("!=", lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)),
}
_OPERATORS = ("equals", "regex", *_NUMERIC_OPS, "in", "not_in", "exists")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class Condition(_Strict):
    """One test on one DICOM attribute; exactly one operator.

    - ``equals``: text equality with the whole value (several values joined by ``\\``: ``ATTN\\DECY``), or
      numeric equality when given a number.
    - ``regex``: ``re.search`` on the whole value (anchor with ``^...$`` for a full match).
    - ``gt`` ``ge`` ``lt`` ``le`` ``eq`` ``ne``: numeric; with several values (PixelSpacing) every value must pass.
    - ``in``: some value is in the list; ``not_in``: no value is in the list (text, or numeric for numbers).
    - ``exists``: true when present and not empty; ``exists: false`` is the one test an absent attribute passes.
    """

    attribute: str
    equals: Any = None
    regex: Regex | None = None
    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None
    eq: Any = None
    ne: Any = None
    in_: Any = Field(None, alias="in")
    not_in: Any = None
    exists: bool | None = Field(None, strict=True)

    @field_validator("attribute")
    @classmethod
    def _valid_attribute(cls, value: str) -> str:
        try:
            parse_attribute(value)
        except ValueError as exc:
            raise _error("attribute", str(exc)) from None
        return value.strip()

    @field_validator("equals")
    @classmethod
    def _valid_equals(cls, value: Any) -> Any:
        if value is None:
            return None
        _check_yaml_scalar(value, what="value")
        if not isinstance(value, (str, int, float)):
            raise _error("operand", f"equals needs one text or number, got {_shown(value)}; use 'in' for a list")
        return value

    @field_validator("gt", "ge", "lt", "le", "eq", "ne")
    @classmethod
    def _valid_number(cls, value: Any, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        # Strings are accepted because PyYAML (YAML 1.1) reads 5.0e8 as text; it wants 5.0e+8.
        number = _number(value) if isinstance(value, (int, float, str)) else None
        if number is None:
            raise _error("operand", f"{info.field_name} needs a number, got {_shown(value)}")
        return float(number)

    @field_validator("in_", "not_in")
    @classmethod
    def _valid_list(cls, value: Any, info: ValidationInfo) -> tuple[str | float, ...] | None:
        if value is None:
            return None
        name = "in" if info.field_name == "in_" else "not_in"
        items = _as_tuple(value)
        if not isinstance(items, tuple) or not items:
            raise _error("operand", f"{name} needs a non-empty list of texts or numbers, got {_shown(value)}")
        out: list[str | float] = []
        for i, item in enumerate(items):
            if isinstance(item, bool):
                raise _error(
                    "yaml_bool",
                    f"{item!r} is a YAML boolean (unquoted yes/no/on/off/true/false); quote it if you mean the text",
                    subpath=(i,),
                )
            if isinstance(item, (int, float)):
                out.append(float(item))
            elif isinstance(item, str):
                out.append(item.strip())
            else:
                raise _error("operand", f"{name} items must be texts or numbers, got {_shown(item)}", subpath=(i,))
        return tuple(out)

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = self.operators()
        if len(given) != 1:
            found = "none" if not given else ", ".join(given)
            raise _error(
                "operator",
                f"a condition needs exactly one operator ({', '.join(_OPERATORS)}); found {found}",
            )
        path = parse_attribute(self.attribute)
        if given[0] != "exists" and _is_sequence_tag(path[-1]):
            raise _error(
                "operator",
                f"{self.attribute!r} is a sequence; only 'exists' applies (or name an attribute inside it, "
                f"e.g. {self.attribute}.CodeValue)",
            )
        return self

    def operators(self) -> list[str]:
        """The operators given (exactly one after validation)."""
        return [op for op in _OPERATORS if getattr(self, "in_" if op == "in" else op) is not None]

    @property
    def operator(self) -> str:
        return self.operators()[0]

    @property
    def operand(self) -> Any:
        return getattr(self, "in_" if self.operator == "in" else self.operator)

    def describe_wanted(self) -> str:
        """The test in words: ``equal to 'BQML'``, ``> 2``, ``one of ['ATTN']``."""
        op, operand = self.operator, self.operand
        if op == "equals":
            return f"equal to {operand!r}"
        if op == "regex":
            return f"matching /{operand.pattern}/"
        if op in _NUMERIC_OPS:
            return f"{_NUMERIC_OPS[op][0]} {operand:g}"
        if op == "in":
            return f"a value in {_fmt_list(operand)}"
        if op == "not_in":
            return f"no value in {_fmt_list(operand)}"
        return "present" if operand else "absent"

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        """Test ``ds``; return (passed, what was found in words)."""
        name = attribute_name(self.attribute)
        found = _lookup(ds, parse_attribute(self.attribute))
        op, operand = self.operator, self.operand
        has_value = found.present and (found.is_sequence and found.items > 0 or bool(found.values))
        if op == "exists":
            return has_value == operand, f"{name} is {found.display()}"
        if not has_value:
            return False, f"{name} is {found.display()}"
        if found.binary or found.is_sequence:
            return False, f"{name} is {found.display()}, which cannot be compared"
        said = f"{name} is {found.display()}"
        if op == "equals":
            if isinstance(operand, (int, float)):
                return _all_numeric(found.values, lambda v: _NUMERIC_OPS["eq"][1](v, float(operand)), said)
            return found.text == str(operand).strip(), said
        if op == "regex":
            return operand.search(found.text) is not None, said
        if op in _NUMERIC_OPS:
            test = _NUMERIC_OPS[op][1]
            return _all_numeric(found.values, lambda v: test(v, operand), said)
        hits = [v for v in found.values if any(_same(v, item) for item in operand)]
        if op == "in":
            return bool(hits), said
        return not hits, said  # not_in


def _same(value: Any, item: str | float) -> bool:
    if isinstance(item, float):
        number = _number(value)
        return number is not None and math.isclose(number, item, rel_tol=1e-9, abs_tol=1e-12)
    return str(value) == item


def _all_numeric(values: Sequence[Any], test: Callable[[float], bool], said: str) -> tuple[bool, str]:
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return False, f"{said}, not a number"
    return all(test(n) for n in numbers if n is not None), said


def _fmt_list(items: Iterable[Any]) -> str:
    return "[" + ", ".join(f"{i:g}" if isinstance(i, float) else str(i) for i in items) + "]"


class Scanner(_Strict):
    """Regexes (``re.search``) on Manufacturer, ManufacturerModelName and StationName; all given must match."""

    manufacturer: Regex | None = None
    model: Regex | None = None
    station: Regex | None = None

    ATTRIBUTES: ClassVar[dict[str, str]] = {
        "manufacturer": "Manufacturer",
        "model": "ManufacturerModelName",
        "station": "StationName",
    }

    @model_validator(mode="after")
    def _something(self) -> Scanner:
        if self.manufacturer is None and self.model is None and self.station is None:
            raise _error("empty", "scanner needs at least one of manufacturer, model, station")
        return self


def _check_modalities(value: Any) -> Any:
    items = _as_tuple(value)
    if not isinstance(items, tuple):
        return value
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _error("modality", f"modality must be text such as 'PT', got {_shown(item)}", subpath=(i,))
        code = item.strip().upper()
        if code not in _MODALITIES:
            hint = " (did you mean 'PT'?)" if code == "PET" else _did_you_mean(code, _MODALITIES)
            raise _error("modality", f"unknown modality {item!r}{hint}", subpath=(i,))
        out.append(code)
    return tuple(out)


def _check_tracers(value: Any) -> Any:
    items = _as_tuple(value)
    if not isinstance(items, tuple):
        return value
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _error("tracer", f"tracer must be text such as 'FDG', got {_shown(item)}", subpath=(i,))
        name = canonical_tracer_name(item)
        if name is None:
            close = suggest_tracer(item)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise _error(
                "tracer",
                f"unknown tracer {item!r}{hint}; see dicom_node/tracers.py for names and synonyms",
                subpath=(i,),
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


def _check_aes(value: Any) -> Any:
    items = _as_tuple(value)
    if not isinstance(items, tuple):
        return value
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_check_ae(item))
        except PydanticCustomError as exc:
            raise _error("ae_title", str(exc), subpath=(i,)) from None
    return tuple(out)


class Match(_Strict):
    """What a series must look like for its rule to apply: an AND of every criterion given (all optional)."""

    modality: Annotated[tuple[str, ...] | None, BeforeValidator(_check_modalities)] = None
    tracer: Annotated[tuple[str, ...] | None, BeforeValidator(_check_tracers)] = None
    scanner: Scanner | None = None
    calling_ae: Annotated[tuple[str, ...] | None, BeforeValidator(_check_aes)] = None
    called_ae: Annotated[tuple[str, ...] | None, BeforeValidator(_check_aes)] = None
    series_description: Regex | None = None
    conditions: tuple[Condition, ...] = ()

    @field_validator("modality", "tracer", "calling_ae", "called_ae")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise _error("empty", f"{info.field_name} is an empty list; leave the key out to accept any")
        return value


class DenoiserRef(_Strict):
    """The denoiser a rule runs and its parameters, validated by ``denoisers.registry.validate_params``.

    ``params`` holds the *validated* parameters with every default filled in, so the provenance written into
    the DICOM output and the derived UIDs record exactly what ran.
    """

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # Trained weights from the model store: "name" (its active version, read per series) or "name@version"
    # (pinned). Only the syntax is checked here; whether it is installed is the model store's business.
    model: str | None = None

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from denoisers.errors import ModelRegistryError
        from denoisers.models import format_ref, parse_ref

        try:
            return format_ref(*parse_ref(value))
        except ModelRegistryError as exc:
            raise _error("model", str(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _validate_with_registry(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}  # ``denoiser: gaussian`` is short for ``{name: gaussian}`` (default params)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        params = data.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise _error("params", f"params must be a mapping, got {_shown(params)}", subpath=("params",))
        # Imported here: the registry pulls in denoisers.base (numpy), which only rule loading needs.
        from denoisers.errors import DenoiserError, DenoiserUnavailableError, UnknownDenoiserError
        from denoisers.registry import validate_params

        try:
            validated = validate_params(data["name"], params)
        except UnknownDenoiserError as exc:
            raise _error("denoiser", str(exc), subpath=("name",)) from None
        except DenoiserUnavailableError as exc:
            raise _error("denoiser", str(exc), subpath=("name",)) from None
        except DenoiserError as exc:
            raise _error("denoiser", str(exc), subpath=("params",)) from None
        return {**data, "params": validated.dump()}

    def describe(self) -> str:
        """``gaussian(fwhm_mm=4.0, fwhm_mm_z=None)`` (plus `` model unet-fdg@1.0.0`` when a model is named)."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})" + (f" model {self.model}" if self.model else "")


class OutputOptions(_Strict):
    """How the derived series is labelled: SeriesDescription suffix and SeriesNumber offset."""

    series_description_suffix: str = Field(" [petnode]", max_length=64)
    series_number_offset: int = Field(1000, ge=0, le=999_999, strict=True)

    @field_validator("series_description_suffix")
    @classmethod
    def _lo_chars(cls, value: str) -> str:
        # SeriesDescription is LO: no backslash, no control characters.
        if "\\" in value or any(ord(ch) < 32 for ch in value):
            raise _error("suffix", f"suffix {value!r} must not contain a backslash or control characters")
        return value


class PriorSpec(_Strict):
    """The anatomical prior a rule's method needs (an MR or CT series of the same patient) and what to do without.

    The node looks for a complete series of ``modality`` that meets ``match`` (its series description, conditions
    ...; the PET's modality and tracer criteria do not apply) in the PET's study (``scope: study``) or among the
    patient's series received within ``window_h`` hours (``scope: patient``). A PET series whose prior is not there
    waits (state ``waiting_prior``) up to ``wait_s`` seconds and is looked at again whenever a series completes;
    then ``fallback`` applies: another denoiser, or ``none`` (no derived series; originals are still forwarded).
    ``registration``: ``auto`` resamples by the DICOM geometry when the prior shares the PET's Frame of Reference and
    registers rigidly otherwise; ``never`` refuses a prior in another Frame of Reference; ``always`` registers.
    """

    modality: Literal["MR", "CT"]
    match: Match = Field(default_factory=Match)
    scope: Literal["study", "patient"] = "study"
    window_h: float = Field(24.0, gt=0, le=24 * 366)
    wait_s: float = Field(600.0, ge=0, le=7 * 86400)
    registration: Literal["auto", "always", "never"] = "auto"
    fallback: DenoiserRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _fallback_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("fallback"), str) and data["fallback"].lower() == "none":
            return {**data, "fallback": None}
        return data

    @field_validator("match")
    @classmethod
    def _no_pet_criteria(cls, value: Match) -> Match:
        if value.modality is not None or value.tracer is not None:
            raise _error("prior", "a prior's match takes no modality or tracer (the prior's modality is "
                         "prior.modality; it has no tracer)")
        return value

    def describe(self) -> str:
        where = "the same study" if self.scope == "study" else f"the patient's series of the last {self.window_h:g} h"
        crit = []
        if self.match.series_description is not None:
            crit.append(f"SeriesDescription /{self.match.series_description.pattern}/")
        crit += [f"{c.attribute} {c.describe_wanted()}" for c in self.match.conditions]
        fallback = self.fallback.describe() if self.fallback is not None else "no output"
        return (f"{self.modality} prior{' with ' + ', '.join(crit) if crit else ''} from {where}; waits "
                f"{self.wait_s:g} s, then {fallback}; registration {self.registration}")


# What a destination can get from a rule: the received series as it is, the derived (denoised) series, the maps
# (a method's stability or uncertainty maps: ``maps`` is both DICOM forms, ``secondary_capture`` the images any
# viewer shows, ``parametric_map`` the raw values with units for quantitative tools).
Payload = Literal["original", "derived", "maps", "secondary_capture", "parametric_map"]
PAYLOADS: tuple[str, ...] = get_args(Payload)
MAP_PAYLOADS: dict[str, tuple[str, ...]] = {"maps": ("sc", "pm"), "secondary_capture": ("sc",),
                                             "parametric_map": ("pm",)}


def map_formats(payloads: Sequence[str]) -> tuple[str, ...]:
    """The map formats ("sc", "pm") a destination's payloads ask for."""
    wanted = {fmt for p in payloads for fmt in MAP_PAYLOADS.get(p, ())}
    return tuple(f for f in ("sc", "pm") if f in wanted)


def _check_send(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]  # ``send: original`` is short for ``send: [original]``
    if isinstance(value, (list, tuple)):
        for item in value:
            if item not in PAYLOADS:
                hint = _did_you_mean(str(item), PAYLOADS)
                raise _error("send", f"unknown payload {_shown(item)}{hint}; a destination gets any of "
                             f"{', '.join(PAYLOADS)}")
        if not value:
            raise _error("send", "send is an empty list; leave the key out for the rule's default")
        if len(set(value)) != len(value):
            raise _error("send", f"send lists a payload twice: {_shown(value)}")
    return value


SendList = Annotated[tuple[Payload, ...] | None, BeforeValidator(_check_send)]


class _DestinationBase(_Strict):
    # None: the rule's default (derived and maps for a processing rule, original for a forwarding rule).
    send: SendList = None

    @classmethod
    def keys(cls) -> list[str]:
        own = super().keys()
        return [k for k in own if k != "send"] + ["send"]  # the address first, then what it gets

    def payloads(self, processes: bool) -> tuple[str, ...]:
        """What this destination gets, in the order it is sent."""
        if self.send is not None:
            if "maps" in self.send and any(p in self.send for p in ("secondary_capture", "parametric_map")):
                # maps already means both forms; listing one again is harmless, sent once
                return tuple(p for p in PAYLOADS if p in self.send and p not in ("secondary_capture",
                                                                                   "parametric_map"))
            return tuple(p for p in PAYLOADS if p in self.send)
        return ("derived", "maps") if processes else ("original",)


class ReturnToSender(_DestinationBase):
    """Send back to the AE that sent the series.

    Resolved when sending: the peer in node.yaml whose AE title equals the calling AE (the sender's own SCP
    host and port are not visible in the association, so the sender must be a known peer).
    Written ``return_to_sender``, or ``{return_to_sender: true, send: [...]}`` to choose what it gets.
    """

    kind: Literal["return_to_sender"] = Field("return_to_sender", alias="return_to_sender")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if data == "return_to_sender":
            return {}
        if isinstance(data, dict) and "return_to_sender" in data:
            if data["return_to_sender"] is not True:
                raise _error("destination", "write return_to_sender: true (or just return_to_sender)")
            return {k: v for k, v in data.items() if k != "return_to_sender"}
        return data

    def describe(self) -> str:
        return "return_to_sender"


class PeerRef(_DestinationBase):
    """A destination by name from node.yaml ``peers``."""

    peer: str = Field(min_length=1)

    @field_validator("peer")
    @classmethod
    def _known_peer(cls, value: str, info: ValidationInfo) -> str:
        peers = (info.context or {}).get("peer_names")
        if peers is not None and value not in peers:
            if peers:
                hint = _did_you_mean(value, peers)
                known = f"; peers in node.yaml: {', '.join(sorted(peers))}"
            else:
                hint, known = "", "; node.yaml defines no peers"
            raise _error("peer", f"unknown peer {value!r}{hint}{known}")
        return value

    def describe(self) -> str:
        return f"peer {self.peer}"


class Address(_DestinationBase):
    """A destination given in full."""

    ae_title: AETitle
    host: str = Field(min_length=1, pattern=r"^\S+$")
    port: int = Field(ge=1, le=65535, strict=True)

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _destination_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {ReturnToSender: "<return_to_sender>", PeerRef: "<peer>", Address: "<address>"}.get(type(value))
    if isinstance(value, str):
        return "<return_to_sender>"
    if isinstance(value, dict):
        if "return_to_sender" in value:
            return "<return_to_sender>"
        return "<peer>" if "peer" in value else "<address>"
    return None


def _check_destination(value: Any) -> Any:
    if isinstance(value, str) and value != "return_to_sender":
        hint = _did_you_mean(value, ["return_to_sender"])
        raise _error(
            "destination",
            f"unknown destination {value!r}{hint}; write return_to_sender, {{peer: NAME}} or "
            "{ae_title: AE, host: HOST, port: PORT}",
        )
    if not isinstance(value, (str, dict, BaseModel)):
        raise _error("destination", f"a destination is return_to_sender or a mapping, got {_shown(value)}")
    return value


Destination = Annotated[
    Union[
        Annotated[ReturnToSender, Tag("<return_to_sender>")],
        Annotated[PeerRef, Tag("<peer>")],
        Annotated[Address, Tag("<address>")],
    ],
    Discriminator(_destination_tag),
    BeforeValidator(_check_destination),
]
_TAGS: dict[str, type[_Strict]] = {"<return_to_sender>": ReturnToSender, "<peer>": PeerRef, "<address>": Address}


def prior_kinds(ref: DenoiserRef | None) -> set[str]:
    """The priors ("mr", "ct") a configured denoiser requires (asks the plugin: it may depend on params)."""
    if ref is None:
        return set()
    try:
        from denoisers import registry

        denoiser = registry.create(ref.name, ref.params, device="cpu")
        try:
            requires = {str(k) for k in denoiser.spec.requires}
        finally:
            denoiser.close()
    except Exception:  # noqa: BLE001 - e.g. a learned method without its model here: it needs no prior we know of
        return set()
    return {kind.removesuffix("_prior") for kind in requires if kind.endswith("_prior")}


class Rule(_Strict):
    """One routing rule: what to match, which denoiser, how to label the output, where to send it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    description: str = ""
    disabled: bool = Field(False, strict=True)
    priority: int = Field(100, strict=True)
    fallback: bool = Field(False, strict=True)
    match: Match = Field(default_factory=Match)
    # None: a forwarding rule (the series goes on as it is) or, with ``drop``, a rule that discards.
    denoiser: DenoiserRef | None = None
    drop: bool = Field(False, strict=True)
    # When destinations that get the original get it: instance by instance as it arrives, or once complete.
    forward: Literal["on_receipt", "on_completion"] = "on_completion"
    # Hold this rule's sends until every series of the study is complete and processed and the study has been
    # quiet for study_quiet_period_s (default: node.yaml completion.study_quiet_period_s).
    hold_study: bool = Field(False, strict=True)
    study_quiet_period_s: float | None = Field(None, gt=0, le=86400, strict=True)
    non_quantitative: Literal["process", "refuse"] = "process"
    quiet_period_s: float | None = Field(None, gt=0, le=86400, strict=True)
    device: str | None = None  # auto | cpu | cuda | cuda:N; None: the node's `device` setting
    output: OutputOptions = Field(default_factory=OutputOptions)
    prior: PriorSpec | None = None
    destinations: tuple[Destination, ...] = ()

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from denoisers.devices import check_device_name

        try:
            return check_device_name(value)
        except ValueError as exc:
            raise _error("device", str(exc)) from None

    @field_validator("name", mode="before")
    @classmethod
    def _name_hint(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", value):
            suggestion = re.sub(r"[^a-z0-9_-]+", "-", value.strip().lower()).strip("-_")
            hint = f" (e.g. {suggestion!r})" if suggestion else ""
            raise _error("name", f"rule name {value!r} must be lower-case letters, digits, '-' and '_'{hint}")
        return value

    @field_validator("destinations")
    @classmethod
    def _no_repeats(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        seen: dict[str, int] = {}
        for i, dest in enumerate(value):
            key = dest.describe()
            if key in seen:
                raise _error("destination", f"destination {key} is listed twice (items {seen[key]} and {i})",
                             subpath=(i,))
            seen[key] = i
        return value

    @model_validator(mode="after")
    def _consistent_actions(self) -> Rule:
        if self.drop:
            extra = [k for k, given in (("denoiser", self.denoiser is not None),
                                        ("destinations", bool(self.destinations))) if given]
            if extra:
                raise _error("drop", f"a drop rule discards the series: remove {' and '.join(extra)}, or drop: true")
            return self
        if not self.destinations:
            raise _error("destination", "at least one destination is needed (e.g. return_to_sender or "
                         "{peer: pacs}); a rule that discards series says drop: true",
                         subpath=("destinations",))
        for i, dest in enumerate(self.destinations):
            wanted = dest.payloads(self.processes)
            if not self.processes and any(p != "original" for p in wanted):
                raise _error("send", f"{dest.describe()} asks for {' and '.join(p for p in wanted if p != 'original')}"
                             " but the rule has no denoiser: a forwarding rule sends the original only "
                             "(add a denoiser to process the series)", subpath=("destinations", i, "send"))
        if self.forward == "on_receipt":
            if not self.forwards:
                raise _error("forward", "forward: on_receipt needs a destination that gets the original "
                             "(send: [original])", subpath=("forward",))
            if self.hold_study:
                raise _error("hold_study", "hold_study keeps the study back until it is complete; it cannot be "
                             "combined with forward: on_receipt (instance by instance)", subpath=("hold_study",))
        self._check_prior()
        if self.study_quiet_period_s is not None and not self.hold_study:
            raise _error("hold_study", "study_quiet_period_s applies only with hold_study: true",
                         subpath=("study_quiet_period_s",))
        return self

    def _check_prior(self) -> None:
        """A method that needs an MR or CT prior gets a ``prior`` section of that modality, and only such a one."""
        needed = prior_kinds(self.denoiser) if self.processes else set()
        if self.prior is not None and not self.processes:
            raise _error("prior", "prior applies only to a rule with a denoiser", subpath=("prior",))
        if self.prior is None:
            if needed:
                kind = sorted(needed)[0].upper()
                assert self.denoiser is not None
                raise _error("prior", f"{self.denoiser.name} needs an {kind} prior: add prior: {{modality: {kind}}} "
                             "(with match: and fallback: as needed)", subpath=("prior",))
            return
        if needed and self.prior.modality.lower() not in needed:
            assert self.denoiser is not None
            raise _error("prior", f"{self.denoiser.name} is configured for a {'/'.join(sorted(needed)).upper()} "
                         f"prior, but prior.modality is {self.prior.modality}", subpath=("prior", "modality"))
        if self.prior.fallback is not None and prior_kinds(self.prior.fallback):
            raise _error("prior", f"the fallback {self.prior.fallback.name} needs a prior itself; a fallback "
                         "runs when the prior is missing", subpath=("prior", "fallback"))

    @property
    def processes(self) -> bool:
        """Whether the rule runs a denoiser (and so produces a derived series)."""
        return self.denoiser is not None and not self.drop

    @property
    def forwards(self) -> bool:
        """Whether some destination gets the original series."""
        return any("original" in d.payloads(self.processes) for d in self.destinations)

    @property
    def action(self) -> str:
        """drop | forward | process | process and forward (what `petnode rules test` and logs call it)."""
        if self.drop:
            return "drop"
        if not self.processes:
            return "forward"
        return "process and forward" if self.forwards else "process"

    def summary(self) -> str:
        """One line: ``gaussian(fwhm_mm=4.0, ...) -> return_to_sender, peer pacs [original]; non-quantitative: ...``."""
        if self.drop:
            return "drop: the series is kept for the unrouted retention age and sent nowhere"

        def dest_text(d: Any) -> str:
            default = d.payloads(self.processes) == ("derived", "maps")
            return d.describe() + ("" if default else f" [{', '.join(d.payloads(self.processes))}]")

        dests = ", ".join(dest_text(d) for d in self.destinations)
        quiet = f"; quiet period {self.quiet_period_s:g} s" if self.quiet_period_s is not None else ""
        when = "; originals on receipt" if self.forward == "on_receipt" and self.forwards else ""
        hold = "; study held until complete" if self.hold_study else ""
        if not self.processes:
            return f"forward -> {dests}{when}{hold}{quiet}"
        assert self.denoiser is not None
        prior = f"; {self.prior.describe()}" if self.prior is not None else ""
        return (f"{self.denoiser.describe()} -> {dests}; non-quantitative series: {self.non_quantitative}"
                f"{prior}{when}{hold}{quiet}")


class RuleSet(_Strict):
    """All rules of one file, in file order."""

    rules: tuple[Rule, ...]

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, value: tuple[Rule, ...]) -> tuple[Rule, ...]:
        first: dict[str, int] = {}
        for i, rule in enumerate(value):
            if rule.name in first:
                raise _error(
                    "duplicate", f"rule name {rule.name!r} is already used by rules[{first[rule.name]}]",
                    subpath=(i, "name"),
                )
            first[rule.name] = i
        return value

    def ordered(self) -> list[Rule]:
        """The order rules are tried in: normal rules by priority then file order, then fallback rules alike."""
        order = {id(r): i for i, r in enumerate(self.rules)}
        return sorted(self.rules, key=lambda r: (r.fallback, r.priority, order[id(r)]))

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


# --------------------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(node: yaml.Node | None, path: tuple[str | int, ...] = ()) -> dict[tuple[str | int, ...], int]:
    """1-based line of every key path in a composed YAML document (for error messages)."""
    lines: dict[tuple[str | int, ...], int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            below = _line_map(value_node, (*path, key))
            below[(*path, key)] = key_node.start_mark.line + 1  # the key's line, not its value's
            lines.update(below)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, i)))
    return lines


def _key_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_in(annotation: Any) -> type[_Strict] | None:
    """The first ``_Strict`` model inside a type annotation (through Optional, tuple, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, _Strict):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    """The keys valid in the mapping at ``loc`` (a raw pydantic error location, union tags included)."""
    current: type[_Strict] | None = RuleSet
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _TAGS:
            current = _TAGS[part]
            continue
        if current is None:
            return []
        fields = {(f.alias or name): f for name, f in current.model_fields.items()}
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    return current.keys() if current is not None else []


def _format_errors(source: str, exc: ValidationError, lines: Mapping[tuple[str | int, ...], int]) -> str:
    """One line per problem, in file order: ``file:line: key.path: message``."""
    messages: list[tuple[int, str]] = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        loc = (*(p for p in err["loc"] if p not in _TAGS), *ctx.get("subpath", ()))
        line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line is not None else source
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            key = str(loc[-1])
            hint = _did_you_mean(key, allowed)
            if allowed == Rule.keys() and (key in Match.keys() or not hint):
                # A match criterion written at the rule level is a common slip.
                close = [key] if key in Match.keys() else difflib.get_close_matches(key, Match.keys(), n=1)
                if close:
                    hint = f" (did you mean 'match.{close[0]}'? criteria go under 'match')"
            message = f"unknown key {key!r}{hint}"
            if allowed:
                message += f"; allowed here: {', '.join(allowed)}"
        elif "message" in ctx:
            message = str(ctx["message"])
        else:
            message = f"{err['msg']} (got {_shown(err.get('input'))})"
            if err["type"] == "missing":
                message = "required key is missing"
        messages.append((line or 0, f"{where}: {_key_path(loc)}: {message}"))
    return "\n".join(dict.fromkeys(text for _, text in sorted(messages, key=lambda m: m[0])))


def parse_rules(
    data: Any,
    *,
    source: str = "<rules>",
    peer_names: Collection[str] | None = (),
    _lines: Mapping[tuple[str | int, ...], int] | None = None,
) -> RuleSet:
    """Validate already-parsed YAML ``data`` into a ``RuleSet``.

    Parameters
    ----------
    data
        The document: a mapping with one key, ``rules``.
    source
        Name used in error messages (the file path).
    peer_names
        Peer names defined in node.yaml; ``{peer: X}`` destinations must name one of them. ``None`` skips the
        check (for tools that validate a rules file without a node configuration).

    Raises
    ------
    ConfigError
        One line per problem: ``file:line: rules[2].match.tracer[0]: unknown tracer 'FGD' (did you mean 'FDG'?)``.
    """
    if data is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping with the key 'rules'")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping with the key 'rules', got {type(data).__name__}")
    context = {"peer_names": None if peer_names is None else frozenset(peer_names)}
    try:
        ruleset = RuleSet.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, _lines or {})) from None
    for rule in ruleset.rules:
        if not rule.disabled and rule.match == Match() and not rule.fallback:
            logger.warning("%s: rule %r has no match criteria and matches every series", source, rule.name)
    return ruleset


def load_rules(path: Path, *, peer_names: Collection[str] | None = ()) -> RuleSet:
    """Load and validate a rules file.

    Parameters
    ----------
    path
        The YAML file (``config/rules.yaml``).
    peer_names
        Names of the peers in node.yaml; a ``{peer: NAME}`` destination naming another is refused. ``None``
        skips that check.

    Raises
    ------
    ConfigError
        The file cannot be read, is not YAML (line and column given), has a duplicate key, or fails validation
        (every problem listed with file, line, key path and bad value).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        hint = ""
        if not Path(path).is_absolute() and not Path(path).exists():
            # The embedded default (config/rules.yaml) is relative to where petnode was started.
            hint = (f" (looked in {Path.cwd()}: run petnode from the folder that holds it, or give -c NODE_YAML "
                    "whose rules_file names it)")
        raise ConfigError(f"{source}: cannot read the rules file: {exc.strerror or exc}{hint}") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        context = f"{exc.context}; " if exc.context else ""
        raise ConfigError(f"{where}: not valid YAML: {context}{exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    ruleset = parse_rules(data, source=source, peer_names=peer_names, _lines=_line_map(node))
    logger.info(
        "loaded %d rules from %s (%d enabled, %d fallback)", len(ruleset.rules), source,
        sum(not r.disabled for r in ruleset.rules), sum(r.fallback for r in ruleset.rules),
    )
    return ruleset


# --------------------------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MatchContext:
    """What a rule can look at: the header of one instance of the series and the association's AE titles."""

    dataset: Dataset
    calling_ae: str | None = None
    called_ae: str | None = None


def is_own_output(ds: Dataset) -> bool:
    """True when ``ds`` is a series petnode wrote (Contributing Equipment names petnode): never route it again.

    Uses ``dicom_node.outputs.derived_pet.is_petnode_output`` when that module is importable, and always also
    checks the Contributing Equipment Sequence here, so the guard holds even if the writer's check changes.
    """
    try:
        from dicom_node.outputs.derived_pet import is_petnode_output
    except ImportError:
        pass
    else:
        if is_petnode_output(ds):
            return True
    for item in ds.get("ContributingEquipmentSequence") or ():
        if str(item.get("Manufacturer", "")).strip().lower() == PETNODE_MANUFACTURER:
            return True
    return False


_PASS = "pass"
_FAIL = "FAIL"


def _check(ok: bool, what: str, found: str, wanted: str) -> tuple[bool, str]:
    return ok, f"{_PASS if ok else _FAIL}: {what}: {found} (wanted {wanted})"


def _in_list(found: str | None, wanted: Sequence[str]) -> bool:
    return found is not None and found in wanted


def _evaluate(rule: Rule, ctx: MatchContext, *, stop_early: bool) -> tuple[bool, list[str]]:
    """Test every criterion of ``rule`` on ``ctx``; the reasons say what was found and what was wanted."""
    return evaluate_match(rule.match, ctx, stop_early=stop_early)


def evaluate_match(m: Match, ctx: MatchContext, *, stop_early: bool = True) -> tuple[bool, list[str]]:
    """Test every criterion of ``m`` on ``ctx`` (a rule's match, or a prior's); reasons as in ``_evaluate``."""
    ds = ctx.dataset
    results: list[tuple[bool, str]] = []

    def done() -> bool:
        return stop_early and not all(ok for ok, _ in results)

    if m.modality is not None:
        found = _lookup(ds, parse_attribute("Modality"))
        value = found.text if found.values else None
        results.append(_check(_in_list(value, m.modality), "modality", f"Modality is {found.display()}",
                              f"one of {_fmt_list(m.modality)}"))
    if m.tracer is not None and not done():
        ident: TracerIdentification = identify_tracer(ds)
        ok = any(tracer_matches(w, ident.name) for w in m.tracer)
        results.append(_check(ok, "tracer", f"tracer is {ident.describe()}", f"one of {_fmt_list(m.tracer)}"))
    if m.scanner is not None and not done():
        for key, keyword in Scanner.ATTRIBUTES.items():
            pattern = getattr(m.scanner, key)
            if pattern is None:
                continue
            found = _lookup(ds, parse_attribute(keyword))
            ok = bool(found.values) and pattern.search(found.text) is not None
            results.append(_check(ok, f"scanner.{key}", f"{keyword} is {found.display()}",
                                  f"matching /{pattern.pattern}/"))
    for key, value in (("calling_ae", ctx.calling_ae), ("called_ae", ctx.called_ae)):
        wanted = getattr(m, key)
        if wanted is None or done():
            continue
        label = key.replace("_ae", " AE")
        shown = repr(value.strip()) if value else "unknown"
        results.append(_check(_in_list(value.strip() if value else None, wanted), key, f"{label} is {shown}",
                              f"one of {_fmt_list(wanted)}"))
    if m.series_description is not None and not done():
        found = _lookup(ds, parse_attribute("SeriesDescription"))
        ok = bool(found.values) and m.series_description.search(found.text) is not None
        results.append(_check(ok, "series_description", f"SeriesDescription is {found.display()}",
                              f"matching /{m.series_description.pattern}/"))
    for i, cond in enumerate(m.conditions):
        if done():
            break
        ok, found_text = cond.evaluate(ds)
        results.append(_check(ok, f"conditions[{i}]", found_text, cond.describe_wanted()))
    if not results:
        results.append((True, f"{_PASS}: no match criteria: the rule matches every series"))
    return all(ok for ok, _ in results), [text for _, text in results]


def select_rule(ruleset: RuleSet, ctx: MatchContext) -> Rule | None:
    """Return the rule that applies to the series of ``ctx``, or None (the series is not processed).

    Our own derived output is never matched. Enabled normal rules are tried by priority (ties in file order),
    then enabled fallback rules likewise; the first whose criteria all hold wins.
    """
    series = str(ctx.dataset.get("SeriesInstanceUID", "?"))
    if is_own_output(ctx.dataset):
        logger.debug("series=%s is petnode's own output: not routed", series)
        return None
    for rule in ruleset.ordered():
        if rule.disabled:
            continue
        matched, _ = _evaluate(rule, ctx, stop_early=True)
        if matched:
            logger.debug("series=%s route=%s selected%s", series, rule.name, " (fallback)" if rule.fallback else "")
            return rule
    logger.debug("series=%s matched no rule", series)
    return None


@dataclass(frozen=True)
class RuleExplanation:
    """Why one rule did or did not apply to a series (``petnode rules test`` prints these).

    ``matched`` means the rule is enabled and every criterion held; ``selected`` marks the one rule
    ``select_rule`` returns. ``reasons`` has one ``pass: ...`` or ``FAIL: ...`` line per criterion, plus notes.
    """

    rule: str
    matched: bool
    reasons: list[str]
    priority: int = 100
    disabled: bool = False
    fallback: bool = False
    selected: bool = False
    summary: str = ""

    def __str__(self) -> str:
        if self.selected:
            verdict = "SELECTED"
        elif self.matched:
            verdict = "matches, not used"
        elif self.disabled:
            verdict = "disabled"
        else:
            verdict = "no match"
        kind = "fallback rule" if self.fallback else "rule"
        head = f"{kind} {self.rule!r} (priority {self.priority}): {verdict}"
        lines = [head, *(f"    {r}" for r in self.reasons)]
        if self.selected and self.summary:
            lines.append(f"    => {self.summary}")
        return "\n".join(lines)


def explain(ruleset: RuleSet, ctx: MatchContext) -> list[RuleExplanation]:
    """Explain every rule against ``ctx``, in the order rules are tried; see ``RuleExplanation``."""
    if is_own_output(ctx.dataset):
        reason = (f"{_FAIL}: the series is petnode's own output ({LOOP_GUARD_ATTRIBUTE} names "
                  f"{PETNODE_MANUFACTURER!r}); it is never routed again")
        return [
            RuleExplanation(r.name, False, [reason], r.priority, r.disabled, r.fallback, summary=r.summary())
            for r in ruleset.ordered()
        ]
    chosen = select_rule(ruleset, ctx)
    normal_winner = chosen is not None and not chosen.fallback
    out = []
    for rule in ruleset.ordered():
        ok, reasons = _evaluate(rule, ctx, stop_early=False)
        if rule.disabled:
            reasons = ["rule is disabled (disabled: true); it would " + ("match" if ok else "not match")
                       + " if enabled", *reasons]
            ok = False
        elif rule.fallback and ok and normal_winner:
            reasons = [*reasons, f"fallback rule not used: rule {chosen.name!r} matched"]  # type: ignore[union-attr]
        elif ok and chosen is not None and chosen is not rule:
            reasons = [*reasons, f"not used: rule {chosen.name!r} comes first (priority {chosen.priority})"]
        out.append(RuleExplanation(
            rule.name, ok, reasons, rule.priority, rule.disabled, rule.fallback, rule is chosen, rule.summary(),
        ))
    return out


def format_explanations(explanations: Sequence[RuleExplanation]) -> str:
    """The full text ``petnode rules test`` prints: the verdict first, then every rule with its reasons."""
    chosen = next((e for e in explanations if e.selected), None)
    if chosen is not None:
        head = f"Selected rule: {chosen.rule}" + (" (fallback)" if chosen.fallback else "")
        head += f"\n  {chosen.summary}" if chosen.summary else ""
    elif not explanations:
        head = "No rules are defined: the series would not be processed."
    else:
        head = "No rule applies: the series would not be processed (the original is not affected)."
    return "\n\n".join([head, *(str(e) for e in explanations)])


# --------------------------------------------------------------------------------------------------------------
# What the rules look at


def used_attributes(ruleset: RuleSet) -> list[str]:
    """Every DICOM attribute the rules read (disabled rules included), for ``petnode rules test`` to print.

    Always starts with the loop guard's attribute; helpers add theirs (tracer: the radiopharmaceutical
    attributes; scanner: Manufacturer, ManufacturerModelName, StationName).
    """
    names: dict[str, None] = {LOOP_GUARD_ATTRIBUTE: None}
    for rule in ruleset.rules:
        m = rule.match
        if m.modality is not None:
            names["Modality"] = None
        if m.tracer is not None:
            names.update(dict.fromkeys(TRACER_ATTRIBUTES))
        if m.scanner is not None:
            for key, keyword in Scanner.ATTRIBUTES.items():
                if getattr(m.scanner, key) is not None:
                    names[keyword] = None
        if m.series_description is not None:
            names["SeriesDescription"] = None
        for cond in m.conditions:
            names[attribute_name(cond.attribute)] = None
    return list(names)


def attribute_values(ctx: MatchContext, ruleset: RuleSet) -> dict[str, str]:
    """``{attribute: value as text}`` for every attribute in ``used_attributes``; absent ones read ``<absent>``.

    When rules use them, three derived entries follow: ``(tracer)`` (what ``identify_tracer`` made of the
    header), ``(calling AE)`` and ``(called AE)``.
    """
    values = {name: _lookup(ctx.dataset, parse_attribute(name)).display() for name in used_attributes(ruleset)}
    matches = [r.match for r in ruleset.rules]
    if any(m.tracer is not None for m in matches):
        values["(tracer)"] = identify_tracer(ctx.dataset).describe()
    if any(m.calling_ae is not None for m in matches):
        values["(calling AE)"] = repr(ctx.calling_ae) if ctx.calling_ae else "unknown"
    if any(m.called_ae is not None for m in matches):
        values["(called AE)"] = repr(ctx.called_ae) if ctx.called_ae else "unknown"
    return values
