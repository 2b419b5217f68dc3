"""Plugin-owned settings: each plugin validates its own section of the config file.

A plugin declares a pydantic model through the ``medaudit_settings`` hook; its section is
``plugins.<entry-point name>`` in the config file (``plugins.ood.knn_k``). Once plugins are
loaded, :func:`resolve_settings` validates every section with the core's rule (an unknown key is
an error naming it, as is a section no installed plugin declares), and hooks read the result
through :meth:`medaudit.config.Config.plugin_settings`.

Settings that lived in the core config before plugins had sections keep their old keys as
aliases. The table of aliases belongs to the plugins, not the core: a field names the core key
it replaces with ``json_schema_extra=legacy_key("audit.n_bins")``, and may only name a key the
core keeps for that purpose (:data:`medaudit.config.PLUGIN_ALIAS`). Setting both places to
different values is an error naming both. After resolution the old key mirrors the value in
use, so code reading ``config.audit.n_bins`` and results.json's ``config.audit.n_bins`` keep
working; the core's own uses of the bin count (``MetricContext.n_bins``, temperature scaling)
read it there, without naming the plugin that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from .config import PLUGIN_ALIAS, UNKNOWN_FIELD, Config, _Section, validation_error_lines
from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    from .plugin_manager import PluginManager

#: The ``json_schema_extra`` key by which a settings field names the core key it replaces.
LEGACY_KEY = "legacy_key"


class PluginSettings(_Section):
    """Base of a plugin's settings model: unknown keys are errors, assignments are validated.

    Subclassing it is optional (any pydantic model works; unknown keys are rejected either way),
    but it gives a plugin the core config's behaviour.
    """


def legacy_key(dotted: str) -> dict[str, Any]:
    """``json_schema_extra`` of a field that replaces the core key ``dotted`` (e.g. ``audit.n_bins``)."""
    return {LEGACY_KEY: dotted}


def settings_models(pm: PluginManager) -> dict[str, type[BaseModel]]:
    """Every plugin's settings model by plugin (entry-point) name, in registration order."""
    models: dict[str, type[BaseModel]] = {}
    for plugin, model in pm.call_each("medaudit_settings"):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise PluginError(f'plugin "{plugin}" returned {model!r} from medaudit_settings; '
                              "expected a pydantic model class (e.g. a medaudit.settings.PluginSettings subclass)")
        models[plugin] = model
    return models


def alias_slots() -> dict[str, bool]:
    """The core keys kept as aliases of plugin settings: dotted path → whether it is a whole section."""
    slots: dict[str, bool] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if info.json_schema_extra == PLUGIN_ALIAS:
                slots[prefix + name] = info.annotation is not Any  # a section is a mapping, a key is Any
            elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{name}.")

    walk(Config, "")
    return slots


def _aliases(models: dict[str, type[BaseModel]]) -> dict[str, tuple[str, str]]:
    """Legacy core key → ``(plugin, field)``, checked against the keys the core keeps for it."""
    slots = alias_slots()
    out: dict[str, tuple[str, str]] = {}
    for plugin, model in models.items():
        for field, info in model.model_fields.items():
            extra = info.json_schema_extra
            key = extra.get(LEGACY_KEY) if isinstance(extra, dict) else None
            if key is None:
                continue
            parent = key.rpartition(".")[0]
            if not (slots.get(key) is False or slots.get(parent) is True):
                raise PluginError(
                    f'plugin "{plugin}" declares its setting {field!r} as the alias of {key!r}, which is not a key the '
                    f"core keeps for plugin settings ({', '.join(f'{s}.*' if sec else s for s, sec in slots.items())})")
            if key in out:
                raise PluginError(f'plugins "{out[key][0]}" and "{plugin}" both declare a setting with the alias {key!r}; '
                                  "uninstall one")
            out[key] = (plugin, field)
    return out


def _get(config: Config, dotted: str) -> Any:
    """The value of a core alias key, None when the config does not set it."""
    node: Any = config
    for part in dotted.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    return node


def _set(config: Config, dotted: str, value: Any) -> None:
    """Set a core alias key: a field of a section, or a key of a section of aliases."""
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents[:-1]:
        node = getattr(node, part)
    if parents and not isinstance(getattr(node, parents[-1]), BaseModel):  # a section of aliases, maybe unset
        setattr(node, parents[-1], {**(getattr(node, parents[-1]) or {}), leaf: value})
    else:
        setattr(getattr(node, parents[-1]) if parents else node, leaf, value)


def _unknown(section: dict[str, Any], model: type[BaseModel]) -> list[str]:
    known = set(model.model_fields) | {i.alias for i in model.model_fields.values() if i.alias}
    return [k for k in section if k not in known]


