"""sftdata: prepare supervised fine-tuning data with exact assistant-only label masks."""

__version__ = "0.1.0"
