"""What the benchmark smoke tests share: what a case has published, and what a published figure looks like."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def published(key: str) -> tuple[str | None, str | None]:
    """This case's section of benchmarks/README.md and its results file (other cases may publish meanwhile)."""
    readme, raw = ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "results" / f"{key}.json"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    start, end = f"<!-- results:{key} -->", f"<!-- /results:{key} -->"
    section = text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else None
    return section, raw.read_text(encoding="utf-8") if raw.is_file() else None


def is_fraction(value: object) -> bool:
    """A rate as the results files hold it: a number in [0, 1], not a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
