"""Peak resident memory of each phase of one ``medaudit run``, sampled in-process.

``benchmarks/overhead.py`` reports each process's peak; this script says which phase reached it.
It runs the ``medaudit`` command in this process on the example model and ``N`` tiled example
patches (``overhead.make_data``) with the example config (loader batches of 200) and model
chunks of ``--model-batch-size``, samples the resident set size every 5 ms on a thread (Linux
``/proc/self/statm``), and prints, for each phase that ``results.json`` ``timing.phases`` names,
its seconds, its peak and the resident size when it ended. The command's allocator settings
(``medaudit.memory.tune_allocator``) apply, as in a real run.

Usage::

    python benchmarks/memory.py --n 10000
    python benchmarks/memory.py --n 30000 --perturbations 5 --severities 1,3
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from overhead import ROOT, make_data

from medaudit import timing
from medaudit.cli import cli
from medaudit.config import load_config
from medaudit.memory import release_free_memory, tune_allocator
from medaudit.plugin_manager import get_plugin_manager
from medaudit.runner import plan_scenarios

PAGE = 4096


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakSampler:
    """The largest resident size seen since the last :meth:`reset`, sampled on a daemon thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak = resident_mib()
        self.interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, resident_mib())
            time.sleep(self.interval)

    def reset(self) -> float:
        peak, self.peak = self.peak, resident_mib()
        return max(peak, self.peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="samples")
    ap.add_argument("--perturbations", type=int, default=5, help="the first K MRI-default perturbations")
    ap.add_argument("--severities", default="1,3")
    ap.add_argument("--model-batch-size", type=int, default=32,
                    help="samples per model call (32: the default; overhead.py passes its --batch-size, 200)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args)


def run(tmp: Path, args: argparse.Namespace) -> None:
    data = make_data(tmp, args.n, 48)
    cfg = tmp / "config.yaml"
    cfg.write_text((ROOT / "examples" / "mni-patches.yaml").read_text()
                   .replace('checks:\n  - "clean.accuracy<0.9"\n', "checks: []\n"))
    _, chosen = plan_scenarios(load_config(cfg), get_plugin_manager(warn=lambda m: None).perturbations())
    command = ["run", str(ROOT / "examples" / "model.pt"), "--data", str(data), "--config", str(cfg),
               "--out", str(tmp / "out"), "--quiet", "--severities", args.severities,
               "--model-batch-size", str(args.model_batch_size)]
    for name in sorted(chosen)[: args.perturbations]:
        command += ["--perturbation", name]
    n_scenarios = 1 + args.perturbations * len(args.severities.split(","))
    print(f"# example model, N = {args.n}, {n_scenarios} scenarios, loader batches of 200 (the example config), "
          f"model chunks of {args.model_batch_size}; resident MiB per phase")
    print(f"{'phase':<12} {'seconds':>8} {'peak':>7} {'at end':>7}")

    tune_allocator()  # as the medaudit entry point does
    release_free_memory()  # the data generation's pages
    sampler = PeakSampler()
    lap = timing.PhaseClock.lap

    def reporting_lap(self: timing.PhaseClock, name: str) -> None:
        before = self.seconds.get(name, 0.0)
        lap(self, name)
        print(f"{name:<12} {self.seconds[name] - before:>8.2f} {sampler.reset():>7.0f} {resident_mib():>7.0f}", flush=True)

    timing.PhaseClock.lap = reporting_lap  # type: ignore[method-assign]
    cli.main(command, standalone_mode=False)
    # after the last phase: rendering the report and writing the outputs
    print(f"{'report':<12} {'':>8} {sampler.reset():>7.0f} {resident_mib():>7.0f}")


if __name__ == "__main__":
    main()
