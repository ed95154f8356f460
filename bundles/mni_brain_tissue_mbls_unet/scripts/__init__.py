"""Python code that an exported MONAI bundle carries in its ``scripts/`` folder.

The bundle's ``configs/train.json`` names these as ``scripts.<module>.<name>``: the training loss
(``scripts.losses``), the padding wrapper (``scripts.padding``) and any backbone MONAI lacks (``scripts.unet``,
``scripts.transunet``). They import only ``torch`` and ``monai``, so a bundle runs where neither the MbLS pipeline
nor anything but MONAI and its usual dependencies is installed. MONAI's bundle runner puts the bundle folder on
``sys.path`` before it runs a config, which makes ``scripts`` importable.
"""
