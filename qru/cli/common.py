"""Small helpers shared by the command modules."""
from __future__ import annotations


def csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]
