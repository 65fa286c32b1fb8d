//! The engine-core thread: drains commands, schedules a step, runs it, emits outputs.
