"""Pure functions of tensors and plain data: token alignment, masking, loss math, statistics,
frontier math and weight diagnostics. No I/O, no logging, no globals."""
