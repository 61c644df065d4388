"""ca2vdm: a low-latency streaming server for Ca2-VDM autoregressive video diffusion.

One import namespace over the repository's top-level folders (pyproject.toml maps them):
- `ca2vdm.server`  (server/)  the model, paged K/V cache, engine, API and trainer: everything in the server process;
- `ca2vdm.kernels` (kernels/) Triton kernels, each with a torch reference;
- `ca2vdm.client`  (client/)  the Python client and `ca2vdm-client`; needs neither torch nor the server.
"""

__version__ = "0.1.0"
