"""Model-side helpers: what runs inside the forward pass or touches the weights.

``loss`` computes the causal-LM loss over the lm_head in chunks; ``varlen`` is the padding-free
attention implementation; ``weights`` decides which weight files load; ``vocab`` checks token ids
against the embeddings.
"""
