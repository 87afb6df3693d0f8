"""Scaling laws and feature splitting across dictionaries of different sizes on one hook.

flops.py (training FLOPs from a dictionary's shapes), members.py (runs, family members and SAE
folders read as comparable members, with the held-out points each recorded at
``eval.at_tokens``), fit.py (the power-law fits, pure NumPy/SciPy), laws.py (the paper's forms
over the members' points: per size, the frontier, L(N, D), the recommendation), families.py
(cross-size feature matching), splitting.py (the trees and split scores of ``jsae families``),
plots.py (their PNGs).
"""
