"""The training flags generated from ``LTNetConfig``: one flag per hyperparameter, so a default
lives in ``config.py`` and nowhere else; precedence preset < profile < ``--config`` JSON < flags.
"""
from __future__ import annotations

import dataclasses
import typing

from absl import flags

from ltnet_tf.config import PRESETS, PROFILES, ConfigError, LTNetConfig

_RESOLVED_FIELDS = ("atlas_shape", "label_ids")  # set from the data, not by flags


def define_config_flags(flag_values: flags.FlagValues) -> None:
    hints = typing.get_type_hints(LTNetConfig)
    defaults = LTNetConfig()
    for f in dataclasses.fields(LTNetConfig):
        if f.name in _RESOLVED_FIELDS:
            continue
        default = getattr(defaults, f.name)
        text = f"{f.metadata['help']} (default: {default})"
        hint = hints[f.name]
        if hint is bool:
            flags.DEFINE_bool(f.name, None, text, flag_values=flag_values)
        elif hint is int:
            flags.DEFINE_integer(f.name, None, text, flag_values=flag_values)
        elif hint is float:
            flags.DEFINE_float(f.name, None, text, flag_values=flag_values)
        elif hint is str:
            flags.DEFINE_string(f.name, None, text, flag_values=flag_values)
        else:
            flags.DEFINE_list(f.name, None, text + " Comma-separated integers.",
                              flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> LTNetConfig:
    config = LTNetConfig().replace(**PRESETS[flag_values.preset],
                                   **PROFILES[flag_values.profile])
    if flag_values.config:
        file_config = LTNetConfig.load(flag_values.config).to_dict()
        config = config.replace(**{k: v for k, v in file_config.items() if k not in _RESOLVED_FIELDS})
    changes = {}
    for f in dataclasses.fields(LTNetConfig):
        if f.name in _RESOLVED_FIELDS or flag_values[f.name].value is None:
            continue
        value = flag_values[f.name].value
        if isinstance(value, list):
            try:
                value = [int(v) for v in value]
            except ValueError:
                raise ConfigError(f"--{f.name} must be comma-separated integers, "
                                  f"got {','.join(value)!r}") from None
        changes[f.name] = value
    return config.replace(**changes)


def given_fields(fv: flags.FlagValues) -> set:
    """Config fields the user asked for: explicit flags, the --config file, an explicit --preset."""
    given = {f.name for f in dataclasses.fields(LTNetConfig)
             if f.name not in _RESOLVED_FIELDS and fv[f.name].present}
    if fv.config:
        given |= set(LTNetConfig.load(fv.config).to_dict()) - set(_RESOLVED_FIELDS)
    if fv["preset"].present:
        given |= set(PRESETS[fv.preset])
    return given
