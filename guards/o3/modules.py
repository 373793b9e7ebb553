"""What an O3 adapter adapts, and all vLLM wraps with LoRA layers (``server/engine.py`` says why not embed_tokens).

Its own module so that training (``training.py``) reads it without the mechanism's serving dependencies.
"""

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # O3: every Linear
