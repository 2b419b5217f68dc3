"""Frozen audit protocols: a versioned, immutable bundle of everything that shapes an audit's numbers.

Two audits can only be compared when the same shifts, severities, seeds and statistics produced
them. A protocol pins exactly those: the modality (it decides which perturbations are stress
tests), the perturbations with the parameters of every severity, the severities, the seed, the
bootstrap size and confidence level, the detectors, the metrics it compares per task type and the
decision margins of the breaking points. It is identified by its name (``mri-v1``), version and
the SHA-256 of its canonical content (:attr:`Protocol.sha256`), recorded in results.json
``protocol`` and the report.

A protocol never changes: changing anything means a new name and version (``mri-v2``), and the
test suite pins the hash of every shipped protocol. Plugins contribute protocols through the
``medaudit_protocols`` hook, so a consortium can publish its own as a package.

Applying a protocol (:func:`resolve_protocol`) sets the config keys it pins
(:meth:`Protocol.config_values`). A config-file value or flag that contradicts a pinned one is an
error naming it, unless the user passes ``--protocol-override``: then the user's value wins and
the run is recorded as *not* protocol-conformant, with the overridden keys, everywhere the protocol
appears. After planning, :func:`check_plan` verifies that the installed perturbations are the
protocol's, with the same parameters at every severity (a plugin upgrade that changes a
perturbation changes what the protocol's name would mean).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import Modality, format_validation_error
from .errors import ConfigError

__all__ = ["PerturbationPin", "Protocol", "ProtocolRun", "check_metrics", "check_plan", "load_protocol_file",
           "resolve_protocol"]


class PerturbationPin(BaseModel):
    """One perturbation as a protocol pins it: its suite, the dims it runs on and the parameters
    of each severity (as ``medaudit perturbations --json`` prints them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str
    dims: list[int]
    severities: dict[str, dict[str, Any]]


class Protocol(BaseModel):
    """A frozen audit protocol (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*-v[0-9]+$", description="e.g. mri-v1; the version is part of the name")
    version: int = Field(ge=1)
    description: str
    modality: Modality
    suites: list[str] = Field(description="the suites the protocol audits; their perturbations are pinned below")
    perturbations: dict[str, PerturbationPin]
    severities: list[int]
    seed: int = Field(ge=0)
    bootstrap: int = Field(ge=0)
    confidence: float = Field(gt=0, lt=1)
    detectors: list[str]
    metrics: dict[str, list[str]] = Field(description="task type -> the metric keys the protocol compares")
    margins: dict[str, float] = Field(description="metric key -> breaking-point margin; '*' for every other metric")

    @field_validator("severities")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or sorted(set(v)) != v or any(s not in (1, 2, 3, 4, 5) for s in v):
            raise ValueError(f"severities must be an ascending list of distinct levels 1..5, got {v}")
        return v

    def model_post_init(self, __context: Any) -> None:
        if not self.name.endswith(f"-v{self.version}"):
            raise ValueError(f"protocol name {self.name!r} must end in -v{self.version} (its version)")
        stray = sorted(p for p, pin in self.perturbations.items() if pin.suite not in self.suites)
        if stray:
            raise ValueError(f"protocol {self.name}: perturbations {stray} belong to no suite of {self.suites}")
        # check_plan compares the parameters at every pinned severity: a level a pin lacks would
        # refuse every audit under the protocol, as if the installed perturbation had changed
        unpinned = sorted(f"{p}@{s}" for p, pin in self.perturbations.items() for s in self.severities
                          if str(s) not in pin.severities)
        if unpinned:
            raise ValueError(f"protocol {self.name}: no parameters pinned for {', '.join(unpinned)} (every perturbation "
                             f"pins each of the severities {self.severities})")

    def content(self) -> dict[str, Any]:
        """The protocol as JSON-ready data: what the hash covers."""
        return self.model_dump(mode="json")

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`content` (sorted keys, no whitespace, UTF-8)."""
        text = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def config_values(self) -> dict[str, Any]:
        """Dotted config key -> the value the protocol pins."""
        return {
            "input.modality": self.modality,
            "audit.suites": list(self.suites),
            "audit.perturbations": [],
            "audit.exclude": [],
            "audit.severities": list(self.severities),
            "audit.seed": self.seed,
            "audit.bootstrap": self.bootstrap,
            "audit.confidence": self.confidence,
            "audit.detectors": list(self.detectors),
            "verdict.margins": dict(self.margins),
        }


def load_protocol_file(path: Path) -> Protocol:
    """A protocol from its JSON file; an invalid one is a ConfigError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"protocol file {path} cannot be read: {exc}") from None
    try:
        return Protocol.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"protocol file {path}")) from None


#: The flag that sets each pinned key, for error messages naming what the user typed.
FLAGS = {"audit.suites": "--suite", "audit.perturbations": "--perturbation", "audit.severities": "--severities",
         "audit.seed": "--seed", "audit.bootstrap": "--bootstrap"}


@dataclass(frozen=True)
class ProtocolRun:
    """A protocol as one audit applied it: conformant, or with the keys the user overrode."""

    protocol: Protocol
    overrides: list[str] = field(default_factory=list)

    @property
    def conformant(self) -> bool:
        return not self.overrides

    def with_override(self, what: str) -> "ProtocolRun":
        return ProtocolRun(self.protocol, [*self.overrides, what])

    def record(self) -> dict[str, Any]:
        """results.json ``protocol``."""
        return {**self.protocol.identity(), "conformant": self.conformant, "overrides": list(self.overrides)}


def _dotted(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _same(key: str, given: Any, pinned: Any) -> bool:
    if key == "verdict.margins" and isinstance(given, Mapping):
        # naming a metric's margin keeps the protocol's others, as the config does with the default
        return all(float(pinned.get(k, pinned.get("*", -1))) == float(v) for k, v in given.items())
    if key in ("audit.suites", "audit.severities", "audit.detectors") and isinstance(given, list):
        return sorted(given) == sorted(pinned)
    if isinstance(pinned, float) and isinstance(given, (int, float)) and not isinstance(given, bool):
        return float(given) == pinned
    return given == pinned


def resolve_protocol(protocols: Mapping[str, Protocol], name: str, file_data: Mapping[str, Any],
                     overrides: Mapping[str, Any], *, allow_override: bool,
                     source: str = "the config file") -> tuple[ProtocolRun, dict[str, Any]]:
    """Apply protocol ``name`` to a run's config: ``(the run's protocol record, the overrides to
    load the config with)``.

    ``file_data`` is the parsed config file, ``overrides`` the dotted keys the flags set (``None``:
    not given). A value either sets that differs from the protocol's is a contradiction: a
    ConfigError naming each, or with ``allow_override`` the user's value is kept and recorded.
    """
    if name not in protocols:
        raise ConfigError(f"unknown protocol {name!r}; `medaudit protocols` lists them: {', '.join(sorted(protocols)) or 'none'}")
    protocol = protocols[name]
    run = ProtocolRun(protocol)
    out = {k: v for k, v in overrides.items() if v is not None}
    conflicts = []
    for key, pinned in protocol.config_values().items():
        given_flag = out.get(key)
        given_file = _dotted(file_data, key)
        for where, given in ((FLAGS.get(key, key), given_flag), (f"{key} in {source}", given_file)):
            if given is None:
                continue
            if _same(key, given, pinned):
                break  # a flag replaces the file's value: restating the protocol's on the command line conforms
            conflicts.append(f"{where} = {json.dumps(given)} (protocol: {json.dumps(pinned)})")
            run = run.with_override(key)
            break
        if key not in run.overrides:
            out[key] = pinned
    if conflicts and not allow_override:
        raise ConfigError(
            f"protocol {name} pins what these set differently: {'; '.join(conflicts)}. Remove them, or pass "
            "--protocol-override to keep them (the audit is then marked not protocol-conformant)")
    out["protocol"] = name
    return run, out


def check_plan(run: ProtocolRun, chosen: Mapping[str, dict[str, Any]], dims: int, *,
               allow_override: bool) -> ProtocolRun:
    """Verify the planned perturbations against the protocol.

    ``chosen`` maps each planned perturbation to its catalogue entry (``medaudit perturbations
    --json``). Every protocol perturbation that runs on ``dims`` must be planned, with the
    protocol's parameters at each of its severities, and nothing else may be: otherwise a
    ConfigError naming the differences, or with ``allow_override`` a non-conformant record.
    """
    protocol = run.protocol
    if {"audit.suites", "audit.perturbations", "audit.exclude"} & set(run.overrides):
        return run  # the user chose other perturbations: already recorded
    expected = {n for n, pin in protocol.perturbations.items() if dims in pin.dims}
    problems = []
    missing, extra = sorted(expected - set(chosen)), sorted(set(chosen) - expected)
    if missing:
        problems.append(f"not installed: {', '.join(missing)}")
    if extra:
        problems.append(f"not in the protocol (a plugin joined its suites): {', '.join(extra)}")
    for name in sorted(expected & set(chosen)):
        pinned = protocol.perturbations[name].severities
        installed = chosen[name]["severities"]
        changed = [s for s in map(str, protocol.severities)
                   if json.dumps(installed.get(s), sort_keys=True) != json.dumps(pinned.get(s), sort_keys=True)]
        if changed:
            problems.append(f"{name} has other parameters at severity {', '.join(changed)} than the protocol pins "
                            f"(installed: {json.dumps({s: installed.get(s) for s in changed})}; protocol: "
                            f"{json.dumps({s: pinned.get(s) for s in changed})})")
    if not problems:
        return run
    if not allow_override:
        raise ConfigError(f"the installed perturbations are not protocol {protocol.name}'s: {'; '.join(problems)}. "
                          "Install the plugin versions the protocol was frozen with, or pass --protocol-override "
                          "(the audit is then marked not protocol-conformant)")
    return run.with_override("perturbations: " + "; ".join(problems))


def check_metrics(run: ProtocolRun, task: str, known: Any) -> None:
    """The protocol covers ``task`` and every metric it compares for it is one the audit computes
    (``known(key) -> bool``, the check vocabulary's test)."""
    protocol = run.protocol
    if task not in protocol.metrics:
        raise ConfigError(f"protocol {protocol.name} covers task types {sorted(protocol.metrics)}, not {task!r}")
    absent = [k for k in protocol.metrics[task] if not known(k)]
    if absent:
        raise ConfigError(f"protocol {protocol.name} compares metrics {absent} for task {task!r}, which no installed "
                          "plugin computes")
