"""Differentially private training steps written by the kit itself."""
