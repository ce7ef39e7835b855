"""The demo: the stdlib assets, the demo command, and the real pretrained models from PyPI wheels."""
