"""Building blocks the model families share: each family file composes these and declares how
its checkpoint's tensors map onto them."""

from pjllm.models.layers.attention import AttentionBackend, alibi_slopes, paged_attention
from pjllm.models.layers.linear import Linear, draw_normal, init_param, tied_logits
from pjllm.models.layers.mlp import MLP, GatedMLP, activation
from pjllm.models.layers.norm import LayerNorm, RMSNorm
from pjllm.models.layers.rotary import apply_rope, rope_attention_factor, rope_inv_freq
from pjllm.models.layers.stack import call_layer, run_layers

__all__ = ["MLP", "AttentionBackend", "GatedMLP", "LayerNorm", "Linear", "RMSNorm", "activation",
           "alibi_slopes", "apply_rope", "call_layer", "draw_normal", "init_param",
           "paged_attention", "rope_attention_factor", "rope_inv_freq", "run_layers", "tied_logits"]
