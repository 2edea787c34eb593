"""Independent float32 dequantizers of the tools' on-disk layouts, written from the formats'
descriptions (not from Pagoda's loader), and the dense checkpoint they give: the tests'
second reference beside the tools' own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Each int32 word -> its 32/bits values, lowest bits first, as a new last dimension."""
    mask = (1 << bits) - 1
    return torch.stack([(words >> (bits * j)) & mask for j in range(32 // bits)], dim=-1)


def gptq(tensors: dict, prefix: str, bits: int, zero_offset: int) -> torch.Tensor:
    qweight = tensors[f"{prefix}.qweight"]  # [in/pack, out], packed along the inputs
    q = unpack_words(qweight, bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [in, out]
    qzeros = tensors[f"{prefix}.qzeros"]  # [groups, out/pack]
    zeros = unpack_words(qzeros, bits).reshape(qzeros.shape[0], -1)
    zeros = (zeros + zero_offset) & ((1 << bits) - 1)
    scales = tensors[f"{prefix}.scales"].float()
    in_features = q.shape[0]
    g_idx = tensors.get(f"{prefix}.g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_features) // (in_features // scales.shape[0])
    g_idx = g_idx.long()
    weight = (q.float() - zeros[g_idx].float()) * scales[g_idx]
    return weight.t()


def awq(tensors: dict, prefix: str) -> torch.Tensor:
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble j holds column order[j] of its eight

    def unshuffle(words: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_words(words, 4)  # [rows, cols/8, 8] in stored order
        columns = torch.empty_like(nibbles)
        for j, column in enumerate(order):
            columns[..., column] = nibbles[..., j]
        return columns.reshape(words.shape[0], -1)

    q = unshuffle(tensors[f"{prefix}.qweight"])  # [in, out]
    zeros = unshuffle(tensors[f"{prefix}.qzeros"])  # [groups, out]
    scales = tensors[f"{prefix}.scales"].float()
    group_size = q.shape[0] // scales.shape[0]
    rows = torch.arange(q.shape[0]) // group_size
    return ((q.float() - zeros[rows].float()) * scales[rows]).t()


def pack_quantized(tensors: dict, prefix: str, bits: int) -> torch.Tensor:
    packed = tensors[f"{prefix}.weight_packed"]  # [out, in/pack]
    offset = 1 << (bits - 1)
    q = unpack_words(packed, bits).reshape(packed.shape[0], -1) - offset  # signed
    scales = tensors[f"{prefix}.weight_scale"].float()  # [out, groups]
    zero_points = tensors.get(f"{prefix}.weight_zero_point")
    if zero_points is None:
        zeros = torch.zeros_like(scales)
    else:  # packed along the outputs: [out/pack, groups]
        zeros = (unpack_words(zero_points, bits).permute(0, 2, 1).reshape(-1, scales.shape[1])
                 - offset).float()
    group_size = q.shape[1] // scales.shape[1]
    columns = torch.arange(q.shape[1]) // group_size
    return (q.float() - zeros[:, columns]) * scales[:, columns]


def dense_copy(folder: Path, target: Path, dequantize) -> Path:
    """The checkpoint in `folder` with every quantized linear replaced by its float32 weight
    (`dequantize(tensors, prefix)`), without quantization_config."""
    tensors = load_file(folder / "model.safetensors")
    prefixes = {name.rsplit(".", 1)[0] for name in tensors
                if name.endswith((".qweight", ".weight_packed"))}
    dense = {name: value for name, value in tensors.items()
             if name.rsplit(".", 1)[0] not in prefixes}
    for prefix in prefixes:
        dense[f"{prefix}.weight"] = dequantize(tensors, prefix).contiguous()
        if f"{prefix}.bias" in tensors:
            dense[f"{prefix}.bias"] = tensors[f"{prefix}.bias"]
    target.mkdir(parents=True)
    save_file(dense, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (folder / extra).exists():
            shutil.copy(folder / extra, target / extra)
    return target


def eight_bit(tensors: dict, prefix: str) -> torch.Tensor:
    """int-quantized / float-quantized: int8 or fp8 [out, in] times its scale per channel
    ([out, 1]), per tensor ([1]) or per block ([ceil(out/rows), ceil(in/columns)])."""
    weight = tensors[f"{prefix}.weight"].float()
    scale = tensors[f"{prefix}.weight_scale"].float()
    if scale.dim() == 2 and scale.shape[1] > 1:  # blocks
        rows = -(-weight.shape[0] // scale.shape[0])
        columns = -(-weight.shape[1] // scale.shape[1])
        out_index = torch.arange(weight.shape[0]) // rows
        in_index = torch.arange(weight.shape[1]) // columns
        scale = scale[out_index][:, in_index]
    return weight * scale.reshape(-1, 1) if scale.dim() < 2 or scale.shape[1] == 1 \
        else weight * scale
