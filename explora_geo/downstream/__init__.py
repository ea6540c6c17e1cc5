"""Downstream use of explora-geo backbones: labelled data, torchgeo tasks, linear probe and kNN.

Modules (import them directly; this package imports nothing heavy):

- :mod:`~explora_geo.downstream.labeled`: chip folders (EuroSAT layout, bands picked by name), seeded
  stratified splits.
- :mod:`~explora_geo.downstream.mosaic`: mosaics (band files), chip windows, vector labels (points /
  polygons, any CRS) -> chips.
- :mod:`~explora_geo.downstream.masks`: polygons -> image/mask chips for segmentation.
- :mod:`~explora_geo.downstream.datamodule`: ``ChipFolderDataModule`` / ``MaskFolderDataModule`` for
  ``torchgeo fit``.
- :mod:`~explora_geo.downstream.backbones`: backbone files as timm registered models (checked loading) and
  torchgeo-style weights entries.
- :mod:`~explora_geo.downstream.tasks`: ``ExploraClassificationTask`` (full / LoRA-r8 / linear-probe
  fine-tuning), ``backbone_from_checkpoint``.
- :mod:`~explora_geo.downstream.segmentation`: ``ViTSegmenter`` and ``ExploraSegmentationTask``.
- :mod:`~explora_geo.downstream.probe`: the paper's linear-probe protocol and kNN (``explora-geo probe``).
"""
