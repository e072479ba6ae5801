"""pdd-batch: batch screening of medical image archives with PDD.

This package runs without torch or Ray (see DESIGN.md import rules); the model lives in
``model/`` and the Ray jobs in ``jobs/``.
"""

__version__ = "0.1.0"
