"""tandem: end-to-end training of hybrid Mamba-2 / attention / sparse-MoE language models.

The repository's top-level folders install as the subpackages of this namespace (see docs/ARCHITECTURE.md):

- :mod:`tandem.kernels`: Triton kernels beside their torch references (leaves: import nothing of tandem's);
- :mod:`tandem.model`: the network as plain ``nn.Module``s, checkpoint interop (imports only kernels);
- :mod:`tandem.data_pipelines`: tokenizers, indexed datasets, blends, packing, chat/SFT data (imports
  nothing of tandem's but itself);
- :mod:`tandem.trainer`: the ``tandem`` CLI, the one training loop, stages, parallelism, checkpoints,
  inference;
- :mod:`tandem.recipes`: the Hydra recipes, shipped as package data.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tandem")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
