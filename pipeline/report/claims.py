"""The paper's claims as data: ``claims.yaml`` beside this module (read by the page and by the verdict table)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
PAGE_TEMPLATE = Path(__file__).with_name("page.md.j2")


@cache
def load_claims() -> dict[str, Any]:
    """``{"sections": [{key, title, paper}], "claims": [{id, section, where, claim, paper, reads, rule}]}``."""
    return yaml.safe_load(CLAIMS_FILE.read_text(encoding="utf-8"))
