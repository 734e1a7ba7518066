"""``qru demo`` / ``qru sweep``: the unlearning-vs-quantization experiment end to end on an embedded corpus."""
from qru.demo.pipeline import run_demo
from qru.demo.presets import PRESETS, DemoConfig, PresetError, apply_overrides, get_preset, parse_overrides

__all__ = ["PRESETS", "DemoConfig", "PresetError", "apply_overrides", "get_preset", "parse_overrides", "run_demo"]
