"""CuPy kernels, imported only when the ``cupy`` backend is chosen.

A name defined here replaces the reference function of the same name when the ``cupy``
backend is active; every other op runs the reference code with ``xp = cupy``.
"""
