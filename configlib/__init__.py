"""Ground floor: typed configuration loading (``pipeline.yaml`` -> dataclasses) and atomic file writes.

Imports nothing from the project; every other package may import it.
"""

from configlib.files import atomic_write_bytes, atomic_write_text
from configlib.loader import (
    ConfigError,
    apply_overrides,
    expand_env,
    from_mapping,
    read_yaml,
    require_resolved,
    save_resolved,
    to_dict,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "atomic_write_bytes",
    "atomic_write_text",
    "expand_env",
    "from_mapping",
    "read_yaml",
    "require_resolved",
    "save_resolved",
    "to_dict",
]
