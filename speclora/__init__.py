"""speclora: multi-task LoRA on GLUE and SuperGLUE with spectral parameter-graph coordination."""

__version__ = "0.1.0"
