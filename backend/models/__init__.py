"""Model registry: architecture name (config.architectures) -> native implementation."""

from __future__ import annotations

from torch import nn

from pagoda.backend.models.base import CausalLM, KVCache, ModelContext
from pagoda.backend.models.gemma import GemmaForCausalLM
from pagoda.backend.models.gpt_bigcode import GPTBigCodeForCausalLM
from pagoda.backend.models.gpt_neox import GPTNeoXForCausalLM
from pagoda.backend.models.llama import LlamaForCausalLM
from pagoda.backend.models.mixtral import MixtralForCausalLM
from pagoda.backend.models.opt import OPTForCausalLM
from pagoda.backend.models.phi3 import Phi3ForCausalLM
from pagoda.backend.models.qwen2_moe import Qwen2MoeForCausalLM
from pagoda.backend.models.qwen3 import Qwen3ForCausalLM
from pagoda.backend.models.qwen3_moe import Qwen3MoeForCausalLM
from pagoda.backend.models.stablelm import StableLmForCausalLM
from pagoda.backend.models.starcoder2 import Starcoder2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "StableLmForCausalLM": StableLmForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
    "GPTBigCodeForCausalLM": GPTBigCodeForCausalLM,
}
# What each architecture covers, for `pagoda architectures` (the README's table is its output).
MODEL_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 1, 2 and 3.x (3.1 and 3.2 with their rope scaling), Vicuna, "
                        "TinyLlama, and fine-tunes that keep this architecture",
    "MistralForCausalLM": "Mistral 7B v0.1-v0.3 (v0.1's sliding-window attention included), "
                          "Zephyr and other Mistral fine-tunes",
    "Qwen2ForCausalLM": "Qwen2 and Qwen2.5, base and Instruct (0.5B-72B)",
    "MixtralForCausalLM": "Mixtral 8x7B and 8x22B, base and Instruct (top-2 of 8 experts)",
    "Qwen2MoeForCausalLM": "Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B, base and Chat/Instruct "
                           "(routed experts plus a gated shared expert)",
    "Qwen3MoeForCausalLM": "Qwen3-30B-A3B, Qwen3-235B-A22B and Qwen3-Coder-30B-A3B, base, "
                           "Instruct and Thinking",
    "Qwen3ForCausalLM": "Qwen3 dense, base and hybrid-thinking (0.6B-32B)",
    "Phi3ForCausalLM": "Phi-3 mini and medium (4k, and 128k with LongRoPE), Phi-3.5-mini, "
                       "Phi-4 and Phi-4-mini",
    "GPTNeoXForCausalLM": "Pythia, Dolly v2, OpenAssistant's Pythia SFT models, StableLM-alpha "
                          "(base and tuned), GPT-NeoX-20B, RedPajama-INCITE",
    "StableLmForCausalLM": "StableLM-3B-4E1T, StableLM 2 (1.6B, 12B; base, chat, Zephyr), "
                           "StableLM Zephyr 3B",
    "OPTForCausalLM": "OPT 125M-66B (pre- and post-norm layers, 350m's projected embeddings) "
                      "and fine-tunes that keep this architecture",
    "Gemma2ForCausalLM": "Gemma 2 (2B, 9B, 27B), base and instruction-tuned (-it), with its "
                         "attention and final logit soft-capping and alternating sliding-window "
                         "layers",
    "Gemma3ForCausalLM": "Gemma 3 1B (base and -it) and text-only Gemma 3 checkpoints; not the "
                         "multimodal Gemma3ForConditionalGeneration (4B-27B)",
    "Starcoder2ForCausalLM": "StarCoder2 (3B, 7B, 15B) and StarCoder2-Instruct",
    "GPTBigCodeForCausalLM": "StarCoder, StarCoderBase, SantaCoder (gpt_bigcode checkpoints), "
                             "WizardCoder and OctoCoder",
}


def build_model(ctx: ModelContext) -> CausalLM:
    """The native implementation of the checkpoint's architecture, built on the default device
    and dtype with uninitialized weights (load_weights fills them)."""
    config = ctx.config
    architectures = getattr(config, "architectures", None) or []
    for architecture in architectures:
        if architecture in MODEL_REGISTRY:
            return MODEL_REGISTRY[architecture](ctx)
    raise ValueError(
        f"unsupported model architecture {architectures or config.model_type!r}; "
        f"supported: {sorted(MODEL_REGISTRY)}"
    )


__all__ = ["MODEL_FAMILIES", "MODEL_REGISTRY", "CausalLM", "KVCache", "ModelContext", "build_model"]
