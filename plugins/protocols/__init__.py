"""The built-in frozen audit protocols: ``mri-v1``, ``ct-v1``, ``xray-v1`` and ``generic-v1``.

Each is a JSON file beside this module (:class:`medaudit.protocols.Protocol`): the modality's
suite plus the intensity and geometry suites, every perturbation with its parameters at
severities 1-5, seed 0, 1000 bootstrap resamples at 95 % confidence, six detectors, the metrics
compared per task type and the breaking-point margins. A shipped file never changes (the tests
pin each hash); a change is a new file with the next version in its name.
"""

from __future__ import annotations

from pathlib import Path

from medaudit import hookimpl
from medaudit.protocols import Protocol, load_protocol_file

MEDAUDIT_API_VERSION = 1


@hookimpl
def medaudit_protocols() -> list[Protocol]:
    return [load_protocol_file(path) for path in sorted(Path(__file__).parent.glob("*.json"))]
