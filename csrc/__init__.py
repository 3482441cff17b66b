"""C++ sources of the fused inner-loop CPU op, compiled at first use (see anil_fast.models.ops)."""
