"""Shipped dataset files (``*.npz``); a package so setuptools includes them in the wheel.

Written by ``datasets/extract.py``; read by :mod:`kronegp.datasets`.
"""
