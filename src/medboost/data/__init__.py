"""Data for every task. Modules (imported on demand: the MONAI/NIfTI side stays out of classification runs):

- :mod:`~medboost.data.base`: ``SplitDataModule``, the data-module base (loaders, seeding, exact resume).
- :mod:`~medboost.data.splits`: subject-level seeded splits, k-fold, nested training fractions, split files + MD5.
- :mod:`~medboost.data.sampling`: the epoch-seeded sampler and sample indices.
- :mod:`~medboost.data.medmnist`, :mod:`~medboost.data.medmnist_info`, :mod:`~medboost.data.transforms`: MedMNIST.
- :mod:`~medboost.data.pairing`, :mod:`~medboost.data.content_checks`, :mod:`~medboost.data.segmentation_transforms`,
  :mod:`~medboost.data.segmentation`: segmentation folders, from file pairs to the data module.
- :mod:`~medboost.data.volumes`, :mod:`~medboost.data.clinical_text`, :mod:`~medboost.data.vl_manifest`,
  :mod:`~medboost.data.vision_language`: 3D volumes (NIfTI, DICOM series) with MedBLIP's preprocessing, EHR text and
  answers from clinical fields, the vision-language manifest (IXI adapter), and its data module.
"""
