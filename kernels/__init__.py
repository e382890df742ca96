"""Compute kernels for tandem, each beside the pure-torch reference it is tested against.

- ``tandem.kernels.ssd``: the Mamba-2 SSD chunked scan (``chunk_scan``): torch references (``reference.py``) and
  Triton kernels, one module per step of the algorithm, each with its step's ``*_ref``
  (``chunk_cumsum.py``, ``bmm_chunk.py``, ``chunk_state.py``, ``chunk_output.py``), assembled with an
  autograd Function in ``ssd_triton.py``.
- ``tandem.kernels.conv1d``: causal depthwise conv1d with document resets (``causal_conv1d``): torch reference and
  Triton forward/backward (``conv1d_triton.py``).

Model code calls only the public entries (``chunk_scan``, ``causal_conv1d``); the ``impl`` argument picks
the implementation (``auto``: Triton for CUDA tensors, torch otherwise). The references are the ground
truth on every machine; on CPU the Triton kernels run, for tests, under ``TRITON_INTERPRET=1``.
"""
