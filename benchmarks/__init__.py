"""mtevm's benchmarks: each ``bench_<area>.py`` has a ``main()`` that prints its figures and ratios.

``python -m benchmarks [area ...]`` runs them all (or the named areas); see README.md.
"""