def _alias_errors(config: Config, aliases: dict[str, tuple[str, str]], with_settings: str) -> list[str]:
    """Alias keys the config sets that no installed plugin claims."""
    errors = []
    for slot, is_section in alias_slots().items():
        value = _get(config, slot)
        if value is None:
            continue
        for key in ([f"{slot}.{k}" for k in value] if is_section else [slot]):
            if key in aliases:
                continue
            if is_section and any(k.startswith(slot + ".") for k in aliases):  # a plugin owns the section: a typo
                errors.append(f"  {key}: {UNKNOWN_FIELD}")
            else:
                errors.append(f"  {key}: no installed plugin reads this alias of a plugin setting "
                              f"(plugins with settings: {with_settings})")
    return errors


def resolve_settings(config: Config, pm: PluginManager) -> Config:
    """Validate every plugin's section and alias keys; store the settings on ``config`` (returned).

    Idempotent. Every problem is collected and raised as one :class:`ConfigError` (exit 2)
    before any output is written; a plugin whose settings declaration is itself wrong is a
    :class:`PluginError` naming it.
    """
    models = settings_models(pm)
    aliases = _aliases(models)
    with_settings = ", ".join(models) or "none"
    errors: list[str] = []
    for name in config.plugins:
        if name not in models:
            why = "is installed but declares no settings" if name in pm.infos else "is not installed"
            errors.append(f'  plugins.{name}: plugin "{name}" {why} (plugins with settings: {with_settings})')
    errors += _alias_errors(config, aliases, with_settings)

    resolved: dict[str, BaseModel] = {}
    for name, model in models.items():
        section = dict(config.plugins.get(name) or {})
        from_alias: dict[str, str] = {}  # field → the alias key its value came from, for error messages
        for key, (plugin, field) in aliases.items():
            old = _get(config, key)
            if plugin != name or old is None:
                continue
            if field in section and section[field] != old:
                errors.append(f"  {key}: set to {old!r}, but its new place plugins.{name}.{field} is set to "
                              f"{section[field]!r}; remove one of them")
            section[field] = old
            from_alias[field] = key
        unknown = _unknown(section, model)
        errors += [f"  plugins.{name}.{k}: {UNKNOWN_FIELD}" for k in unknown]

        def locate(loc: tuple[Any, ...]) -> str:  # used at once, so the loop's name and from_alias are current
            if not loc:
                return f"plugins.{name}"
            return ".".join([from_alias.get(str(loc[0]), f"plugins.{name}.{loc[0]}"), *map(str, loc[1:])])

        try:
            resolved[name] = model.model_validate({k: v for k, v in section.items() if k not in unknown})
        except ValidationError as err:
            errors += validation_error_lines(err, locate)
    if errors:
        raise ConfigError("\n".join([f"invalid configuration in {config._source}:", *errors]))

    config._plugin_settings = resolved
    config.plugins = {name: s.model_dump(mode="json") for name, s in resolved.items()}
    for key, (plugin, field) in aliases.items():
        _set(config, key, config.plugins[plugin][field])
    return config


def _plugins_model(models: dict[str, type[BaseModel]]) -> type[BaseModel]:
    """The ``plugins`` section as one model (for the JSON Schema), a field per plugin."""
    fields: dict[str, Any] = {f"p{i}": (model, Field(default_factory=model, alias=name))
                              for i, (name, model) in enumerate(models.items())}
    return create_model("Plugins", __base__=_Section, **fields)


def config_schema(pm: PluginManager) -> dict[str, Any]:
    """The JSON Schema of the config file, with every installed plugin's settings under ``plugins``."""
    section = _plugins_model(settings_models(pm))
    full = create_model("Config", __base__=Config, plugins=(section, Field(default_factory=section)))
    return full.model_json_schema()


def starter_plugins_section(pm: PluginManager) -> str:
    """The ``plugins:`` section of ``medaudit init``: every installed plugin's settings with defaults."""
    lines = ["plugins:                  # each plugin's settings, by its name in `medaudit plugins`"]
    for name, model in settings_models(pm).items():
        lines.append(f"  {name}:")
        defaults = model().model_dump(mode="json")
        for field, info in model.model_fields.items():
            value = yaml.safe_dump(defaults[field], default_flow_style=True).strip().removesuffix("...").strip()
            notes = [info.description] if info.description else []
            extra = info.json_schema_extra
            if isinstance(extra, dict) and LEGACY_KEY in extra:
                notes.append(f"alias: {extra[LEGACY_KEY]}")
            entry = f"    {field}: {value}"
            lines.append(f"{entry:<25} # {'; '.join(notes)}" if notes else entry)
    return "\n".join(lines) + "\n"
