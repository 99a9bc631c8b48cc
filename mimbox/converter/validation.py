"""Whether a configuration can run, every problem named by its config key: its own values
(mimbox.config.Config.problems), its destination rules as the policy parses them (mimbox.converter.safety),
and every value the core gets, against the core's layout (mimbox.converter.synplan). In a module of its own,
above the three, so that none of them needs another above it."""
from __future__ import annotations

from mimbox.config import Config
from mimbox.converter.safety import parse_destination
from mimbox.converter.synplan import core_config_problems


def problems(cfg: Config) -> list[tuple[str, str]]:
    """Every inconsistency of `cfg`, as (key, message); the key names the config file's entry."""
    out = cfg.problems()
    if not out:       # every value the core gets fits its field (the generated layout decides)
        out += core_config_problems(cfg)
    for key, texts, allow in (("safety.deny_dst", cfg.safety.deny_dst, False),
                              ("safety.allow_dst", cfg.safety.allow_dst, True)):
        for text in texts:
            try:
                parse_destination(text, allow)
            except ValueError as e:
                out.append((key, str(e)))
    return out


def validate(cfg: Config) -> Config:
    """`cfg`, or ValueError naming every inconsistency (see problems())."""
    found = problems(cfg)
    if found:
        raise ValueError("; ".join(msg for _, msg in found))
    return cfg
