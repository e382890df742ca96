"""Compute kernels for tandem, each beside the pure-torch reference it is tested against.

- ``kernels.ssd``: the Mamba-2 SSD chunked scan (``chunk_scan``) and its torch references.
- ``kernels.conv1d``: causal depthwise conv1d with document resets (``causal_conv1d``).

Model code calls only the public entries (``chunk_scan``, ``causal_conv1d``); the ``impl`` argument picks
the implementation. The references are the ground truth on every machine.
"""
