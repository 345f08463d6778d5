"""Training loop and command-line entry points; the only layer that touches Ray and MLflow.

Import-light on purpose: the modules import Ray and MLflow only
where they need them.
"""
