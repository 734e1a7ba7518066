"""The README's Python API example runs as written, and does what it says."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)

    from qru.quant import QuantLinear

    # disable_adapters gave the base model's logits: LoRA B starts at zero, so they equal a fresh base forward.
    base = ns["Llama"].from_pretrained("base", dtype=torch.float32)
    torch.testing.assert_close(ns["ref_logits"], base(ns["ids"]).detach())
    # The deployed checkpoint holds quantized linears whose codes equal quantize(merged W).
    qmods = {n: m for n, m in ns["deployed"].named_modules() if isinstance(m, QuantLinear)}
    assert len(qmods) == 7 * base.config.num_hidden_layers
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert set(ns["report"]) == {"nf4", "int8"}
    assert (tmp_path / "survival" / "survival.json").exists()
    assert ns["w_hat"].shape == (256, 512)
    # The exported nf4 checkpoint runs like the fp32 base quantized in memory (the adapter is still zero).
    fresh = ns["Llama"].from_pretrained("base", dtype=torch.float32)
    want = ns["quantize_model"](fresh, "nf4", 64, compute_dtype=torch.bfloat16)(ns["ids"])
    torch.testing.assert_close(ns["deployed"](ns["ids"]).float(), want.float())


def test_readme_command_table_lists_every_subcommand():
    """Each ``qru`` subcommand has a row in the README's command table."""
    from qru.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    rows = set(re.findall(r"^\| `qru ([a-z-]+)", README.read_text(), flags=re.M))
    assert set(sub.choices) <= rows, f"missing from the README table: {sorted(set(sub.choices) - rows)}"
