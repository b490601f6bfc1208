"""Pure, jit-able loss and metric functions (no state, no I/O)."""
