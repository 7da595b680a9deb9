"""Pure loss functions: (log-probs or logits, batch, config) -> (loss, metrics)."""
