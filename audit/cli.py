"""The ``medaudit`` command line: a thin click layer over :mod:`medaudit.audit`.

Exit codes: 0 success; 1 a check failed (a ``--fail-on`` check, or ``perturbation:NAME ran`` for a
``--perturbation`` whose plugin failed in every scenario); 2 usage, config or input error; 3 an
internal error (a bug: please report it with ``--debug`` output). Errors are one line naming the
file, field or plugin; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .config import STARTER_CONFIG, Config, load_config
from .errors import MedauditError, PluginError
from .fastexit import exit_when_done
from .memory import tune_allocator
from .plugin_manager import PluginManager, catalogue_entry, get_plugin_manager
from .results import WarningRecord
from .settings import config_schema as settings_schema
from .settings import resolve_settings, starter_plugins_section

F = TypeVar("F", bound=Callable[..., Any])


def _warn(msg: str) -> None:
    click.echo(f"medaudit: warning: {msg}", err=True)


def handle_errors(func: F) -> F:
    """Turn medaudit errors into a one-line message and exit code 2 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except MedauditError as exc:
            if ctx.find_root().params.get("debug"):
                traceback.print_exc()
            click.echo(f"medaudit: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            # the reader of stdout went away (`medaudit perturbations | head`): end quietly, as Unix
            # tools do, with 128 + SIGPIPE; later writes and the final flush go to /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except KeyboardInterrupt as exc:
            # an audit's interrupt (medaudit.audit.AuditInterrupted) says what its cache kept
            click.echo(f"medaudit: {str(exc) or 'interrupted'}", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug in medaudit or a plugin: still one line unless --debug
            if ctx.find_root().params.get("debug"):
                traceback.print_exc()
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            click.echo(f"medaudit: internal error: {type(exc).__name__}: {first} "
                       "(run with --debug for the traceback and report it)", err=True)
            ctx.exit(3)

    return wrapper  # type: ignore[return-value]


def plugin_manager() -> PluginManager:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if "pm" not in root.meta:
        root.meta["pm"] = get_plugin_manager(warn=_warn)
    return root.meta["pm"]


class MedauditGroup(click.Group):
    """Adds sub-commands from plugins (``medaudit_register_commands``) once, lazily."""

    _plugins_added = False

    def _add_plugin_commands(self) -> None:
        if not self._plugins_added:
            self._plugins_added = True
            pm = get_plugin_manager(warn=lambda m: None)
            pm.hook.medaudit_register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._add_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd


@click.group(cls=MedauditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medaudit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Robustness audits of PyTorch medical-imaging classifiers."""


def _dotted(data: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` in a parsed config file, None where a level is missing."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


#: Config files ``run`` reads from the working directory when no ``--config`` is given, in this order.
DEFAULT_CONFIGS = (Path("medaudit.yaml"), Path("medaudit.toml"))


def _config_in_use(given: Path | None) -> Path | None:
    """``--config``, else the first of :data:`DEFAULT_CONFIGS` present (what ``medaudit init``
    writes, so a user who ran it is audited with it), else None."""
    if given is not None:
        return given
    return next((p for p in DEFAULT_CONFIGS if p.is_file()), None)


def _print_warnings(records: list[WarningRecord]) -> None:
    """The run's warnings on stderr, after its outputs: alerts first, one line each (they may
    invalidate the evidence), then the others grouped by plugin and kind, then a count."""
    if not records:
        return
    for w in records:
        if w.alert:
            _warn(w.message)
    groups: dict[tuple[str, str], list[WarningRecord]] = {}
    for w in records:
        if not w.alert:
            groups.setdefault((w.plugin or "medaudit", w.code), []).append(w)
    for (plugin, code), members in groups.items():
        click.echo(f"medaudit: warning: [{plugin}] {code}" + (f" ({len(members)})" if len(members) > 1 else "")
                   + ":", err=True)
        for w in members:
            click.echo(f"  {w.message}", err=True)
    click.echo(f"{len(records)} warning{'s' if len(records) != 1 else ''} (see Limitations in the report)", err=True)


def _baseline(path: Path | None, protocol: dict[str, Any] | None) -> dict[str, Any] | None:
    """``--baseline``: the baseline audit's results, refused when it ran under another protocol
    (its errors would have been measured under other shifts)."""
    if path is None:
        return None
    from .results import load_results

    baseline = load_results(path).model_dump(mode="json")
    theirs = baseline.get("protocol")
    # a non-conformant audit is comparable only with one that overrode exactly the same keys
    ident = (lambda p: None if p is None else (p["name"], p["sha256"], p.get("conformant", True),
                                               sorted(p.get("overrides", []))))
    if ident(theirs) != ident(protocol):
        def name(p: dict[str, Any] | None) -> str:
            return "no protocol" if p is None else (
                f"protocol {p['name']} (sha256 {p['sha256'][:12]}" + (")" if p.get("conformant", True) else
                                                                       f", not conformant: {'; '.join(p.get('overrides', []))})"))
        raise MedauditError(f"--baseline {path} was audited under {name(theirs)}, this audit under {name(protocol)}: "
                            "scores normalised by it would divide by errors measured under other shifts")
    return baseline


def _severities(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give severities as a comma-separated list of 1..5, e.g. 1,3,5") from None


@cli.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="Dataset: .npz, manifest folder or CSV.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help="YAML or TOML config file.")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), help="Output folder [medaudit-out].")
@click.option("--device", help="auto | cpu | cuda | cuda:N")
@click.option("--batch-size", type=int, help="Samples loaded and perturbed at once.")
@click.option("--model-batch-size", type=int, help="Samples per model call (fixes the model's numerics) [32].")
@click.option("--seed", type=int)
@click.option("--suite", "suites", multiple=True, help="Suite to run (repeatable); replaces the modality's defaults.")
@click.option("--perturbation", "perturbations", multiple=True, help="Perturbation to run (repeatable).")
@click.option("--severities", help="Comma-separated severities, e.g. 1,3,5.")
@click.option("--bootstrap", type=int, help="Bootstrap resamples for confidence intervals.")
@click.option("--workers", type=int, help="DataLoader worker processes.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast precision (default fp32).")
@click.option("--threads", help="CPU threads for torch: a number, or auto (the default: the dry run times the model at "
                                 "1 thread and at one per core and keeps the faster; printed with its reason).")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None,
              help="Channels-last memory format for the model and its inputs (default: audit.channels_last, "
                   "auto: on a CPU when the model gives the same outputs in it).")
@click.option("--save-predictions", is_flag=True, default=None, help="Also write predictions.npz.")
@click.option("--fail-on", "fail_on", multiple=True, help="Check that fails the audit, e.g. 'clean.accuracy<0.8'.")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), help="Write checks as JUnit XML.")
@click.option("--reference", "reference", type=click.Path(path_type=Path),
              help="In-distribution data to fit OOD detectors on (default: cross-fitted on the clean audit data).")
@click.option("--ood-data", "ood_data", multiple=True, type=click.Path(path_type=Path),
              help="External OOD data set, scored as scenario ood:<name> (repeatable).")
@click.option("--subgroup", "subgroup", multiple=True, help="Metadata column to stratify by (repeatable).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module (runs code from the file).")
@click.option("--resume", is_flag=True, help="Reuse completed shards of an interrupted run of the same audit.")
@click.option("--cache-dir", "cache_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where completed units of work are kept for --resume [OUT/.medaudit-cache]; may be shared storage.")
@click.option("--shard-size", "shard_size", type=click.IntRange(min=1),
              help="Samples per unit of work [2048]; results do not depend on it.")
@click.option("--pdf", is_flag=True, help="Also print report.html to report.pdf (needs Chromium).")
@click.option("--protocol", "protocol", help="Run under a frozen audit protocol (`medaudit protocols` lists them), "
                                             "e.g. mri-v1; flags that contradict it are an error.")
@click.option("--protocol-override", is_flag=True, default=None,
              help="Keep flags and config keys that contradict --protocol; the audit is marked not protocol-conformant.")
@click.option("--executor", type=click.Choice(["local", "ray"]),
              help="Who runs the units of work: this process (local, the default) or Ray actors (pip install "
                   "'medaudit[ray]'); results.json is the same.")
@click.option("--ray-address", help="local (a private cluster here, the default), auto or HOST:PORT of a Ray head.")
@click.option("--ray-workers", type=click.IntRange(min=1), help="Ray actors [the cluster's GPUs or CPUs per worker].")
@click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0), help="GPUs per Ray actor (fractions share one) [1 on a GPU audit, else 0].")
@click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True), help="CPUs per Ray actor [1].")
@click.option("--model-card", "model_card", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the audit as a Model Card Toolkit JSON document (e.g. model-card.json); the report "
                   "links it.")
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path, dir_okay=False),
              help="A baseline model's results.json (same protocol): the denominator of robustness.mce_vs_baseline, "
                   "relative_mce_vs_baseline, be and rbe.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@handle_errors
def run(model: Path, data: Path, config_path: Path | None, out: Path | None, device: str | None,
        batch_size: int | None, model_batch_size: int | None, seed: int | None, suites: tuple[str, ...], perturbations: tuple[str, ...],
        severities: str | None, bootstrap: int | None, workers: int | None, precision: str | None, threads: str | None,
        channels_last: bool | None,
        save_predictions: bool | None, fail_on: tuple[str, ...], junit: Path | None, reference: Path | None,
        ood_data: tuple[Path, ...], subgroup: tuple[str, ...], trust_pickle: bool, resume: bool,
        cache_dir: Path | None, shard_size: int | None, pdf: bool, protocol: str | None, protocol_override: bool | None, executor: str | None, ray_address: str | None,
        ray_workers: int | None, ray_gpus_per_worker: float | None, ray_cpus_per_worker: float | None,
        model_card: Path | None, baseline_path: Path | None, quiet: bool) -> None:
    """Audit MODEL on --data: clean and perturbed scenarios, metrics with CIs, report.

    Without --config, ./medaudit.yaml (then ./medaudit.toml) is read when present; the config
    used is printed first.
    """
    from .audit import run_audit
    from .checks import describe_check
    from .config import read_config_file

    if pdf:
        from .pdf import find_chromium

        if find_chromium() is None:
            raise MedauditError("--pdf needs Chromium or Google Chrome on PATH (or MEDAUDIT_CHROMIUM)")
    config_path = _config_in_use(config_path)
    click.echo(f"config: {config_path if config_path else 'none (defaults)'}", err=True)
    file_data = read_config_file(config_path) if config_path else {}
    file_checks = file_data.get("checks", [])
    # --subgroup extends the file's attributes, at the key the file sets them: the setting or its alias
    attributes_key = "subgroups.attributes"
    if _dotted(file_data, "plugins.subgroups.attributes") is not None:
        attributes_key = "plugins.subgroups.attributes"
    file_attributes = _dotted(file_data, attributes_key) or []
    overrides: dict[str, Any] = {
        "output.dir": str(out) if out else None, "audit.device": device, "audit.batch_size": batch_size,
        "audit.model_batch_size": model_batch_size,
        "audit.seed": seed, "audit.severities": _severities(severities), "audit.bootstrap": bootstrap,
        "audit.num_workers": workers, "audit.precision": precision, "audit.threads": threads,
        "audit.channels_last": channels_last, "output.save_predictions": save_predictions,
        "output.model_card": str(model_card) if model_card else None,
        "output.cache_dir": str(cache_dir) if cache_dir else None, "audit.shard_size": shard_size,
        "audit.executor": executor, "audit.ray.address": ray_address, "audit.ray.workers": ray_workers,
        "audit.ray.gpus_per_worker": ray_gpus_per_worker, "audit.ray.cpus_per_worker": ray_cpus_per_worker,
        "checks": list(file_checks) + list(fail_on) if fail_on else None,
    }
    if suites:
        overrides["audit.suites"] = list(suites)
    if perturbations:
        overrides["audit.perturbations"] = list(perturbations)
    if subgroup:
        overrides[attributes_key] = list(dict.fromkeys([*file_attributes, *subgroup]))
    pm = plugin_manager()
    run_protocol = None
    protocol = protocol or file_data.get("protocol")
    if protocol:
        from .protocols import resolve_protocol

        allow = bool(protocol_override or file_data.get("protocol_override"))
        run_protocol, overrides = resolve_protocol({n: p for n, (_, p) in pm.protocols().items()}, protocol, file_data,
                                                   overrides, allow_override=allow, source=str(config_path))
        overrides["protocol_override"] = allow
    if perturbations and not suites:
        overrides["audit.suites"] = []  # only what was named
        if run_protocol is not None and "audit.suites" not in run_protocol.overrides:
            run_protocol = run_protocol.with_override("audit.suites")  # the protocol's suites are dropped too
    config = resolve_settings(load_config(config_path, overrides), pm)
    baseline = _baseline(baseline_path, run_protocol.record() if run_protocol else None)
    command = "medaudit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    results = run_audit(pm, model, data, config, command=command, trust_pickle=trust_pickle,
                        resume=resume, junit=junit, reference_path=reference, ood_paths=ood_data,
                        progress=not quiet, log=log, config_path=config_path, required_columns=subgroup,
                        protocol=run_protocol, baseline=baseline, pdf=pdf)
    out_dir = config.output.dir
    click.echo(f"report:  {out_dir / 'report.html'}")
    click.echo(f"results: {out_dir / 'results.json'}")
    if (out_dir / "tables").is_dir() and config.output.report:
        click.echo(f"tables:  {out_dir / 'tables'}")
    if pdf and config.output.report:
        click.echo(f"pdf:     {out_dir / 'report.pdf'}")
    if config.output.model_card is not None:
        click.echo(f"model card: {config.output.model_card}")
    if results.protocol is not None:
        p = results.protocol
        click.echo(f"protocol: {p['name']} (sha256 {p['sha256'][:12]}) "
                   + ("conformant" if p["conformant"] else f"NOT conformant: overridden {'; '.join(p['overrides'])}"))
    # the verdict first: a passing check must not read as a clean bill of health (see medaudit.verdict)
    click.echo(f"verdict: {results.verdict.get('headline', '')}")
    for c in results.checks:
        click.echo(describe_check(c.model_dump()))
    _print_warnings(results.warning_records)
    if any(not c.passed for c in results.checks):
        sys.exit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def plugins(as_json: bool) -> None:
    """List plugins: distribution, version, hook API and what each contributes."""
    pm = plugin_manager()
    contrib = pm.contributions(resolve_settings(Config(), pm))
    rows = [{"name": i.name, "distribution": i.distribution, "version": i.version, "api_version": i.api_version,
             "module": i.module, "contributes": contrib.get(i.name, {})} for i in pm.infos.values()]
    failures = [{"name": f.name, "distribution": f.distribution, "error": f.error} for f in pm.failures]
    problems = [p.message for p in pm.problems]
    try:
        problems += pm.suite_warnings(pm.perturbations())
    except PluginError as exc:  # two plugins providing one name: this listing is where to find out
        problems.append(str(exc))
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": failures, "warnings": problems}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  ({r['distribution']} {r['version']}, hook API {r['api_version']})")
        for kind, names in r["contributes"].items():
            click.echo(f"    {kind}: {', '.join(names)}")
    for f in failures:
        click.echo(f"FAILED {f['name']} ({f['distribution']}): {f['error']}")
    for message in problems:
        click.echo(f"WARNING {message}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def perturbations(as_json: bool) -> None:
    """List every perturbation: name, suite, modalities, dims, severity parameters and providing plugin."""
    pm = plugin_manager()
    catalogue = pm.perturbations()
    items = [catalogue_entry(plugin, cls) for name, (plugin, cls) in sorted(catalogue.items())]
    for message in pm.suite_warnings(catalogue):
        _warn(message)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    for it in items:
        dims = "/".join(f"{d}D" for d in it["dims"])
        click.echo(f"{it['name']:<28} {it['suite']:<10} {','.join(it['modalities']):<22} {dims:<6} {it['summary']} "
                   f"[plugin {it['plugin']}]")
        for level, params in it["severities"].items():
            click.echo(f"    {level}: " + ", ".join(f"{k}={v}" for k, v in params.items()))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: every protocol's full content.")
@handle_errors
def protocols(as_json: bool) -> None:
    """List the frozen audit protocols: name, SHA-256, what each pins and the plugin publishing it."""
    found = plugin_manager().protocols()
    if as_json:
        click.echo(json.dumps([{**p.content(), "sha256": p.sha256, "plugin": plugin}
                               for name, (plugin, p) in sorted(found.items())], indent=2, ensure_ascii=False))
        return
    for name, (plugin, p) in sorted(found.items()):
        click.echo(f"{name}  sha256 {p.sha256}  [plugin {plugin}]")
        click.echo(f"    {p.description}")
        click.echo(f"    modality {p.modality}; {len(p.perturbations)} perturbations ({', '.join(p.suites)}) at severities "
                   f"{','.join(map(str, p.severities))}; seed {p.seed}; bootstrap {p.bootstrap} at {p.confidence:g}; "
                   f"detectors {', '.join(p.detectors)}; margins "
                   + ", ".join(f"{k} {v:g}" for k, v in sorted(p.margins.items())))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), default="medaudit.yaml")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init(path: Path, force: bool) -> None:
    """Write a commented starter config (default medaudit.yaml), with every plugin's settings."""
    if path.exists() and not force:
        raise MedauditError(f"{path} already exists; use --force to overwrite")
    path.write_text(STARTER_CONFIG + "\n" + starter_plugins_section(plugin_manager()), encoding="utf-8")
    click.echo(f"wrote {path}")


@cli.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True,
              help="Folder to create the package in.")
@handle_errors
def new_plugin(name: str, directory: Path) -> None:
    """Scaffold a plugin package NAME (pyproject, module, tests, README) that passes its tests."""
    from .scaffold import scaffold_plugin

    root = scaffold_plugin(name, directory)
    click.echo(f"wrote {root}")
    click.echo(f"next: pip install -e '{root}[test]' && pytest {root / 'tests'}")


@cli.command("config-schema")
@handle_errors
def config_schema() -> None:
    """Print the JSON Schema of the config file, each installed plugin's settings under plugins."""
    click.echo(json.dumps(settings_schema(plugin_manager()), indent=2))


@cli.command()
@click.argument("results_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Report file [beside results].")
@click.option("--pdf", is_flag=True, help="Also print the report to PDF (needs Chromium).")
@handle_errors
def report(results_path: Path, output: Path | None, pdf: bool) -> None:
    """Re-render the HTML report (and its tables/*.csv beside it) from a results.json alone."""
    from .report import render_report_files
    from .writing import write_atomic
    from .results import load_results

    results = load_results(results_path)
    target = output or results_path.with_name("report.html")
    rendered = render_report_files(results, plugin_manager())
    for name, text in rendered.tables.items():
        write_atomic(target.parent / "tables" / name, text.encode())
    write_atomic(target, rendered.html.encode())
    click.echo(f"report: {target}")
    if rendered.tables:
        click.echo(f"tables: {target.parent / 'tables'} ({len(rendered.tables)} CSV files)")
    if pdf:
        from .pdf import html_to_pdf

        click.echo(f"pdf: {html_to_pdf(target, target.with_suffix('.pdf'))}")
    if results.integrity is not None and target.parent.resolve() == results_path.parent.resolve():
        from .integrity import seal

        # the re-rendered report equals the sealed one (medaudit verify checks that); a new PDF joins the seal
        folder = results_path.parent  # sealed files outside it (a model card written elsewhere) stay sealed
        seal(folder, extra=[folder / rel for rel in results.integrity.get("files", {}) if rel.startswith("../")])


@cli.command("compare")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the comparison as HTML.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Tolerated worsening per metric (in the metric's units), of every audit against the first.")
@click.option("--require-significant", is_flag=True,
              help="Count only significant worsenings (paired test where predictions allow, else disjoint CIs).")
@click.option("--allow-different-data", is_flag=True,
              help="Compare audits of different data or tasks anyway (refused otherwise: exit 2). Audits under "
                   "different protocols are always refused.")
@handle_errors
def compare_cmd(paths: tuple[Path, ...], output: Path | None, max_drop: float, require_significant: bool,
                allow_different_data: bool) -> None:
    """Compare audits: OLD NEW (model v1 vs v2), or a baseline and several others (A B C ...).

    Prints the protocol they share, a leaderboard, the paired tests (when predictions.npz lies
    beside each results.json), then the regressions against the first audit; the HTML (-o)
    lists everything. Exits 1 when any audit worsened against the first by more than --max-drop,
    2 when the audits cannot be compared.
    """
    from .compare import SUMMARY_LINES, compare_audits, console_lines, describe, render_audits
    from .writing import write_atomic

    if len(paths) < 2:
        raise click.UsageError(f"compare needs at least two results.json files (the first is the baseline), "
                               f"got {len(paths)}")
    result = compare_audits(paths, max_drop, require_significant=require_significant,
                            allow_different_data=allow_different_data)
    labels = result.labels
    two = len(paths) == 2
    for k, pair in enumerate(result.pairs, start=1):  # first, so that no reader of the lines below misses it
        if pair.mismatch:
            click.echo(f"warning: {'' if two else f'{labels[0]} vs {labels[k]}: '}{'; '.join(pair.mismatch)}; compared "
                       "anyway (--allow-different-data): differences mix the models with the change of data")
    if output:
        write_atomic(output, render_audits(result).encode())
        click.echo(f"comparison: {output}")
    for k, pair in enumerate(result.pairs, start=1):
        who = "" if two else f"{labels[k]}: "
        if pair.settings:
            click.echo(f"note: {who}settings differ ({'; '.join(pair.settings)}): comparable, but they shape the numbers")
        if pair.unmatched:
            click.echo(f"note: {who}{pair.unmatched}")
    for line in console_lines(result, output):
        click.echo(line)

    def regression_lines(regressions: list[Any], indent: str) -> None:
        """The worst regressions, then how many more (all of them in the HTML)."""
        for c in regressions[:SUMMARY_LINES]:
            click.echo(f"{indent}regression: {describe(c)}")
        if len(regressions) > SUMMARY_LINES:
            click.echo(f"{indent}... and {len(regressions) - SUMMARY_LINES} more"
                       + (f" (all in {output})" if output else " (-o FILE lists them all)"))

    if two:
        pair = result.pairs[0]
        regressions = pair.regressions
        regression_lines(regressions, "")
        click.echo(f"{len(pair.improvements)} improvement(s) beyond {max_drop}"
                   + (f", {pair.best_improvement}" if pair.best_improvement else ""))
        click.echo(f"{len(regressions)} regression(s) beyond {max_drop}")
    else:
        for k, pair in enumerate(result.pairs, start=1):
            regressions = pair.regressions
            click.echo(f"{labels[k]} {paths[k]} vs baseline {labels[0]}: {len(regressions)} regression(s), "
                       f"{len(pair.improvements)} improvement(s) beyond {max_drop}")
            regression_lines(regressions, "  ")
        click.echo(f"{len(result.regressed)} of {len(result.pairs)} audit(s) regress against the baseline {labels[0]} "
                   f"beyond {max_drop}")
    if result.has_regression:
        sys.exit(1)


@cli.command()
@click.argument("input_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("-p", "--perturbation", required=True, help="Perturbation name, e.g. mri.motion.")
@click.option("-s", "--severity", type=click.IntRange(0, 5), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--dims", type=click.IntRange(2, 3),
              help="Spatial dimensions of the image; needed for a (D, H, W) .npy volume, which is otherwise read as (C, H, W).")
@handle_errors
def perturb(input_path: Path, perturbation: str, severity: int, seed: int, output: Path, dims: int | None) -> None:
    """Apply one perturbation to one image or volume (.npy, .png, .nii/.nii.gz)."""
    from .imagefile import perturb_file

    catalogue = plugin_manager().perturbations()
    if perturbation not in catalogue:
        raise MedauditError(f"unknown perturbation {perturbation!r}; `medaudit perturbations` lists them")
    perturb_file(input_path, output, catalogue[perturbation][1], severity, seed, dims)
    click.echo(f"wrote {output}")


@cli.command()
@click.option("--data", "data", required=True, type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default="preview.png", show_default=True)
@click.option("--sample", type=int, default=0, show_default=True, help="Index of the sample to show.")
@click.option("--suite", "suites", multiple=True)
@click.option("--perturbation", "perturbations", multiple=True)
@click.option("--seed", type=int)
@handle_errors
def preview(data: Path, config_path: Path | None, output: Path, sample: int, suites: tuple[str, ...],
            perturbations: tuple[str, ...], seed: int | None) -> None:
    """Render a grid: rows = perturbations, columns = severities 0..5, for one sample."""
    from .audit import open_dataset
    from .preview import grid_png_bytes
    from .writing import write_atomic
    from .runner import plan_scenarios
    from .task import bind_task

    overrides: dict[str, Any] = {"audit.seed": seed}
    if suites:
        overrides["audit.suites"] = list(suites)
    if perturbations:
        overrides["audit.perturbations"] = list(perturbations)
        if not suites:
            overrides["audit.suites"] = []
    pm = plugin_manager()
    config = resolve_settings(load_config(config_path, overrides), pm)
    bind_task(config, pm.tasks())
    dataset = open_dataset(pm, data, config)
    if not 0 <= sample < len(dataset):
        raise MedauditError(f"--sample {sample} is out of range; {data} has {len(dataset)} samples")
    _, chosen = plan_scenarios(config, pm.perturbations())
    image, *_ = dataset[sample]
    write_atomic(output, grid_png_bytes(image, [type(p) for _, p in sorted(chosen.items())], config.audit.seed))
    click.echo(f"wrote {output}")


@cli.command("verify")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@handle_errors
def verify_cmd(out_dir: Path) -> None:
    """Check that an audit's output folder is unaltered: exit 0 verified, 1 altered, 2 not an audit folder.

    Recomputes the SHA-256 hashes results.json's integrity record holds (its own canonical content
    and every file the audit wrote), looks for files added since, and re-renders the report from
    results.json to compare it with report.html and tables/*.csv byte for byte (docs/report.md).
    """
    from .integrity import summary, verify

    problems = verify(out_dir, plugin_manager())
    if problems:
        for line in problems:
            click.echo(f"mismatch: {line}")
        click.echo(f"NOT verified: {len(problems)} mismatch(es) in {out_dir}")
        sys.exit(1)
    click.echo(summary(out_dir))


def main() -> None:
    """The console entry point (``medaudit`` and ``python -m medaudit.cli``).

    The process is the command's own, so the C allocator is tuned for an audit
    (:func:`medaudit.memory.tune_allocator`), and a finished command ends the process without the
    interpreter's teardown (:mod:`medaudit.fastexit`).
    """
    tune_allocator()
    try:
        cli(prog_name="medaudit")
    except SystemExit as exc:
        exit_when_done(exc.code)
        raise


if __name__ == "__main__":
    main()
