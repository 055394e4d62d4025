"""Stage 1: upstream registry and extract-features."""

from .extract import ExtractConfig, ExtractStats, extract_features, parse_layers  # noqa: F401
from .verify import VerifyReport, verify_cache  # noqa: F401
