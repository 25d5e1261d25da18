"""Pivotal tuning: a UNet LoRA trained together with a multi-vector trigger embedding."""
