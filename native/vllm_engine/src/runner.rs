//! Turns a scheduled step into a ForwardBatch and runs the model on it.
