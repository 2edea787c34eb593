"""Which layers each scheme quantizes, by the names its quantization_config uses: ignore lists
(names and "re:" regexes), GPTQModel's dynamic overrides, AWQ's modules_to_not_convert,
AutoRound's extra_config and blocks; and fused layers whose parts would be stored apart."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pagoda.backend.attention import get_attention_backend
from pagoda.backend.models import ModelContext
from pagoda.backend.models.layers import UNQUANTIZED
from pagoda.backend.quantization.auto_round import AutoRoundConfig
from pagoda.backend.quantization.awq import AWQConfig, AWQLayout
from pagoda.backend.quantization.compressed_tensors import CompressedTensorsConfig
from pagoda.backend.quantization.gptq import GPTQConfig, GPTQLayout
from pagoda.backend.quantization.weight_only import WeightOnlyIntMethod


def test_compressed_tensors_ignores_names_and_regexes_of_checkpoint_modules():
    config = CompressedTensorsConfig({
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 32}}},
        "ignore": ["lm_head", "model.layers.0.self_attn.o_proj", "re:.*mlp.down_proj$"],
    })
    assert config.linear_method("layers.0.self_attn.o_proj") is UNQUANTIZED
    assert config.linear_method("layers.3.mlp.down_proj") is UNQUANTIZED
    assert isinstance(config.linear_method("layers.1.self_attn.o_proj"), WeightOnlyIntMethod)
    assert isinstance(config.linear_method("layers.0.mlp.up_proj"), WeightOnlyIntMethod)


def test_gptq_dynamic_leaves_modules_dense_or_changes_their_bits():
    config = GPTQConfig({"bits": 4, "group_size": 128, "dynamic": {
        r"-:model\.layers\.0\..*": {}, r"+:.*down_proj": {"bits": 8, "group_size": 64}}})
    assert config.linear_method("layers.0.mlp.up_proj") is UNQUANTIZED
    assert config.linear_method("layers.1.mlp.down_proj").layout == GPTQLayout(8, 64, True)
    assert config.linear_method("layers.1.mlp.up_proj").layout == GPTQLayout(4, 128, True)
    v2 = GPTQConfig({"bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"})
    assert v2.linear_method("layers.1.mlp.up_proj").layout == GPTQLayout(4, 128, False)


@pytest.mark.parametrize("config, message", [
    ({"bits": 3, "group_size": 128}, r"gptq: bits=3 is not supported \(supported: \(2, 4, 8\)\)"),
    ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "gptq: checkpoint_format 'marlin' is not supported"),
    ({"bits": 4, "group_size": 128, "lm_head": True}, "gptq: a quantized lm_head"),
])
def test_unsupported_gptq_configurations_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        GPTQConfig(config)


def test_awq_modules_to_not_convert_and_versions():
    config = AWQConfig({"bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                        "modules_to_not_convert": ["o_proj"]})
    assert config.linear_method("layers.2.self_attn.o_proj") is UNQUANTIZED
    assert config.linear_method("layers.2.mlp.up_proj").layout == AWQLayout(4, 64)
    with pytest.raises(ValueError, match="awq: version 'gemv' is not supported"):
        AWQConfig({"bits": 4, "group_size": 64, "version": "gemv"})


def test_auto_round_extra_config_and_blocks():
    config = AutoRoundConfig({
        "bits": 4, "group_size": 32, "sym": True, "packing_format": "auto_round:auto_gptq",
        "block_name_to_quantize": "model.layers",
        "extra_config": {"model.layers.1.mlp.down_proj": {"bits": 16},
                         "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 64}},
    })
    assert config.linear_method("layers.1.mlp.down_proj") is UNQUANTIZED
    assert config.linear_method("layers.0.mlp.down_proj").layout == GPTQLayout(8, 64, True)
    assert config.linear_method("lm_head") is UNQUANTIZED  # outside the quantized blocks
    awq = AutoRoundConfig({"bits": 4, "group_size": 32, "packing_format": "auto_round:auto_awq"})
    assert awq.linear_method("layers.0.mlp.up_proj").layout == AWQLayout(4, 32)
    with pytest.raises(ValueError, match="auto-round: packing_format 'auto_round:fp8' is not"):
        AutoRoundConfig({"bits": 8, "group_size": 32, "packing_format": "auto_round:fp8"})


def test_a_fused_layer_whose_parts_are_stored_apart_is_refused():
    config = AWQConfig({"bits": 4, "group_size": 32, "modules_to_not_convert": ["gate_proj"]})
    hf_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, vocab_size=64)
    attention = get_attention_backend(torch.device("cpu"))
    ctx = ModelContext(hf_config, attention, 64, config.linear_method)
    with pytest.raises(ValueError, match=r"the parts \['layers.0.mlp.gate_proj', "
                                         r"'layers.0.mlp.up_proj'\] of the fused layer "
                                         "layers.0.mlp.gate_up_proj are quantized differently"):
        ctx.linear("layers.0.mlp.gate_up_proj", 64, {"gate_proj": 128, "up_proj": 128}, False)
