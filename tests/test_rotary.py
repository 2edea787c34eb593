"""Rotary tables follow the model's device: built on the meta device and materialized, a model
gives the same outputs as one built normally, for every rope type the loader supports; on CUDA
(gpu marker) the model builds and runs where its weights are. LongRoPE's tables are
transformers' short and long angles, read by each token's long-context flag."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagoda.backend.attention import BatchLayout, TorchAttentionBackend
from pagoda.backend.kv.cache_tensors import allocate_kv_cache
from pagoda.backend.models import CausalLM, ModelContext, build_model
from pagoda.backend.models.layers import SUPPORTED_ROPE_TYPES, LongRopeEmbedding, materialize


MAX_POSITIONS = 512
BLOCK_SIZE = 16
ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
}


def test_every_supported_rope_type_is_covered():
    assert set(ROPE_SCALINGS) == set(SUPPORTED_ROPE_TYPES)


def _config(rope_type: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        rope_scaling=ROPE_SCALINGS[rope_type], architectures=["LlamaForCausalLM"],
    )


def _forward(model: CausalLM, device: torch.device) -> torch.Tensor:
    """Hidden states of one 40-token prompt placed at positions 300.. (past the original
    context of the scaled rope types), then one decode step."""
    num_layers, num_kv_heads, head_dim = model.kv_shape
    kv_caches = allocate_kv_cache(num_layers, 32, BLOCK_SIZE, num_kv_heads, head_dim,
                                  torch.float32, device)
    backend = TorchAttentionBackend()
    generator = torch.Generator().manual_seed(0)
    table = list(range(32))
    outputs = []
    for context, new in ((300, 40), (340, 1)):
        positions = torch.arange(context, context + new, device=device)
        layout = BatchLayout(
            query_start_loc=[0, new], context_lens=[context], block_tables=[table],
            slot_mapping=positions.clone(), block_size=BLOCK_SIZE,
        )
        input_ids = torch.randint(0, 128, (new,), generator=generator).to(device)
        metadata = backend.prepare(layout, device)
        outputs.append(model(input_ids, positions, kv_caches, metadata))
    return torch.cat(outputs)


def _randomize(model: torch.nn.Module) -> None:
    """Weights are built uninitialized (the checkpoint fills them): give them values."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)


@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_a_model_built_on_meta_and_materialized_matches_one_built_normally(rope_type):
    config = _config(rope_type)
    torch.manual_seed(0)
    reference = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS)).eval()
    _randomize(reference)
    with torch.device("meta"):
        lazy = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS))
    assert lazy.rotary.cos.device.type == "meta"
    materialize(lazy, "cpu").eval()
    lazy.load_state_dict(reference.state_dict())
    assert torch.equal(lazy.rotary.cos, reference.rotary.cos)
    assert torch.equal(lazy.rotary.sin, reference.rotary.sin)
    with torch.inference_mode():
        assert torch.equal(_forward(lazy, torch.device("cpu")),
                           _forward(reference, torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_a_model_built_on_cuda_runs_there_like_on_cpu(rope_type):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = _config(rope_type)
    torch.manual_seed(0)
    reference = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS)).eval()
    _randomize(reference)
    cuda = torch.device("cuda")
    with cuda:
        on_gpu = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS)).eval()
    on_gpu.load_state_dict(reference.state_dict())
    assert on_gpu.rotary.cos.device.type == "cuda"
    torch.testing.assert_close(on_gpu.rotary.cos.cpu(), reference.rotary.cos, atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(_forward(on_gpu, cuda).cpu(),
                                   _forward(reference, torch.device("cpu")), atol=1e-4, rtol=1e-4)


def _phi3_longrope_config() -> Phi3Config:
    return Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=64, pad_token_id=0, architectures=["Phi3ForCausalLM"],
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                      "long_factor": [2.0 + i for i in range(8)]},
    )


def test_longrope_reads_the_short_or_long_angles_of_transformers():
    config = _phi3_longrope_config()
    rotary = LongRopeEmbedding(config, 16, MAX_POSITIONS)
    assert rotary.long_context_threshold == 64
    init = ROPE_INIT_FUNCTIONS["longrope"]
    # A short sequence never reaches the threshold; a long one has every position.
    for long_context, seq_len, positions in ((False, None, torch.tensor([0, 5, 63])),
                                             (True, 65, torch.tensor([0, 5, 63, 64, 300]))):
        inv_freq, scaling = init(config, None, seq_len=seq_len)
        angles = positions[:, None].float() * inv_freq[None, :]
        expected = torch.cat((angles, angles), dim=-1).cos() * scaling
        flags = torch.full((len(positions),), long_context)
        cos, _ = rotary(positions, torch.float32, flags)
        torch.testing.assert_close(cos[:, 0], expected)
    # Without flags (decode steps) a token's position decides.
    cos, _ = rotary(torch.tensor([63, 64]), torch.float32)
    torch.testing.assert_close(cos[:, 0], rotary(torch.tensor([63, 64]), torch.float32,
                                                torch.tensor([False, True]))[0][:, 0])


def test_a_longrope_model_built_on_meta_and_materialized_matches_one_built_normally():
    config = _phi3_longrope_config()
    reference = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS))
    with torch.device("meta"):
        lazy = build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS))
    materialize(lazy, "cpu")
    assert torch.equal(lazy.rotary.cos, reference.rotary.cos)
    assert torch.equal(lazy.rotary.sin, reference.rotary.sin)


def test_longrope_is_refused_where_its_switch_is_not_implemented():
    config = _config("default")
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                              "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match=r"longrope.*Phi3ForCausalLM only"):
        build_model(ModelContext(config, TorchAttentionBackend(), MAX_POSITIONS))
