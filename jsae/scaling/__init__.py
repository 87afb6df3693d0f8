"""Scaling laws and feature splitting across dictionaries of different sizes on one hook.

flops.py (training FLOPs from a dictionary's shapes), points.py (the held-out points a run
recorded at ``eval.at_tokens``), members.py (runs and SAE folders read as comparable members),
fit.py (the power-law fits, pure NumPy/SciPy), families.py (cross-size feature matching and
splitting trees), report.py (what ``jsae scaling`` / ``jsae families`` write).
"""
