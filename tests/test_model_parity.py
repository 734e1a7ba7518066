"""Logits parity with transformers' LlamaForCausalLM, both checkpoint directions."""
import pytest
import torch

from qru.model.config import LlamaConfig
from qru.model.llama import Llama
from tests.hf_helpers import hf_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim": dict(num_key_value_heads=2, head_dim=24),
    "llama3_rope": dict(num_key_value_heads=2, rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear_rope_bias": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
                             mlp_bias=True),
}
# (atol, rtol) on logits by dtype. bf16 runs each matmul in bf16 in both implementations;
# differences come from accumulation order only.
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (6e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_in_qru(tmp_path, case, dtype):
    hf = hf_model(dtype=dtype, **CASES[case])
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path, dtype=dtype).eval()
    x = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert got.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["gqa", "mqa_tied", "llama3_rope"])
def test_qru_checkpoint_loads_in_hf_sharded(tmp_path, case, dtype):
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig.from_dict({**hf_model(**CASES[case]).config.to_dict()})
    torch.manual_seed(1)
    ours = Llama(cfg.replace(initializer_range=0.1)).to(dtype).eval()
    ours.init_weights(seed=3)
    ours.to(dtype)
    ours.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    x = torch.randint(0, 128, (3, 21))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    # and back into qru from its own sharded output
    again = Llama.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_padded_batch_matches_hf_with_positions(tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path).eval()
    x = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-5)


def test_meta_construction_and_assign():
    cfg = LlamaConfig.preset("tiny", vocab_size=100)
    with torch.device("meta"):
        m = Llama(cfg)
    assert all(p.is_meta for p in m.parameters())
    src = Llama(cfg)
    m.load_state_dict(src.state_dict(), assign=True)
    x = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_hf_module_names():
    cfg = LlamaConfig.preset("tiny", vocab_size=100)
    keys = set(Llama(cfg).state_dict())
    for k in ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight"]:
        assert k in keys
