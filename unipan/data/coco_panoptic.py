"""A dataset over a COCO-panoptic folder (COCO, or Cityscapes after createPanopticImgs).

Layout: a folder of photos, a folder of panoptic PNGs (id = R + 256 G + 256^2 B, 0 = void) and
a JSON with `images`, `annotations` (one per image: PNG file_name and segments_info) and
`categories`. The photo of an annotation is the `images` entry's file_name under the images
folder; when it is not there, the folder's subfolders are searched by file name, so the
Cityscapes layout (leftImg8bit/<split>/<city>/<name>) works with images_dir=leftImg8bit/<split>.

Every item is one annotated image; images of the JSON without an annotation are skipped (and
logged), since they have no target.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch.utils.data

from unipan.data.common import Transform, make_sample
from unipan.data.image import exif_orientation, read_image
from unipan.io import PanopticAnnotation, load_panoptic_json, read_id_png
from unipan.structures import VOID_ID, DatasetMeta, Sample, SegmentInfo

logger = logging.getLogger(__name__)

# createPanopticImgs writes the photo's name as "<city>_<seq>_<frame>_gtFine_leftImg8bit.png",
# a name no Cityscapes file has; the photo is "<city>_<seq>_<frame>_leftImg8bit.png".
_CITYSCAPES_BAD_SUFFIX = "_gtFine_leftImg8bit.png"
_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"


class CocoPanopticDataset(torch.utils.data.Dataset[Sample]):
    """Items are `Sample`s: the transformed image and its canonical `PanopticTarget`.

    Void pixels (id 0) and crowd segments become IGNORE_LABEL in sem_seg; crowd segments are
    not instances (see `PanopticTarget.from_panoptic`).

    Args:
        images_dir: folder of the photos.
        panoptic_dir: folder of the panoptic PNGs.
        json_path: the COCO-panoptic JSON; parsed and checked at construction (duplicate segment
            ids, unknown categories, annotations without an image entry raise ValueError).
        transform: applied to (image FloatTensor[3, H, W] 0..255, panoptic IntTensor[H, W]).
        validate: also check, at construction, that every photo and PNG exists, and, per item,
            that every JSON segment appears in the PNG with its JSON area and that the JSON's
            width/height match. PNG ids missing from the JSON and photo/PNG size differences
            are always errors, since no target can be built from them.

    Attributes:
        meta: class information from the JSON's categories.
        panoptic_json: the parsed JSON (images, annotations, categories, lookups by image id).
        annotations: one per item, in JSON order.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        panoptic_dir: str | os.PathLike[str],
        json_path: str | os.PathLike[str],
        transform: Transform | None = None,
        validate: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.panoptic_dir = Path(panoptic_dir)
        self.json_path = Path(json_path)
        self.transform = transform
        self.validate = validate
        for what, folder in (("images", self.images_dir), ("panoptic", self.panoptic_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder {folder} does not exist")
        parsed = load_panoptic_json(self.json_path)
        if not parsed.images:
            raise ValueError(f"{self.json_path}: the split has no images (its 'images' list is missing or empty)")
        self.meta: DatasetMeta = parsed.meta
        self.panoptic_json = parsed
        self.annotations: list[PanopticAnnotation] = parsed.annotations
        unannotated = len(parsed.images) - len(parsed.annotations)
        if unannotated:
            logger.warning("%s: %d images have no annotation and are skipped", self.json_path, unannotated)
        self._by_basename: dict[str, list[Path]] | None = None
        if validate:
            self._check_files_exist()

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def image_ids(self) -> list[str]:
        return [str(a.image_id) for a in self.annotations]

    # --- paths ---------------------------------------------------------------------------------
    def image_path(self, i: int) -> Path:
        """Path of item i's photo (searching subfolders when it is not directly in images_dir).

        Raises:
            FileNotFoundError: naming the image when no file matches.
            ValueError: when several files in subfolders share its name.
        """
        ann = self.annotations[i]
        file_name = str(self.panoptic_json.image(ann.image_id)["file_name"])
        direct = self.images_dir / file_name
        if direct.is_file():
            return direct
        names = [Path(file_name).name]
        if names[0].endswith(_CITYSCAPES_BAD_SUFFIX):
            names.append(names[0][: -len(_CITYSCAPES_BAD_SUFFIX)] + _CITYSCAPES_IMAGE_SUFFIX)
        index = self._basename_index()
        for name in names:
            found = index.get(name, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ValueError(
                    f"image {ann.image_id!r}: {len(found)} files named {name} under {self.images_dir}: "
                    f"{[str(p) for p in found[:3]]}"
                )
        raise FileNotFoundError(
            f"image {ann.image_id!r}: photo {file_name} not found in {self.images_dir} or its subfolders"
        )

    def panoptic_path(self, i: int) -> Path:
        return self.panoptic_dir / self.annotations[i].file_name

    def _basename_index(self) -> dict[str, list[Path]]:
        # built once per process, and only when a photo is not where its file_name says
        if self._by_basename is None:
            index: dict[str, list[Path]] = {}
            for root, _dirs, files in os.walk(self.images_dir):
                for f in files:
                    index.setdefault(f, []).append(Path(root) / f)
            self._by_basename = index
        return self._by_basename

    def _check_files_exist(self) -> None:
        missing: list[str] = []
        for i, ann in enumerate(self.annotations):
            if not self.panoptic_path(i).is_file():
                missing.append(f"image {ann.image_id!r}: panoptic PNG {self.panoptic_path(i)}")
            try:
                self.image_path(i)
            except (FileNotFoundError, ValueError) as e:
                missing.append(str(e))
        if missing:
            shown = "\n  ".join(missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise FileNotFoundError(f"{self.json_path}: {len(missing)} files missing:\n  {shown}{more}")

    # --- items ---------------------------------------------------------------------------------
    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo], str]:
        """Decode item i without transforms and check photo, PNG and JSON against each other.

        Returns:
            image uint8[H, W, 3] RGB, ids int32[H, W] (0 = void), the JSON segments, image id.

        Raises:
            FileNotFoundError: naming the image when its photo or PNG is missing.
            ValueError: naming the image (and segments) for an unreadable/truncated file, a
                photo/PNG size difference, PNG ids missing from the JSON; with `validate` also
                JSON segments missing from the PNG, an area differing from the PNG's, and a
                width/height differing from the `images` entry.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        ann = self.annotations[i]
        image_id = str(ann.image_id)
        image_path = self.image_path(i)
        png_path = self.panoptic_path(i)
        image = read_image(image_path)
        try:
            ids = read_id_png(png_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {image_id!r}: panoptic PNG {png_path} not found") from None
        except ValueError as e:
            raise ValueError(f"image {image_id!r}: {e}") from e
        if image.shape[:2] != ids.shape:
            hint = ""
            if exif_orientation(image_path) != 1 and image.shape[1::-1] == ids.shape:
                hint = " (the photo has an EXIF rotation; the PNG matches its unrotated pixels)"
            raise ValueError(
                f"image {image_id!r}: photo {image_path} is {image.shape[0]}x{image.shape[1]} but "
                f"panoptic PNG {png_path} is {ids.shape[0]}x{ids.shape[1]} (HxW){hint}"
            )
        self._check_ids(ann, ids, png_path)
        return image, ids, ann.segments, image_id

    def _check_ids(self, ann: PanopticAnnotation, ids: np.ndarray, png_path: Path) -> None:
        image_id = str(ann.image_id)
        present, counts = np.unique(ids, return_counts=True)
        area_in_png = {int(k): int(c) for k, c in zip(present.tolist(), counts.tolist(), strict=True)}
        area_in_png.pop(VOID_ID, None)
        by_id = {s.id: s for s in ann.segments}
        not_in_json = sorted(set(area_in_png) - set(by_id))
        if not_in_json:
            raise ValueError(
                f"image {image_id!r}: segment ids {not_in_json[:10]} of panoptic PNG {png_path} "
                f"are missing from the JSON's segments_info"
            )
        if not self.validate:
            return
        not_in_png = sorted(set(by_id) - set(area_in_png))
        if not_in_png:
            raise ValueError(
                f"image {image_id!r}: JSON segments {not_in_png[:10]} do not appear in panoptic PNG {png_path}"
            )
        for seg in ann.segments:
            # area 0 means "not given" (prediction-style files); panopticapi trusts the JSON area
            # of ground truth, so a wrong one would silently skew PQ
            if seg.area and seg.area != area_in_png[seg.id]:
                raise ValueError(
                    f"image {image_id!r}, segment {seg.id}: JSON area {seg.area} but the panoptic PNG "
                    f"{png_path} has {area_in_png[seg.id]} pixels"
                )
        entry = self.panoptic_json.image(ann.image_id)
        if "height" in entry and "width" in entry:
            expected = (int(entry["height"]), int(entry["width"]))
            if expected != ids.shape:
                raise ValueError(
                    f"image {image_id!r}: the JSON says {expected[0]}x{expected[1]} but panoptic PNG "
                    f"{png_path} is {ids.shape[0]}x{ids.shape[1]} (HxW)"
                )

    def original_panoptic(self, i: int) -> tuple[np.ndarray, list[SegmentInfo]]:
        """Item i's panoptic PNG and JSON segments, untransformed (`HasOriginalPanoptic`).

        Reads the PNG only (not the photo): evaluation calls this for items whose input size
        differs from the file's. The checks of `load_raw` ran on the same files in `__getitem__`.

        Returns:
            ids int32[H, W] (0 = void) and the annotation's segments.
        """
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        ann = self.annotations[i]
        png_path = self.panoptic_path(i)
        try:
            ids = read_id_png(png_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {ann.image_id!r}: panoptic PNG {png_path} not found") from None
        except ValueError as e:
            raise ValueError(f"image {ann.image_id!r}: {e}") from e
        return ids, list(ann.segments)

    def __getitem__(self, i: int) -> Sample:
        image, ids, segments, image_id = self.load_raw(i)
        return make_sample(image, ids, segments, self.meta, image_id, self.transform)

    def __repr__(self) -> str:
        return f"CocoPanopticDataset({self.json_path}, {len(self)} images, {self.meta})"
