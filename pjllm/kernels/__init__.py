"""Attention kernels and the KV page layout they own."""
