"""The one internal form every reader produces: a raw interaction log plus an item table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

#: Item side-information columns that readers fill when the source has them.
TEXT_FIELDS = ("title", "categories", "brand", "genres", "description")


@dataclass
class Dataset:
    """A raw interaction log, as read from a file, before any filtering.

    interactions: columns `user` (str), `item` (str), `timestamp` (float64). Rows keep the
        file's order; that order is the tie-break for equal timestamps. Sources without
        timestamps (sequence files) store each item's position in the user's line.
    items: optional item table: column `item` (str) plus side information (`title`,
        `categories`, `brand`, `genres`, ... as strings). Items absent from it keep empty text.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    source: str = ""
    has_time: bool = True
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = {"user", "item", "timestamp"} - set(self.interactions.columns)
        if missing:
            raise ValueError(f"interactions lack columns {sorted(missing)}")
        if self.items is not None and "item" not in self.items.columns:
            raise ValueError("item table lacks the 'item' column")
