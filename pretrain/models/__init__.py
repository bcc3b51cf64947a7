"""Encoder registry: importing this package registers DAT++ and DWNet with timm.

DaViT needs nothing here (timm ships it); pretraining and fine-tuning both import this
package so every encoder is built the same way, by name, with ``timm.create_model``.
"""
