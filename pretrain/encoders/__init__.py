"""Encoder registry: importing this package registers DAT++ and DWNet with timm.

DaViT needs nothing here (timm ships ``davit_tiny`` .. ``davit_giant``); pretraining and
fine-tuning both import this package so every encoder is built the same way, by name:
``timm.create_model("dat_pp_tiny", num_classes=..., drop_path_rate=...)``.
"""

from pretrain.encoders import dat, dwnet  # noqa: F401  (registration happens at import)

ENCODERS = (
    "davit_tiny",
    "davit_small",
    "davit_base",
    "davit_large",
    "davit_huge",
    "davit_giant",
    "dat_pp_tiny",
    "dat_pp_small",
    "dat_pp_base",
    "dwnet_tiny",
    "dwnet_base",
    "dynamic_dwnet_tiny",
    "dynamic_dwnet_base",
)
"""Every encoder the project supports, smallest first within each family."""
