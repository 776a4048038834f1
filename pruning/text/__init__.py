"""Text for calibration, training and evaluation: the offline standard-library corpus and token windows."""

from .stdlib import BYTE_VOCAB, batches, stdlib_bytes, stdlib_files, stdlib_root, windows

__all__ = ["BYTE_VOCAB", "batches", "stdlib_bytes", "stdlib_files", "stdlib_root", "windows"]
