"""Models: the one base, its LoRA roles, and the tensor plumbing every backend shares."""

from prefopt.models.base import ModelError, load_base, pick_device, resolve_model
from prefopt.models.shared import LoraSettings, SharedBase

__all__ = ["ModelError", "load_base", "pick_device", "resolve_model", "LoraSettings", "SharedBase"]
