"""Python code that an exported MONAI bundle carries in its ``scripts/`` folder.

The bundle's configs name these as ``scripts.<module>.<name>``: the training loss (``scripts.losses``), the checks
of input images and model files (``scripts.inputs``), the paper's calibration metrics and class-named per-case CSV
files (``scripts.evaluation``), the padding wrapper (``scripts.padding``) and any backbone MONAI lacks
(``scripts.unet``, ``scripts.transunet``). They import only ``torch``, ``numpy`` and ``monai``, so a bundle runs where
neither the MbLS pipeline nor anything but MONAI and its usual dependencies is installed. MONAI's bundle runner puts
the bundle folder on ``sys.path`` before it runs a config; ``network_def`` of ``train.json`` and the model check of
``inference.json`` put it there themselves (config id ``scripts_on_path``), for ``ckpt_export`` and
``verify_net_in_out``, which do not.
"""
