"""Quantized weights: detecting a checkpoint's scheme (config.json's quantization_config) or the
one asked for (`quantization=`), and a LinearMethod per scheme that stores, loads and applies
its layers' weights. Model files never branch on quantization: `ModelContext.linear_method` picks
the method per layer.

This package's __init__ imports nothing: backend/config.py reads `names` while the CLI builds its
flags, which must not import torch.
"""
