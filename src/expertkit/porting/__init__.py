"""Carrying an expert library to an updated base: checks, training-free port, refresh, compatible refresh, report."""

from expertkit.porting.checks import check_new_base, shape_difference, tokenizer_difference
from expertkit.porting.port import port_library

__all__ = ["check_new_base", "port_library", "shape_difference", "tokenizer_difference"]
