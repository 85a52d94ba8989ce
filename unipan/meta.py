"""Dataset metadata without torch: categories, segment infos and the id constants.

`unipan.structures` re-exports everything here; this module exists so that the light command-line
verbs (`unipan pq`, `unipan viz`, `unipan data synth`) and the config can use the classes of a
dataset without loading torch (importing torch costs seconds on a small machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["IGNORE_LABEL", "VOID_ID", "CategoryInfo", "DatasetMeta", "SegmentInfo"]

IGNORE_LABEL = 255
"""Label of pixels that no loss or metric counts: void, crowd, padding."""

VOID_ID = 0
"""Segment id of unlabelled pixels in a panoptic id map."""


@dataclass(frozen=True)
class CategoryInfo:
    """One entry of a COCO-panoptic `categories` list."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]
    supercategory: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoryInfo:
        try:
            color = d.get("color", (128, 128, 128))
            return cls(
                id=int(d["id"]),
                name=str(d["name"]),
                isthing=bool(int(d["isthing"])),
                color=(int(color[0]), int(color[1]), int(color[2])),
                supercategory=str(d.get("supercategory", "")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"bad category entry {d!r}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "isthing": int(self.isthing),
            "color": list(self.color),
            "supercategory": self.supercategory,
        }


class DatasetMeta:
    """Class information of a dataset, built from its COCO-panoptic `categories` list.

    The dataset owns this; models size their class outputs from it and never hard-code counts.

    Attributes:
        categories: all categories, in the order of the source list.
        thing_categories: the thing categories in list order; position = thing index.
        stuff_categories: the stuff categories in list order; position = stuff index.
    """

    def __init__(self, categories: Iterable[CategoryInfo | dict[str, Any]], name: str = "") -> None:
        cats = [c if isinstance(c, CategoryInfo) else CategoryInfo.from_dict(c) for c in categories]
        ids = [c.id for c in cats]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"categories list has duplicate ids {dup}")
        self.name = name
        self.categories: list[CategoryInfo] = cats
        self.thing_categories = [c for c in cats if c.isthing]
        self.stuff_categories = [c for c in cats if not c.isthing]
        self._by_id = {c.id: c for c in cats}
        self._thing_index = {c.id: i for i, c in enumerate(self.thing_categories)}
        self._stuff_index = {c.id: i for i, c in enumerate(self.stuff_categories)}
        s = len(self.stuff_categories)
        self._class_index = {**self._stuff_index, **{k: s + v for k, v in self._thing_index.items()}}
        self.class_index_to_dataset_id: list[int] = [c.id for c in self.stuff_categories] + [
            c.id for c in self.thing_categories
        ]

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_things(self) -> int:
        return len(self.thing_categories)

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_categories)

    @property
    def num_classes(self) -> int:
        """Size of the all-classes space (stuff + things)."""
        return len(self.categories)

    @property
    def thing_dataset_ids(self) -> list[int]:
        return [c.id for c in self.thing_categories]

    @property
    def stuff_dataset_ids(self) -> list[int]:
        return [c.id for c in self.stuff_categories]

    # --- maps --------------------------------------------------------------------------------
    def __contains__(self, category_id: int) -> bool:
        return category_id in self._by_id

    def category(self, category_id: int) -> CategoryInfo:
        try:
            return self._by_id[category_id]
        except KeyError:
            raise KeyError(f"unknown category id {category_id} (dataset {self.name!r})") from None

    def isthing(self, category_id: int) -> bool:
        return self.category(category_id).isthing

    def thing_index(self, category_id: int) -> int:
        """Dataset category id -> contiguous thing index (KeyError for stuff or unknown)."""
        try:
            return self._thing_index[category_id]
        except KeyError:
            raise KeyError(f"category id {category_id} is not a thing category") from None

    def stuff_index(self, category_id: int) -> int:
        """Dataset category id -> contiguous stuff index (KeyError for things or unknown)."""
        try:
            return self._stuff_index[category_id]
        except KeyError:
            raise KeyError(f"category id {category_id} is not a stuff category") from None

    def class_index(self, category_id: int) -> int:
        """Dataset category id -> index in the all-classes space (stuff first, then things)."""
        try:
            return self._class_index[category_id]
        except KeyError:
            raise KeyError(f"unknown category id {category_id} (dataset {self.name!r})") from None

    def thing_dataset_id(self, thing_index: int) -> int:
        return self.thing_categories[thing_index].id

    def stuff_dataset_id(self, stuff_index: int) -> int:
        return self.stuff_categories[stuff_index].id

    def color(self, category_id: int) -> tuple[int, int, int]:
        return self.category(category_id).color

    def class_index_lut(self) -> Tensor:
        """LongTensor[max_id + 1]: dataset category id -> class index, IGNORE_LABEL elsewhere."""
        import torch  # lazily: the rest of this module serves torch-free command-line verbs

        lut = torch.full((max(self._by_id) + 1,), IGNORE_LABEL, dtype=torch.long)
        for cid, k in self._class_index.items():
            lut[cid] = k
        return lut

    # --- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_coco_categories(cls, categories: Sequence[dict[str, Any]], name: str = "") -> DatasetMeta:
        return cls(categories, name=name)

    def to_coco_categories(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.categories]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DatasetMeta) and self.categories == other.categories

    def __repr__(self) -> str:
        return f"DatasetMeta({self.name!r}, things={self.num_things}, stuff={self.num_stuff})"


@dataclass
class SegmentInfo:
    """One segment of a panoptic id map (a COCO-panoptic `segments_info` entry).

    Ground truth fills `iscrowd`, `area` and `bbox`; predictions fill `score`.
    """

    id: int
    category_id: int
    isthing: bool
    iscrowd: bool = False
    area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h in pixels, COCO style
    score: float = 1.0

    def to_coco_dict(self) -> dict[str, Any]:
        """The `segments_info` entry as panopticapi writes and reads it."""
        return {
            "id": int(self.id),
            "category_id": int(self.category_id),
            "iscrowd": int(self.iscrowd),
            "area": int(self.area),
            "bbox": [int(v) for v in self.bbox],
        }
