"""Integration tier: hosts as network namespaces (see ``lab.py``)."""
