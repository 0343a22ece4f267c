"""A benchmark's two result files: OUT.json (what was measured) and OUT.md (its report)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, results, text: str) -> None:
    """OUT.json and OUT.md beside each other, their folder made where it is missing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(text)
