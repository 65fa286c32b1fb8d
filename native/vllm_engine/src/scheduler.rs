//! Decides each step which requests run and how many tokens each (one token budget).
