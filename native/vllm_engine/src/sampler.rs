//! Picks the next token of every sequence in the batch from its logits.
