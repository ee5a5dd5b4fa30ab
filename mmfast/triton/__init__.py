"""Triton faces of mmfast's ops, one module per op family (imported lazily by mmfast.dispatch).

On the CPU they run under the Triton interpreter: TRITON_INTERPRET=1 must be set before these
modules are imported."""
