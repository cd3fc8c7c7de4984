"""Loading and validating a workflow preset.

One validator serves both the Snakefile and the command line, so a bad key
is reported the same way everywhere: with its dotted path, before any job
runs. Schemas are package data in ``privbench/schemas/`` (one file per config
section, joined with ``$ref``), plus one per study section, handed in by
:func:`privbench.studies.validate`; defaults written in the schemas are filled in.
"""

from __future__ import annotations

import copy
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Callable

import yaml
from jsonschema import Draft202012Validator, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from privbench.paths import SCHEMA_DIR


class ConfigError(ValueError):
    """An invalid preset; the message names the offending key."""


def _schema_registry(schema_dir: Traversable, extra: dict[str, dict]) -> Registry:
    """Every schema by its file name: those of ``schema_dir`` and ``extra`` (name -> contents)."""
    schemas = {path.name: yaml.safe_load(path.read_text())
               for path in schema_dir.iterdir() if ".schema." in path.name}
    schemas.update(extra)
    return Registry().with_resources(
        (name, Resource.from_contents(contents, default_specification=DRAFT202012))
        for name, contents in sorted(schemas.items()))


def load_schema(name: str, schema_dir: Traversable = SCHEMA_DIR) -> dict:
    return yaml.safe_load((schema_dir / name).read_text())


def _with_defaults(validator_class):
    """A validator that writes schema defaults into the instance as it walks it."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _with_defaults(Draft202012Validator)


def _describe(error) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(known))
        where = f" under '{path}'" if path else " at the top level"
        return (
            f"unknown key {', '.join(repr(k) for k in unexpected)}{where}; "
            f"allowed keys: {', '.join(known)}"
        )
    if error.validator == "required":
        where = f"'{path}'" if path else "the top level"
        return f"{error.message} in {where}"
    return f"invalid value for '{path or '<top level>'}': {error.message}"


def validate(config: dict, schema_name: str = "config.schema.yaml",
             schema_dir: Traversable = SCHEMA_DIR, source: str = "config",
             sections: dict[str, dict] | None = None,
             extra_checks: Callable[[dict], list[str]] | None = None) -> dict:
    """Validate ``config`` in place (filling defaults) and return it.

    ``sections`` (experiment name -> the schema of its section) are the
    experiments a preset may list, and ``extra_checks`` returns further problems
    of the filled-in config: both come from the studies
    (:func:`privbench.studies.validate`). Raises ConfigError listing every
    problem, each with its dotted key path.
    """
    sections = sections or {}
    schema = copy.deepcopy(load_schema(schema_name, schema_dir))
    if schema_name == "config.schema.yaml":
        schema["properties"]["experiments"]["items"] = {"enum": list(sections)}
        schema["properties"].update({name: {"$ref": _section_id(name)} for name in sections})
    registry = _schema_registry(schema_dir, {_section_id(name): {"$id": _section_id(name), **section}
                                             for name, section in sections.items()})
    validator = _DefaultingValidator(schema, registry=registry)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ConfigError(f"{source} is invalid:\n{lines}")
    _check_cross_field_rules(config, source, extra_checks)
    return config


def _section_id(experiment: str) -> str:
    return f"{experiment}.schema.yaml"


def _check_cross_field_rules(config: dict, source: str, extra_checks) -> None:
    """Rules a JSON schema cannot express (relations between values)."""
    problems = []
    for name in config.get("experiments", []):
        if name not in config:
            problems.append(f"experiment '{name}' is listed in 'experiments' but has no '{name}' section")
    for name, section in config.items():
        if not isinstance(section, dict):
            continue
        cap, start = section.get("batch_cap"), section.get("batch_start")
        if cap is not None and start is not None and cap < start:
            problems.append(f"'{name}.batch_cap' ({cap}) is smaller than '{name}.batch_start' ({start})")
        mb = section.get("microbatch_size")
        if isinstance(mb, int) and start is not None:
            sizes = []
            b = start
            while b <= (cap or start):
                sizes.append(b)
                b *= 2
            bad = [b for b in sizes if b % mb]
            if bad:
                problems.append(
                    f"'{name}.microbatch_size' ({mb}) does not divide batch size(s) {bad}: "
                    "choose a microbatch size that divides every batch size of the sweep"
                )
    problems.extend(extra_checks(config) if extra_checks else [])
    if problems:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def read(path: str | Path) -> dict:
    """A preset file's contents, not yet validated."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None



