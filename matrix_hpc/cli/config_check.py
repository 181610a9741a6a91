"""Composition of the Hydra config with errors a user can act on.

Hydra's own messages for a mistyped key ("Key 'x' is not in struct") do not
list what is valid; this composes the config first and, on failure, names the
key and the valid choices.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


def compose(overrides: list[str], conf_dir: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from matrix_hpc.config.schema import register_configs

    plain = [o for o in split_flags(overrides)[1] if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    plain = select_registered_workflow(plain, conf_dir)
    errors = (HydraException, OmegaConfBaseException, ValueError)

    def checked() -> DictConfig:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=plain)
                _check_mandatory(cfg)
                OmegaConf.to_object(cfg)  # runs the schemas' __post_init__ cross-field checks
                return cfg
        finally:
            GlobalHydra.instance().clear()

    # First with only the selected workflow's schema (the others' imports cost a run's start
    # 0.15 s); should that fail, with every schema, so that any error is the full config's.
    selected = selected_workflow(plain, conf_dir)
    if selected is not None:
        register_configs(selected)
        try:
            return checked()
        except errors:
            pass
    register_configs()
    try:
        return checked()
    except errors as e:
        raise ConfigError(explain(e, conf_dir, plain)) from e


def selected_workflow(overrides: list[str], conf_dir: str) -> str | None:
    """The workflow these overrides select (the last ``workflow=`` one, else the
    default in config.yaml), by the ``<name>_schema`` its yaml extends; None when
    that cannot be told from the files (a guess only narrows what is registered
    first: :func:`compose` retries with everything)."""
    from pathlib import Path

    import yaml

    def defaults_of(path: Path) -> list[Any]:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return []
        return list(loaded.get("defaults") or []) if isinstance(loaded, dict) else []

    choice = None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "workflow":
            choice = value
    if choice is None:
        choice = next((d["workflow"] for d in defaults_of(Path(conf_dir) / "config.yaml")
                       if isinstance(d, dict) and "workflow" in d), None)
    if not isinstance(choice, str) or not choice:
        return None
    if choice.endswith("_schema"):
        return choice.removesuffix("_schema")
    schemas = [d for d in defaults_of(Path(conf_dir) / "workflow" / f"{choice}.yaml")
               if isinstance(d, str) and d.endswith("_schema")]
    return schemas[0].removesuffix("_schema") if len(schemas) == 1 else None


#: Hydra's own command-line flags that take a value.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def select_registered_workflow(overrides: list[str], conf_dir: str) -> list[str]:
    """``workflow=NAME`` for a registered workflow without a yaml file in
    conf/workflow/ (e.g. one of the user's) selects its schema directly."""
    from pathlib import Path

    from matrix_hpc.runtime.workflow import workflow_names

    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "workflow" and value and not (Path(conf_dir) / "workflow" / f"{value}.yaml").exists() \
                and value in workflow_names():
            o = f"workflow={value}_schema"
        out.append(o)
    return out


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags, config overrides)."""
    flags, overrides = [], []
    it = iter(args)
    for a in it:
        if a in _FLAGS_WITH_VALUE:
            flags += [a, next(it, "")]
        elif a.startswith("-"):
            flags.append(a)
        else:
            overrides.append(a)
    return flags, overrides


def _check_mandatory(cfg: DictConfig) -> None:
    from omegaconf import MissingMandatoryValue

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MissingMandatoryValue(f"missing value for {', '.join(missing)}; set it on the command line, "
                                    f"e.g. {missing[0]}=...")


def explain(error: BaseException, conf_dir: str, overrides: list[str] | None = None) -> str:
    """A one-line message for a config error. ``overrides``: the command line's, whose
    group choices (``workflow=generate``) decide which keys are listed as valid."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    text = "\n".join(str(e) for e in chain)
    m = re.search(r"Key '([^']+)' (?:is not in struct|not in '\w+')", text)
    full = re.search(r"full_key: (\S+)", text)
    if m:
        key = full.group(1) if full else m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        where = f" in {parent!r}" if parent else ""
        valid = _valid_keys(parent, conf_dir, overrides or [])
        return f"unknown config key '{key}'; valid keys{where}: {', '.join(valid)}"
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        group = m.group(1).split("/")[0]
        name = m.group(1).split("/")[-1]
        return f"unknown {group} '{name}'; valid choices for {group}: {', '.join(_options(group, conf_dir))}"
    m = re.search(r"(Invalid value '[^']*', expected one of \[[^\]]*\]"
                  r"|Value '[^']*' of type '\w+' could not be converted to \w+)", text)
    if m and full:
        return f"bad value for {full.group(1)}: {m.group(1)}"
    return str(chain[-1]).split("\n    full_key")[0].strip()


def _valid_keys(parent: str, conf_dir: str, overrides: list[str]) -> list[str]:
    groups = [o for o in overrides if "=" in o and "." not in o.partition("=")[0]]  # the choices, not the values
    try:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            node: Any = hydra_compose(config_name="config", overrides=groups)
        for part in filter(None, parent.split(".")):
            node = node[part]
        return sorted(str(k) for k in node.keys())
    except Exception:
        return ["(could not list)"]


def _options(group: str, conf_dir: str) -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
