"""Each image stored once per split, apart from its instance records.

A data set (`data_prep.build`) has one TFDS record per annotated instance;
since version 2.0.0 the records carry ``image_id`` but no image bytes, and
each split's images live once here, however many instances an image has
(an MP-100 image with several people, a video frame with several mice):

  OUT/images-<split>.array_record  one ArrayRecord record per image: its
                                   encoded JPEG or PNG bytes
                                   (`images.EncodedImage.data`)
  OUT/images-<split>.json          {"image_ids": [...]}: record i holds
                                   image ``image_ids[i]``

`ImageStoreWriter` writes a split's store while the builder walks its
annotations; `InstanceSource` joins a split's records with their images,
so readers see the record layout of version 1 (``image`` bytes in every
record) and a detector reads each image once.

The files are written with ArrayRecord's ``group_size:1``, as TFDS writes
its own (random access, `tensorflow_datasets/core/file_adapters.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from array_record.python import array_record_data_source
from array_record.python import array_record_module


def store_paths(directory: str | os.PathLike, split: str) -> tuple[Path, Path]:
  """(records path, index path) of ``split``'s image store in ``directory``."""
  d = Path(directory)
  return d / f'images-{split}.array_record', d / f'images-{split}.json'


class ImageStoreWriter:
  """Writes one split's images, each once, in the order first added.

  Args:
    directory: where the two files go (created if missing).
    split: the split name.

  Use as a context manager, or call `close` (which writes the index); a
  writer left open leaves no index, so the store is not readable.
  """

  def __init__(self, directory: str | os.PathLike, split: str):
    Path(directory).mkdir(parents=True, exist_ok=True)
    self._records_path, self._index_path = store_paths(directory, split)
    self._writer = array_record_module.ArrayRecordWriter(
        str(self._records_path), 'group_size:1')
    self._image_ids: list[int] = []
    self._seen: set[int] = set()

  def add(self, image_id: int, data: bytes) -> bool:
    """Stores ``data`` (encoded image bytes) as image ``image_id`` unless it
    is already stored. Returns True if it was written now."""
    image_id = int(image_id)
    if image_id in self._seen:
      return False
    self._writer.write(bytes(data))
    self._image_ids.append(image_id)
    self._seen.add(image_id)
    return True

  @property
  def num_images(self) -> int:
    return len(self._image_ids)

  def close(self) -> None:
    """Finishes the records file and writes the index."""
    self._writer.close()
    tmp = self._index_path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps({'image_ids': self._image_ids}))
    os.replace(tmp, self._index_path)

  def __enter__(self) -> 'ImageStoreWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ImageStore:
  """A split's stored images by image id (random access; picklable, so
  Grain worker processes can hold it).

  Raises:
    FileNotFoundError: if the store's files are missing.
    ValueError: if the index and the records file disagree on the count.
  """

  def __init__(self, directory: str | os.PathLike, split: str):
    records_path, index_path = store_paths(directory, split)
    if not records_path.exists() or not index_path.exists():
      raise FileNotFoundError(
          f'{directory}: no image store for split {split!r} '
          f'({records_path.name}, {index_path.name}); rebuild the data set '
          'with `python -m data_prep.build`.')
    self.image_ids: list[int] = json.loads(index_path.read_text())['image_ids']
    self._position = {i: p for p, i in enumerate(self.image_ids)}
    self._records = array_record_data_source.ArrayRecordDataSource(
        str(records_path))
    if len(self._records) != len(self.image_ids):
      raise ValueError(
          f'{records_path}: {len(self._records)} images but {index_path.name} '
          f'lists {len(self.image_ids)}; rebuild the data set.')

  def __len__(self) -> int:
    return len(self.image_ids)

  def __getitem__(self, image_id: int) -> bytes:
    """Encoded bytes of image ``image_id``.

    Raises:
      KeyError: if the split stores no such image.
    """
    try:
      position = self._position[int(image_id)]
    except KeyError:
      raise KeyError(f'image {int(image_id)} is not in this split\'s image '
                     'store') from None
    return self._records[position]


class InstanceSource:
  """A split's instance records, each with its image's encoded bytes.

  ``source[i]`` is record ``i`` of ``records`` (a TFDS data source of a
  version 2 data set) with ``image`` set to `ImageStore` bytes of its
  ``image_id``. ``records`` itself is the cheap view (no image read), for
  passes that only need ids, boxes or keypoints.

  Args:
    records: random-access records (``__len__``, ``__getitem__`` -> dict
      with ``image_id``).
    images: the split's `ImageStore`.
  """

  def __init__(self, records, images: ImageStore):
    self.records = records
    self.images = images

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = dict(self.records[i])
    record['image'] = self.images[record['image_id']]
    return record

  def __repr__(self) -> str:
    return (f'InstanceSource({len(self.records)} instances, '
            f'{len(self.images)} images)')


def records_without_images(source) -> Any:
  """The image-free view of a data source: `InstanceSource.records`, or the
  source itself (records of version 1 data sets hold their images; reading
  them costs the image bytes)."""
  return getattr(source, 'records', source)

