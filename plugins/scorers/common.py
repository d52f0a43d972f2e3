"""Kept for imports written before ``epp.plugin``: the helpers live in ``epp.scheduling.params``."""

from epp.scheduling.params import (  # noqa: F401
    DEFAULT_SCORER_STALENESS,
    check_bool,
    check_duration,
    check_float,
    check_int,
    check_mapping,
    check_str,
    fresh_mask,
    min_max_inverse,
)
