"""ca2vdm: a streaming video generation server for Ca2-VDM."""

__version__ = "0.1.0"
