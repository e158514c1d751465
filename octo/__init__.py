"""Octo: a Llama-architecture language model with fused kernels.

Usage:
    from octo import OctoConfig, OctoForCausalLM
"""

from octo.config import OctoConfig
from octo.model import CausalLMOutput, OctoForCausalLM

__all__ = ["CausalLMOutput", "OctoConfig", "OctoForCausalLM"]
