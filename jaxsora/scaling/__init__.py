"""Scaling sweeps: a grid of model sizes x training compute, trained and validated alike, and
the compute-optimal frontier fitted to it (`python -m jaxsora.scaling run|fit|samples`).

  sweep.py    the grid from a sweep file, each run's config, the resumable runner
  fit.py      the validation-loss points, their lower envelope, L(C) = a C^-b + c, N_opt(C)
  figures.py  scaling.png and the samples grid
"""
